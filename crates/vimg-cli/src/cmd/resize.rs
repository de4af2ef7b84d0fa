//! `vimg resize`: qemu-img resize's command line, messages and exit codes, for qcow2 and
//! raw. The size is the last argument and may start with `+` or `-` (relative), as
//! qemu-img takes it before parsing flags.

use clap::Args;
use vimg::formats::qcow2::Prealloc;
use vimg::formats::updater;
use vimg::formats::updater::UpdateOp;
use vimg::Format;

use super::parse_format_opt;
use crate::args::SafetyArgs;
use crate::{CmdResult, Failure};

#[derive(Args, Debug)]
pub struct ResizeArgs {
    /// Image format (probed from the content when absent).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Preallocation of the new area: off, metadata, falloc, full.
    #[arg(long = "preallocation", value_name = "PREALLOC")]
    pub preallocation: Option<String>,
    /// Allow shrinking (the data past the new end is dropped).
    #[arg(long = "shrink")]
    pub shrink: bool,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub safety: SafetyArgs,
    /// The image.
    pub filename: String,
    /// New size, or `+SIZE` / `-SIZE` relative to the current one (k, M, G, T suffixes).
    #[arg(allow_hyphen_values = true)]
    pub size: String,
}

/// qemu-img's words for a size it cannot parse.
const SIZE_HELP: &str = "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.";

pub fn run(a: ResizeArgs) -> CmdResult {
    let prealloc = match a.preallocation.as_deref() {
        None => Prealloc::Off,
        Some(p) => Prealloc::parse(p).map_err(Failure::from)?,
    };
    let (sign, body) = match a.size.as_bytes().first() {
        Some(b'+') => (1i8, &a.size[1..]),
        Some(b'-') => (-1i8, &a.size[1..]),
        _ => (0i8, a.size.as_str()),
    };
    let n = vimg::options::parse_size(body).map_err(|_| Failure::new(SIZE_HELP, 1))?;
    // `--image-opts`/`json:` names (an encrypted image's key among their options).
    let (path_buf, driver) = super::in_place_file(&a.filename)?;
    let path = path_buf.as_path();
    let mut format = parse_format_opt(a.format.as_deref())?.or(driver);
    let storage = vimg::storage::FileStorage::open(path)
        .map_err(|e| Failure::open(&a.filename, &vimg::Error::io("open", e)))?;
    if format.is_none() {
        let probed =
            vimg::formats::registry::probe(&storage).map_err(|e| Failure::open(&a.filename, &e))?;
        if probed == Format::Raw {
            super::warn_probed_raw(&a.filename);
        }
        format = Some(probed);
    }
    let format = format.unwrap_or(Format::Raw);
    if format == Format::Luks {
        return super::luks_inplace::resize(
            &a.filename,
            path,
            sign,
            n,
            a.shrink,
            prealloc,
            a.quiet,
        );
    }
    let policy = crate::trust::policy(&a.safety);
    updater::require(format, UpdateOp::Resize).map_err(Failure::from)?;
    let mut img =
        updater::open(path, format, policy).map_err(|e| Failure::open(&a.filename, &e))?;
    let cur = img.virtual_size().map_err(Failure::from)?;
    let total = target(cur, sign, n)?;
    check_shrink(cur, total, a.shrink)?;
    if img.caps().backing {
        if total < cur && prealloc != Prealloc::Off {
            return Err(Failure::new(
                "Preallocation can't be used for shrinking an image",
                1,
            ));
        }
        if total > cur {
            // Where a longer backing file would show through the new area, qemu-img
            // writes zeros over it (zero clusters, switched in with the new size).
            let opts = super::open_options(Some(format), &a.safety);
            let image =
                vimg::Image::open(path, &opts).map_err(|e| Failure::open(&a.filename, &e))?;
            if image.backing().is_some_and(|b| b.virtual_size() > cur) {
                if format == Format::Qed {
                    // QEMU's qed cannot zero the new area: qemu-img refuses in these words.
                    return Err(Failure::new(
                        "Block driver does not support requested flags",
                        1,
                    ));
                }
                let head = resize_head(&image, cur, &a.filename)?;
                let tail = if prealloc != Prealloc::Off {
                    backing_tail(&image, total, &a.filename)?
                } else {
                    Vec::new()
                };
                drop(image);
                if prealloc != Prealloc::Off {
                    // qcow2 preallocates as without a backing file, the new area reading
                    // as zeros (update/prealloc_zero.rs); other formats refuse.
                    let Some(q) = img.qcow2() else {
                        return Err(Failure::new(
                            format!(
                                "vimg cannot preallocate the new area of '{}' over a longer backing file",
                                a.filename
                            ),
                            1,
                        ));
                    };
                    q.resize_preallocated_over_backing(total, prealloc, head.as_deref(), &tail)
                        .map_err(Failure::from)?;
                } else {
                    img.resize_zeroing_with(total, head.as_deref())
                        .map_err(Failure::from)?;
                }
                if !a.quiet {
                    crate::print_out("Image resized.\n")?;
                }
                return Ok(0);
            }
        }
    } else if total < cur && prealloc != Prealloc::Off {
        // qemu's file driver's words (iotest 106); the file is left as it is.
        return Err(Failure::new(
            "Preallocation can only be used for growing images",
            1,
        ));
    }
    if format == Format::Qcow2 && prealloc != Prealloc::Off && total > cur {
        // The cluster the old size ends in may move (falloc, full, or an unallocated one):
        // its guest content up to the old size goes with it.
        let opts = super::open_options(Some(format), &a.safety);
        let image = vimg::Image::open(path, &opts).map_err(|e| Failure::open(&a.filename, &e))?;
        let head = resize_head(&image, cur, &a.filename)?;
        drop(image);
        img.resize_preallocated(total, prealloc, head.as_deref())
            .map_err(Failure::from)?;
    } else {
        img.resize(total, prealloc).map_err(Failure::from)?;
    }
    if !a.quiet {
        crate::print_out("Image resized.\n")?;
    }
    Ok(0)
}

pub(super) fn target(cur: u64, sign: i8, n: u64) -> Result<u64, Failure> {
    let total = match sign {
        1 => cur.checked_add(n),
        -1 => cur.checked_sub(n),
        _ => Some(n),
    };
    match total {
        Some(t) if t > 0 && t <= i64::MAX as u64 => Ok(t),
        _ => Err(Failure::new("New image size must be positive", 1)),
    }
}

pub(super) fn check_shrink(cur: u64, total: u64, shrink: bool) -> Result<(), Failure> {
    if total < cur && !shrink {
        eprintln!(
            "{}: Use the --shrink option to perform a shrink operation.",
            crate::trust::prefix()
        );
        return Err(Failure::new(
            "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
            1,
        ));
    }
    Ok(())
}

/// The guest content of the cluster the virtual size `cur` ends in, up to `cur`, when it
/// ends inside one (`None` when it ends on a cluster boundary or the format has no
/// clusters): what a resize over a longer backing file keeps of that cluster.
pub(super) fn resize_head(
    image: &vimg::Image,
    cur: u64,
    name: &str,
) -> Result<Option<Vec<u8>>, Failure> {
    let Some(cs) = image.reader().cluster_size().filter(|&c| c > 0) else {
        return Ok(None);
    };
    if cur.is_multiple_of(cs) {
        return Ok(None);
    }
    let start = cur / cs * cs;
    let mut buf = vec![0u8; (cur - start) as usize];
    image
        .read_at(&mut buf, start)
        .map_err(|e| Failure::open(name, &e))?;
    Ok(Some(buf))
}

/// What the backing file of `image` holds from `size` to the end of the cluster `size`
/// ends in (zeros past its end): the bytes QEMU's preallocation copies past the new size.
fn backing_tail(image: &vimg::Image, size: u64, name: &str) -> Result<Vec<u8>, Failure> {
    let Some(cs) = image.reader().cluster_size().filter(|&c| c > 0) else {
        return Ok(Vec::new());
    };
    let Some(b) = image.backing() else {
        return Ok(Vec::new());
    };
    let mut buf = vec![0u8; (size.next_multiple_of(cs) - size) as usize];
    let n = b.virtual_size().saturating_sub(size).min(buf.len() as u64) as usize;
    if n > 0 {
        b.read_at(&mut buf[..n], size)
            .map_err(|e| Failure::open(name, &e))?;
    }
    Ok(buf)
}

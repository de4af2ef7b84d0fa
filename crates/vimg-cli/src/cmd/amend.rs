//! `vimg amend`: qemu-img amend's command line for qcow2, for the options vimg changes
//! in place (`compat`, `lazy_refcounts`, `refcount_bits`, `data_file_raw`, `data_file`); the other amendable options are refused before
//! anything is written, creation-only and unknown options with qemu-img's words.

use std::path::Path;

use clap::Args;
use vimg::formats::qcow2::Amend;
use vimg::formats::updater;
use vimg::formats::updater::UpdateOp;
use vimg::Format;

use super::parse_format_opt;
use crate::args::SafetyArgs;
use crate::{CmdResult, Failure};

#[derive(Args, Debug)]
pub struct AmendArgs {
    /// Image format (probed from the content when absent).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Options to change, key=value[,key=value...]: compat=0.10|1.1, lazy_refcounts=on|off,
    /// refcount_bits=1..64, data_file_raw=on|off.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Accepted for qemu-img compatibility (vimg refuses what --force would allow).
    #[arg(long = "force")]
    pub force: bool,
    /// Show progress (accepted; the change is one write).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Cache mode (accepted; vimg always flushes).
    #[arg(short = 't', value_name = "CACHE")]
    pub cache: Option<String>,
    #[command(flatten)]
    pub safety: SafetyArgs,
    /// The image.
    pub filename: String,
}

/// Options `qemu-img amend` accepts for qcow2 that vimg does not change yet (`backing_file`
/// and `backing_fmt` are handled as qemu-img handles them: see [`same_backing`]).
const NOT_YET: &[&str] = &[
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.new-secret",
    "encrypt.old-secret",
    "encrypt.slot",
    "encrypt.state",
    "encrypt.keyslot",
    "encrypt.iter-time",
];

/// Options qemu-img accepts only when creating an image.
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "encryption",
    "extended_l2",
    "compression_type",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.hash-alg",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
];

fn parse_bool(key: &str, v: &str) -> Result<bool, Failure> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(Failure::new(
            format!("Parameter '{key}' expects 'on' or 'off'"),
            1,
        )),
    }
}

/// A number option as QEMU's option parser reads it (`strtoull` with base 0 after leading
/// blanks: decimal, `0x` hex, `0` octal; a leading `-` wraps around as strtoull does).
fn parse_number(key: &str, v: &str) -> Result<u64, Failure> {
    let bad = || Failure::new(format!("Parameter '{key}' expects a number"), 1);
    let t = v.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let parsed = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8)
    } else {
        t.parse::<u64>()
    };
    let n = parsed.map_err(|_| bad())?;
    Ok(if neg { n.wrapping_neg() } else { n })
}

pub fn run(a: AmendArgs) -> CmdResult {
    if a.options.is_empty() {
        return Err(Failure::new(
            format!(
                "Must specify options (-o)\nTry '{} amend --help' for more info",
                crate::trust::prefix()
            ),
            1,
        ));
    }
    let (path, driver) = super::in_place_file(&a.filename)?;
    let path = path.as_path();
    let format = match parse_format_opt(a.format.as_deref())?.or(driver) {
        Some(f) => f,
        None => {
            let st = vimg::storage::FileStorage::open(path)
                .map_err(|e| Failure::open(&a.filename, &vimg::Error::io("open", e)))?;
            let probed =
                vimg::formats::registry::probe(&st).map_err(|e| Failure::open(&a.filename, &e))?;
            if probed == vimg::Format::Raw {
                super::warn_probed_raw(&a.filename);
            }
            probed
        }
    };
    if let Some(code) = super::luks_inplace::amend(&a, path, format)? {
        return Ok(code);
    }
    updater::require(format, UpdateOp::Amend).map_err(Failure::from)?;
    if super::wants_help(&a.options) {
        // qemu-img: the options of the image's format (given or probed), once it amends.
        return super::print_option_help(format, None).map(|()| 0);
    }
    let mut amend = Amend::default();
    let (mut backing_file, mut backing_fmt) = (None, None);
    let mut size: Option<u64> = None;
    let mut data_file: Option<String> = None;
    for list in &a.options {
        for kv in list.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "compat" => {
                    amend.version = Some(match v {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => {
                            return Err(Failure::new(format!("Unknown compatibility level {v}"), 1))
                        }
                    })
                }
                "lazy_refcounts" => amend.lazy_refcounts = Some(parse_bool(k, v)?),
                "refcount_bits" => amend.refcount_bits = Some(parse_number(k, v)?),
                "data_file_raw" => amend.data_file_raw = Some(parse_bool(k, v)?),
                "data_file" => data_file = Some(v.to_string()),
                "size" => {
                    size = Some(vimg::options::parse_size(v).map_err(|_| {
                        Failure::new(
                            "Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.",
                            1,
                        )
                    })?)
                }
                "backing_file" => backing_file = Some(v.to_string()),
                "backing_fmt" => backing_fmt = Some(v.to_string()),
                k if CREATE_ONLY.contains(&k) => {
                    return Err(Failure::new(
                        format!(
                        "Invalid parameter '{k}'\nThis option is only supported for image creation"
                    ),
                        1,
                    ))
                }
                k if NOT_YET.contains(&k) => {
                    return Err(Failure::new(
                        format!(
                            "vimg cannot amend '{k}' yet ('{}' is unchanged); use qemu-img amend",
                            a.filename
                        ),
                        1,
                    ))
                }
                k => return Err(Failure::new(format!("Invalid parameter '{k}'"), 1)),
            }
        }
    }
    let policy = crate::trust::policy(&a.safety);
    if backing_file.is_some() || backing_fmt.is_some() {
        same_backing(
            path,
            format,
            &a,
            backing_file.as_deref(),
            backing_fmt.as_deref(),
        )?;
    }
    let mut img =
        updater::open(path, format, policy).map_err(|e| Failure::open(&a.filename, &e))?;
    if repair_if_dirty(&mut img, &a)? {
        img = updater::open(path, format, policy).map_err(|e| Failure::open(&a.filename, &e))?;
    }
    // `data_file=`: refused on an image without an external data file before anything
    // changes (qemu-img checks it while reading the options); stored last.
    if data_file.is_some() {
        match &img {
            updater::Updater::Qcow2(q) => q.check_data_file_amend().map_err(Failure::from)?,
            _ => {
                return Err(Failure::new(
                    format!(
                        "vimg cannot amend 'data_file' of this format ('{}' is unchanged)",
                        a.filename
                    ),
                    1,
                ))
            }
        }
    }
    // `-p`: qemu-img's lines at 0, at the steps QEMU counts (update/amend_progress.rs) and
    // at 100, whether the change succeeds or not.
    let reporter = std::sync::Arc::new(crate::progress::Reporter::new(
        (a.progress && !a.quiet).then_some(crate::args::ProgressMode::Auto),
        false,
    ));
    let percent = |pct: f64| vimg::Progress {
        done: (pct * 100.0).round() as u64,
        total: 10_000,
    };
    if reporter.enabled() {
        reporter.update(percent(0.0));
        if let updater::Updater::Qcow2(q) = &mut img {
            let r = reporter.clone();
            q.set_amend_progress(Box::new(move |pct| r.update(percent(pct))));
        }
    }
    let r = change(
        &mut img,
        amend,
        size,
        data_file.as_deref(),
        path,
        format,
        &a,
    );
    if !reporter.enabled() {
        return r;
    }
    reporter.update(percent(100.0));
    match r {
        Ok(code) => {
            reporter.finish(true);
            Ok(code)
        }
        // qemu-img ends the progress line after its error message.
        Err(mut f) => {
            if reporter.plain() {
                f.then_stdout = Some("\n");
            } else {
                reporter.finish(false);
            }
            Err(f)
        }
    }
}

/// The changes of `amend` once the image is open: qemu-img's order.
fn change(
    img: &mut updater::Updater,
    amend: Amend,
    size: Option<u64>,
    data_file: Option<&str>,
    path: &Path,
    format: Format,
    a: &AmendArgs,
) -> CmdResult {
    let set_data_file = |img: &mut updater::Updater| -> Result<(), Failure> {
        if let (Some(name), updater::Updater::Qcow2(q)) = (data_file, img) {
            q.set_data_file(name).map_err(Failure::from)?;
        }
        Ok(())
    };
    let Some(size) = size else {
        img.amend(amend).map_err(Failure::from)?;
        set_data_file(img)?;
        return Ok(0);
    };
    // qemu-img's order: upgrade and the other options, then the size, then a downgrade.
    let downgrade = match (&*img, amend.version) {
        (updater::Updater::Qcow2(q), Some(v)) => v < q.header().version,
        _ => false,
    };
    let mut first = amend;
    if downgrade {
        first.version = None;
    }
    img.amend(first).map_err(Failure::from)?;
    resize_for_amend(img, path, format, a, size)?;
    if downgrade {
        img.amend(Amend {
            version: amend.version,
            ..Amend::default()
        })
        .map_err(Failure::from)?;
    }
    set_data_file(img)?;
    Ok(0)
}

/// qemu-img repairs a dirty qcow2 image (lazy refcounts not written back) when it opens
/// it for writing, printing the repair's lines; amend does the same before it changes
/// anything. True when it repaired.
fn repair_if_dirty(img: &mut updater::Updater, a: &AmendArgs) -> Result<bool, Failure> {
    let dirty = matches!(img, updater::Updater::Qcow2(q)
        if q.header().incompatible_features & vimg::formats::qcow2::header::INCOMPAT_DIRTY != 0);
    if !dirty {
        return Ok(false);
    }
    let rep = img
        .repair(vimg::formats::qcow2::Repair::All)
        .map_err(|e| Failure::new(format!("Repair of '{}' failed: {e}", a.filename), 1))?;
    if !a.quiet {
        for m in rep
            .before_messages()
            .chain(&rep.messages)
            .chain(&rep.copied_messages)
        {
            eprintln!("{m}");
        }
    }
    Ok(true)
}

/// amend's `size`: a resize (shrinking allowed, as qemu-img's amend truncates), with the
/// new area zeroed where a longer backing file would show through.
fn resize_for_amend(
    img: &mut updater::Updater,
    path: &Path,
    format: Format,
    a: &AmendArgs,
    size: u64,
) -> Result<(), Failure> {
    let cur = img.virtual_size().map_err(Failure::from)?;
    if size == cur {
        return Ok(());
    }
    if size > cur {
        let opts = super::open_options(Some(format), &a.safety);
        let image = vimg::Image::open(path, &opts).map_err(|e| Failure::open(&a.filename, &e))?;
        if image.backing().is_some_and(|b| b.virtual_size() > cur) {
            let head = super::resize::resize_head(&image, cur, &a.filename)?;
            drop(image);
            return img
                .resize_zeroing_with(size, head.as_deref())
                .map_err(Failure::from);
        }
    }
    img.resize(size, vimg::formats::qcow2::Prealloc::Off)
        .map_err(Failure::from)
}

/// qemu-img amend takes `backing_file`/`backing_fmt` only when they name the backing file
/// and format the image already has (both compared as stored; one alone compares the other
/// as absent), and refuses any change, pointing to rebase.
fn same_backing(
    path: &Path,
    format: Format,
    a: &AmendArgs,
    file: Option<&str>,
    fmt: Option<&str>,
) -> Result<(), Failure> {
    let opts = super::open_options(Some(format), &a.safety).open_backing(false);
    let img = vimg::Image::open(path, &opts).map_err(|e| Failure::open(&a.filename, &e))?;
    let current = img.reader().backing();
    let same = match (current, file, fmt) {
        (Some(b), Some(file), Some(fmt)) => {
            b.name == file && b.format.is_some_and(|f| f.name() == fmt)
        }
        _ => false,
    };
    if same {
        return Ok(());
    }
    Err(Failure::new(
        format!(
            "Cannot amend the backing file\nYou can use '{} rebase' instead.",
            crate::trust::prefix()
        ),
        1,
    ))
}

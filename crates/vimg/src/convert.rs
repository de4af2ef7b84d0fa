//! `convert` and `create` as library calls: open the target through an [`Output`], create the
//! writer, run the copy engine, finish, commit. The all-or-nothing rule lives in [`Output`];
//! this module adds the checks that must happen before anything is written.

use std::path::Path;

use crate::checksum::Checksum;
use crate::engine::{self, CopyMode, CopyOptions, CopyStats};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::{registry, updater, Format};
use crate::image::Image;
use crate::options::CreateOptions;
use crate::output::{check_destination, device_geometry, DestKind, Output, OutputMode};
use crate::writer::ImageWriter;

pub mod bitmaps;
mod into_image;
mod options;

pub use options::ConvertOptions;

/// What [`convert_report`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConvertReport {
    /// The copy engine's counts.
    pub stats: CopyStats,
    /// The checksum of the output file's bytes, when [`ConvertOptions::checksum`] asked for
    /// one: computed while writing when the writer wrote the file in order (streams,
    /// compressed raw), else by one read of the finished file before it is renamed into
    /// place.
    pub checksum: Option<Checksum>,
    /// Notes on how the destination was written (an in-place fallback, hard links).
    pub notes: Vec<String>,
}

/// Checks `opts` against `format`'s option list, and that no option asks for what the
/// format cannot do; options [`CreateOptions::check_for`] checked for `format` pass.
pub fn check_create_options(format: Format, opts: &CreateOptions) -> Result<()> {
    if opts.checked_for == Some(format) {
        return Ok(());
    }
    opts.check(&registry::all_options(format))
}

impl CreateOptions {
    /// Checks these options for a new `format` image (qemu-img's messages) once: `create`,
    /// `convert` and `measure` do not check them again unless they change. A command line
    /// calls it where qemu-img reports a bad option, before its own later checks.
    pub fn check_for(&mut self, format: Format) -> Result<()> {
        check_create_options(format, self)?;
        self.checked_for = Some(format);
        Ok(())
    }
}

/// Creates a writer for a new image at `out`'s main path.
pub fn create_writer(
    out: &Output,
    format: Format,
    size: u64,
    opts: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    check_create_options(format, opts)?;
    registry::create(
        format,
        out,
        size,
        &opts.with_open_named(crate::image::open_named),
    )
}

/// Creates an empty image (`vimg create`). The size comes from `size`, or from `-o size=`.
pub fn create(
    path: impl AsRef<Path>,
    format: Format,
    size: Option<u64>,
    opts: &CreateOptions,
) -> Result<()> {
    let path = path.as_ref();
    check_create_options(format, opts)?;
    let size = match (size, opts.get_size("size")?) {
        (Some(s), _) | (None, Some(s)) => s,
        (None, None) => {
            return Err(Error::invalid_argument(
                "Image creation needs a size parameter",
            ))
        }
    };
    // Every format but raw expects its new file to read as zeros: a device is zeroed first.
    let on_device = check_destination(path)? == DestKind::BlockDevice;
    let out = Output::new(path).with_zeroed_device(on_device && !format.is_plain());
    let w = registry::create(
        format,
        &out,
        size,
        &opts.with_open_named(crate::image::open_named),
    )?;
    w.finish_new()?;
    out.commit()
}

/// Every file `src` reads (each layer's image, extent and data files), as `(device,
/// inode)` and a name for messages.
pub fn source_files(src: &Image) -> Vec<((u64, u64), String)> {
    let mut v = Vec::new();
    for layer in src.chain() {
        for f in layer.reader().files() {
            if let Some(id) = f.identity() {
                let name = f
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| layer.filename().to_string());
                v.push((id, name));
            }
        }
    }
    v
}

/// Refuses a destination that is one of the source's files (same device and inode, through
/// symlinks and hard links), before anything is written. The further files a multi-file
/// output creates (VMDK extents) are held to the same rule when they are created
/// ([`Output::with_protected`]), also before any byte is written.
pub fn check_not_source(src: &Image, dst: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dst) else {
        return Ok(());
    };
    let id = (meta.dev(), meta.ino());
    // Two device nodes (a /dev name and a node made with mknod) are one device when their
    // device numbers match.
    use std::os::unix::fs::FileTypeExt;
    if meta.file_type().is_block_device() {
        for layer in src.chain() {
            for f in layer.reader().files() {
                let Some(p) = f.path() else { continue };
                if let Ok(m) = std::fs::metadata(p) {
                    if m.file_type().is_block_device() && m.rdev() == meta.rdev() {
                        return Err(Error::invalid_argument(format!(
                            "Destination '{}' is the same device as '{}', which the source reads",
                            dst.display(),
                            p.display()
                        )));
                    }
                }
            }
        }
    }
    if let Some((_, name)) = source_files(src).into_iter().find(|(f, _)| *f == id) {
        return Err(Error::invalid_argument(format!(
            "Destination '{}' is the same file as '{name}', which the source reads",
            dst.display(),
        )));
    }
    Ok(())
}

/// Converts `src` into a new image at `dst`. On any error nothing is left at `dst` (or an
/// existing `dst` is unchanged), except with [`OutputMode::InPlace`].
///
/// ```
/// use vimg::{ConvertOptions, Format, Image, OpenOptions};
/// # let dir = tempfile::tempdir()?;
/// # let src_path = dir.path().join("disk.raw");
/// # std::fs::write(&src_path, vec![1u8; 1 << 20])?;
/// let src = Image::open(&src_path, &OpenOptions::default())?;
/// let mut opts = ConvertOptions::new(Format::Qcow2);
/// opts.create.compress = true; // qemu-img's -c
/// let dst = dir.path().join("disk.qcow2");
/// let stats = vimg::convert(&src, &dst, &opts)?;
/// assert_eq!(stats.bytes_read, 1 << 20);
/// assert_eq!(Image::open(&dst, &OpenOptions::default())?.format(), Format::Qcow2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn convert(src: &Image, dst: impl AsRef<Path>, opts: &ConvertOptions) -> Result<CopyStats> {
    convert_report(src, dst, opts).map(|r| r.stats)
}

/// [`convert`], also returning the output's checksum when one was asked for.
pub fn convert_report(
    src: &Image,
    dst: impl AsRef<Path>,
    opts: &ConvertOptions,
) -> Result<ConvertReport> {
    let dst = dst.as_ref();
    check_create_options(opts.format, &opts.create)?;
    let bitmap_plan = if opts.bitmaps {
        Some(bitmaps::plan(src, opts)?)
    } else {
        None
    };
    let kind = if opts.output_mode != OutputMode::Stdout {
        let kind = check_destination(dst)?;
        check_not_source(src, dst)?;
        kind
    } else {
        DestKind::Missing
    };
    if bitmap_plan.as_ref().is_some_and(|p| !p.bitmaps.is_empty())
        && !matches!(kind, DestKind::Missing | DestKind::Regular)
    {
        return Err(Error::refusal(
            ErrorKind::Unsupported,
            "vimg copies persistent bitmaps (--bitmaps) into a regular output file only",
        ));
    }
    // The source's size, as qemu-img sets it over any `-o size=` (which it accepts and
    // ignores: honouring it cut or padded the copy).
    let size = src.virtual_size();
    if kind == DestKind::BlockDevice {
        check_device(dst, opts, size)?;
    }
    if kind.is_stream() && opts.output_mode == OutputMode::InPlace && size > 0 {
        // A character device or FIFO has no size to write an existing image into.
        return Err(Error::refusal(
            ErrorKind::InvalidArgument,
            "output file is smaller than input file",
        ));
    }
    if opts.output_mode == OutputMode::InPlace
        && !opts.format.is_plain()
        && updater::caps(opts.format).data
    {
        // `-n` into an existing image of a format vimg writes guest data into (devices and
        // streams were refused above): through its updater. Zero ranges are written unless
        // the caller says the target reads as zeros.
        let mut copy = opts.copy.clone();
        copy.target_is_zero = opts.target_is_zero;
        let stats = into_image::convert_into(src, dst, opts, &copy)?;
        return Ok(ConvertReport {
            stats,
            checksum: None,
            notes: Vec::new(),
        });
    }
    // Checks deferred at open (SourceOptions::defer_whole_probe) pass before anything is
    // written: now for a destination written in place (a device, a stream, -n), at the end
    // for a new file, which stays a temporary file until it is committed.
    let mut settle_late = opts.output_mode == OutputMode::Atomic
        && matches!(kind, DestKind::Missing | DestKind::Regular);
    if !settle_late {
        settle_sources(src)?;
    }
    let mut out = Output::with_mode(dst, opts.output_mode)
        .with_checksum(opts.checksum)
        .with_sync(opts.sync)
        .with_direct(opts.direct)
        .with_zeroed_device(kind == DestKind::BlockDevice && !opts.format.is_plain())
        .with_protected(source_files(src))
        .with_before_in_place(settle_check(src));
    if let Some(c) = &opts.counter {
        out = out.with_counter(c.clone());
    }
    let writer = registry::create(
        opts.format,
        &out,
        size,
        &opts.create.with_open_named(crate::image::open_named),
    )?;
    if (opts.output_mode == OutputMode::Stdout || kind.is_stream()) && !writer.caps().ordered {
        // Writers refuse a stream at create when they need to seek; this catches one that
        // did not say so before any data is sent.
        return Err(Error::unsupported(format!(
            "{} images cannot be written to a stream: the format needs to seek",
            opts.format.name()
        )));
    }
    if settle_late && !out.all_temporary() {
        // Written in place after all (an unwritable folder, `/dev/stdout`): settle before
        // any data goes out.
        settle_late = false;
        settle_sources(src)?;
    }
    out.release_stream()?;
    let mut copy: CopyOptions = opts.copy.clone();
    // A new file (or a stream, whose gaps are sent as zeros) starts zero; a device or an
    // image written with -n keeps its old bytes unless the caller says it reads as zeros
    // (`ConvertOptions::target_is_zero`, the one setting for it): every zero range of the
    // image is then zeroed on it.
    let fresh = opts.output_mode != OutputMode::InPlace
        && (kind != DestKind::BlockDevice || !opts.format.is_plain());
    copy.target_is_zero = (fresh && writer.starts_zero()) || opts.target_is_zero;
    if copy.mode == CopyMode::TopOnly && !opts.create.has("backing_file") {
        return Err(Error::invalid_argument(
            "copying only the top image needs a backing file for the target",
        ));
    }
    let stats = engine::copy(src, &*writer, &copy)?;
    if settle_late {
        settle_sources(src)?;
    }
    writer.finish()?;
    let notes = out.notes();
    if let Some(plan) = &bitmap_plan {
        // Into the temporary file (or the file written in place after all), before the
        // rename. (The plan's warnings are the caller's to print.)
        let target = out.main_temp_path().unwrap_or_else(|| dst.to_path_buf());
        bitmaps::copy(plan, &target, opts.target_policy)?;
    }
    let checksum = out.commit_unless(copy.cancel.as_deref())?;
    Ok(ConvertReport {
        stats,
        checksum,
        notes,
    })
}

/// [`settle_sources`] for [`Output::with_before_in_place`]: a destination written in place
/// after all (the in-place fallback of an existing file, `/dev/stdout` redirected to a file)
/// is opened and truncated only after the source passed its deferred checks.
fn settle_check(src: &Image) -> crate::output::BeforeInPlace {
    let mut files = Vec::new();
    for layer in src.chain() {
        files.push(layer.storage().clone());
        files.extend(layer.reader().files());
    }
    Box::new(move || files.iter().try_for_each(|f| f.settle()))
}

/// Runs the checks every source file deferred at open ([`crate::storage::Storage::settle`]).
fn settle_sources(src: &Image) -> Result<()> {
    for layer in src.chain() {
        // The storage the image was opened on (a spool, before any driver wraps it).
        layer.storage().settle()?;
        for f in layer.reader().files() {
            f.settle()?;
        }
    }
    Ok(())
}

/// The checks qemu-img makes before writing to a block device: a raw image must fit (its
/// messages). Other formats are written onto a device zeroed first, as onto a new file; one
/// that outgrows the device fails at the write past its end. `-n` into a device takes raw
/// only: the other writers would read an existing image from it.
fn check_device(dst: &Path, opts: &ConvertOptions, size: u64) -> Result<()> {
    if !opts.format.is_plain() {
        if opts.output_mode == OutputMode::InPlace {
            return Err(Error::unsupported(format!(
                "-n into the block device '{}' writes raw images only; without -n a {} image is written onto it",
                dst.display(),
                opts.format.name(),
            )));
        }
        return Ok(());
    }
    let f = std::fs::File::open(dst)
        .map_err(|e| Error::io(format_args!("open device '{}'", dst.display()), e))?;
    let (dev_size, _) = device_geometry(&f)
        .map_err(|e| Error::io(format_args!("size of device '{}'", dst.display()), e))?;
    if size > dev_size {
        return Err(if opts.output_mode == OutputMode::InPlace {
            Error::refusal(
                ErrorKind::InvalidArgument,
                "output file is smaller than input file",
            )
        } else {
            Error::invalid_argument("Cannot grow device files")
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::OpenOptions;

    /// `-n` writes the image's zero ranges onto the existing target unless
    /// `ConvertOptions::target_is_zero` says it already reads as zeros; that one setting
    /// decides (the engine's own flag, left at its default, does not).
    #[test]
    fn target_is_zero_takes_effect_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("s.raw");
        let mut data = vec![0u8; 1 << 20];
        data[70_000..70_003].copy_from_slice(b"abc");
        std::fs::write(&src, &data).unwrap();
        let img = Image::open(&src, &OpenOptions::with_format(Some(Format::Raw))).unwrap();
        let dst = dir.path().join("d.raw");
        for target_is_zero in [false, true] {
            std::fs::write(&dst, vec![0xffu8; 1 << 20]).unwrap();
            let mut opts = ConvertOptions::new(Format::Raw);
            opts.output_mode = OutputMode::InPlace;
            opts.target_is_zero = target_is_zero;
            convert(&img, &dst, &opts).unwrap();
            let out = std::fs::read(&dst).unwrap();
            assert_eq!(&out[70_000..70_003], b"abc");
            let kept = if target_is_zero { 0xff } else { 0 };
            assert_eq!(
                (out[0], out[(1 << 20) - 1]),
                (kept, kept),
                "{target_is_zero}"
            );
        }
    }
}

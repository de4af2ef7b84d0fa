//! `convert` and `create` as library calls: open the target through an [`Output`], create the
//! writer, run the copy engine, finish, commit. The all-or-nothing rule lives in [`Output`];
//! this module adds the checks that must happen before anything is written.

use std::path::Path;

use crate::checksum::{Checksum, HashAlg};
use crate::engine::{self, CopyMode, CopyOptions, CopyStats};
use crate::error::{Error, Result};
use crate::formats::{self, Format};
use crate::image::Image;
use crate::options::CreateOptions;
use crate::output::{Output, OutputMode};
use crate::writer::ImageWriter;

/// Settings for [`convert`].
pub struct ConvertOptions<'a> {
    /// The target format.
    pub format: Format,
    /// `-o` options (and `-c`).
    pub create: CreateOptions,
    /// Engine settings.
    pub copy: CopyOptions<'a>,
    /// Atomic (default), in place (`-n`) or stdout.
    pub output_mode: OutputMode,
    /// A checksum of the output file's bytes to compute (see [`ConvertReport::checksum`]).
    pub checksum: Option<HashAlg>,
    /// Make the output durable before it is renamed into place (default `true`); `false` is
    /// qemu-img's `-t unsafe` (see [`Output::with_sync`]).
    pub sync: bool,
    /// With [`OutputMode::InPlace`]: the caller asserts the existing target already reads
    /// as zeros (qemu-img's `-n --target-is-zero`), so zero ranges are not written. Default
    /// `false`; other modes write a new target, which reads as zeros anyway.
    pub target_is_zero: bool,
}

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
}

impl ConvertOptions<'_> {
    /// Defaults for converting to `format`.
    pub fn new(format: Format) -> Self {
        ConvertOptions {
            format,
            create: CreateOptions::new(),
            copy: CopyOptions::default(),
            output_mode: OutputMode::Atomic,
            checksum: None,
            sync: true,
            target_is_zero: false,
        }
    }
}

/// Checks `opts` against `format`'s option list, and that no option asks for what the
/// format cannot do.
pub fn check_create_options(format: Format, opts: &CreateOptions) -> Result<()> {
    opts.check(&formats::all_options(format))
}

/// Creates a writer for a new image at `out`'s main path.
pub fn create_writer(
    out: &Output,
    format: Format,
    size: u64,
    opts: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    check_create_options(format, opts)?;
    format.driver().create(out, size, opts)
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
    let out = Output::new(path);
    let w = format.driver().create(&out, size, opts)?;
    w.finish()?;
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
pub fn convert(src: &Image, dst: impl AsRef<Path>, opts: &ConvertOptions<'_>) -> Result<CopyStats> {
    convert_report(src, dst, opts).map(|r| r.stats)
}

/// [`convert`], also returning the output's checksum when one was asked for.
pub fn convert_report(
    src: &Image,
    dst: impl AsRef<Path>,
    opts: &ConvertOptions<'_>,
) -> Result<ConvertReport> {
    let dst = dst.as_ref();
    check_create_options(opts.format, &opts.create)?;
    if opts.output_mode != OutputMode::Stdout {
        check_not_source(src, dst)?;
    }
    let size = match opts.create.get_size("size")? {
        Some(s) => s,
        None => src.virtual_size(),
    };
    let out = Output::with_mode(dst, opts.output_mode)
        .with_checksum(opts.checksum)
        .with_sync(opts.sync)
        .with_protected(source_files(src));
    let writer = opts.format.driver().create(&out, size, &opts.create)?;
    if opts.output_mode == OutputMode::Stdout && !writer.caps().ordered {
        // Writers refuse a stream at create when they need to seek; this catches one that
        // did not say so before any data is sent.
        return Err(Error::unsupported(format!(
            "{} images cannot be written to a stream: the format needs to seek",
            opts.format.name()
        )));
    }
    out.release_stream()?;
    let mut copy: CopyOptions<'_> = opts.copy;
    copy.target_is_zero = if opts.output_mode == OutputMode::InPlace {
        opts.target_is_zero
    } else {
        opts.copy.target_is_zero
    };
    if copy.mode == CopyMode::TopOnly && !opts.create.has("backing_file") {
        return Err(Error::invalid_argument(
            "copying only the top image needs a backing file for the target",
        ));
    }
    let stats = engine::copy(src, &*writer, &copy)?;
    writer.finish()?;
    let checksum = out.commit_unless(copy.cancel)?;
    Ok(ConvertReport { stats, checksum })
}

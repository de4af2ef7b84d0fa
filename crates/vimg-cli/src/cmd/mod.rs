//! One module per subcommand. Each turns its clap arguments into checked library options,
//! calls the library and prints what qemu-img prints.

pub mod amend;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod convert_report;
pub mod create;
pub mod dd;
pub mod extras;
pub mod info;
pub mod luks_inplace;
pub mod map;
pub mod measure;
pub mod rebase;
pub mod repair;
pub mod resize;
pub mod snapshot;
pub mod target_opts;

use vimg::{Format, OpenOptions};

use crate::args::{SafetyArgs, SourceArgs};
use crate::Failure;

/// Parses a `-f`/`-O`/`-F` format name (qemu-img's names; `vhd` means `vpc`).
pub fn parse_format(name: &str) -> Result<Format, Failure> {
    Format::from_name(name).ok_or_else(|| Failure::new(format!("Unknown file format '{name}'"), 1))
}

/// Parses an optional format name.
pub fn parse_format_opt(name: Option<&str>) -> Result<Option<Format>, Failure> {
    name.map(parse_format).transpose()
}

/// The one image `commit` or `rebase` names, with qemu-img's message when there is not
/// exactly one.
pub fn one_image<'a>(cmd: &str, files: &'a [String]) -> Result<&'a str, Failure> {
    match files {
        [file] => Ok(file),
        _ => Err(Failure::new(
            format!(
                "Expecting one image file name\nTry '{} {cmd} --help' for more info",
                crate::trust::prefix()
            ),
            1,
        )),
    }
}

/// qemu-img's warning when it opens an image for writing whose format it probed as raw
/// (printed by every in-place command, before the command's own errors).
pub fn warn_probed_raw(file: &str) {
    eprintln!(
        "WARNING: Image format was not specified for '{file}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions."
    );
}

/// [`warn_probed_raw`] when `format`, found by opening `file` without `-f`, is raw and the
/// name does not give the driver itself (`json:`, `--image-opts`).
pub fn warn_if_probed_raw(file: &str, format: Format) {
    if format == Format::Raw && matches!(in_place_file(file), Ok((_, None))) {
        warn_probed_raw(file);
    }
}

/// The format of the image `commit` or `rebase` changes: `-f` (an unknown name worded as
/// qemu-img words it when it opens the image), else probed from the content (a probed raw
/// warned about as qemu-img warns).
pub fn image_format(file: &str, format: Option<&str>) -> Result<Format, Failure> {
    match format {
        Some(name) => Format::from_name(name).ok_or_else(|| {
            Failure::new(
                format!("Could not open '{file}': Unknown driver '{name}'"),
                1,
            )
        }),
        None => {
            let st = vimg::storage::FileStorage::open(std::path::Path::new(file))
                .map_err(|e| Failure::open(file, &vimg::Error::io("open", e)))?;
            let probed =
                vimg::formats::registry::probe(&st).map_err(|e| Failure::open(file, &e))?;
            if probed == Format::Raw {
                warn_probed_raw(file);
            }
            Ok(probed)
        }
    }
}

/// The file an in-place command (`check -r`, `commit`, `amend`) writes, and the format its
/// name gives: the name as given, or, for `--image-opts` and `json:`/`file:` names, the
/// file the options name and their `driver` (qemu-img opens those names for writing as it
/// opens them for reading). A raw `offset`/`size` window is refused: vimg's updaters write
/// whole files.
pub fn in_place_file(name: &str) -> Result<(std::path::PathBuf, Option<Format>), Failure> {
    let image_opts = crate::trust::image_opts();
    // A blkdebug layer without rules passes every request through: the file is written as
    // it is. Rules between a qcow2 image and its file are bound to the file for the qcow2
    // updater (vimg::blkdebug::writes); other formats' updaters would write past them.
    if let Some(b) =
        vimg::blkdebug::parse_name(name, image_opts).map_err(|e| Failure::open(name, &e))?
    {
        if b.level == vimg::blkdebug::Level::File {
            if b.has_rules() {
                let format = match b.format {
                    Some(f) => f,
                    None => image_format(&b.inner, None)?,
                };
                if format != Format::Qcow2 {
                    return Err(Failure::new(
                        format!(
                            "Could not open '{name}': vimg writes through blkdebug rules only \
                             into qcow2 images, not {}",
                            format.name()
                        ),
                        1,
                    ));
                }
                vimg::blkdebug::writes::bind(&b).map_err(|e| Failure::open(name, &e))?;
            }
            return Ok((std::path::PathBuf::from(&b.inner), b.format));
        }
        return Err(Failure::new(
            format!(
                "Could not open '{name}': vimg does not write through blkdebug rules above an \
                 image (it injects errors there into reads only)"
            ),
            1,
        ));
    }
    if !image_opts && !vimg::source::cmdline::is_special(name) {
        return Ok((std::path::PathBuf::from(name), None));
    }
    let u = vimg::source::cmdline::parse(name, image_opts).map_err(|e| Failure::open(name, &e))?;
    // `encrypt.key-secret` (and `backing.encrypt.key-secret`): the keys the updater and
    // the chain open the files with.
    vimg::source::cmdline::bind_keys(&u);
    if u.window.is_some() {
        return Err(Failure::new(
            format!("Could not open '{name}': vimg cannot write through the raw driver's offset/size window"),
            1,
        ));
    }
    Ok((u.path, u.format))
}

/// Open options from `-f` and the safety flags.
pub fn open_options(format: Option<Format>, safety: &SafetyArgs) -> OpenOptions {
    OpenOptions::with_format(format)
        .policy(crate::trust::policy(safety))
        .image_opts(crate::trust::image_opts())
}

/// Applies `--disk` and `--source-size` to `opts`.
pub fn apply_source_args(opts: &mut OpenOptions, a: &SourceArgs) -> Result<(), Failure> {
    opts.source.ova_disk = a.disk;
    if let Some(s) = &a.source_size {
        let n = vimg::options::parse_size(s)
            .map_err(|e| Failure::new(format!("--source-size: {e}"), 1))?;
        opts.source.stream_size = Some(n);
    }
    Ok(())
}

/// Parses `--checksum ALG`.
pub fn parse_checksum(alg: Option<&str>) -> Result<Option<vimg::HashAlg>, Failure> {
    alg.map(|a| a.parse::<vimg::HashAlg>().map_err(Failure::from))
        .transpose()
}

/// Merges repeated `-o` arguments (qemu-img accepts several).
pub fn parse_create_options(list: &[String]) -> Result<vimg::CreateOptions, Failure> {
    let mut o = vimg::CreateOptions::new();
    for s in list {
        o.parse_into(s).map_err(Failure::from)?;
    }
    Ok(o)
}

/// True when `-o help` (or `-o ?`) was asked for.
pub fn wants_help(list: &[String]) -> bool {
    list.iter()
        .any(|s| s.split(',').any(|k| k == "help" || k == "?"))
}

/// Prints a format's `-o help`.
/// With a target file name, qemu-img also lists the protocol's options.
pub fn print_option_help(format: Format, target: Option<&str>) -> Result<(), Failure> {
    let specs = vimg::formats::registry::all_options(format);
    crate::print_out(&match target {
        Some(_) => vimg::options::help_text_for_file(&specs),
        None => vimg::options::help_text(format.name(), &specs),
    })
}

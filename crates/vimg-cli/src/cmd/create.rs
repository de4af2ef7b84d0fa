//! `vimg create`: qemu-img create's command line.

use super::{parse_create_options, parse_format, parse_format_opt};
use crate::args::CreateArgs;
use crate::{CmdResult, Failure};

pub fn run(a: CreateArgs) -> CmdResult {
    // qemu-img names the target in every error once it knows it.
    let named = |f: Failure| match &a.filename {
        Some(n) => Failure::new(format!("{n}: {}", f.message), f.code),
        None => f,
    };
    // Formats qemu-img reads but never creates (vimg may not read them either).
    if ["bochs", "cloop", "dmg", "vvfat"].contains(&a.format.as_str())
        && vimg::Format::from_name(&a.format).is_none()
    {
        return Err(named(Failure::new(
            format!(
                "Format driver '{}' does not support image creation",
                a.format
            ),
            1,
        )));
    }
    let format = parse_format(&a.format).map_err(named)?;
    if super::wants_help(&a.options) {
        super::print_option_help(format, a.filename.as_deref())?;
        return Ok(0);
    }
    let Some(filename) = a.filename.clone() else {
        return Err(Failure::new("Expecting image file name", 1));
    };
    let mut opts = parse_create_options(&a.options).map_err(named)?;
    if let Some(b) = &a.backing {
        if !format.driver().capabilities().backing_file {
            return Err(named(Failure::new(
                format!(
                    "Backing file not supported for file format '{}'",
                    format.name()
                ),
                1,
            )));
        }
        opts.set("backing_file", b.clone());
    }
    if let Some(f) = parse_format_opt(a.backing_format.as_deref())? {
        opts.set("backing_fmt", f.name());
    }
    let size = match &a.size {
        Some(s) => Some(
            vimg::options::parse_size(s)
                .map_err(|_| Failure::new(format!("Invalid image size specified: '{s}'."), 1))?,
        ),
        None => None,
    };
    opts.check_for(format)
        .map_err(|e| named(Failure::from(e)))?;
    // QEMU's bdrv_img_create: right after the -o options, before the backing file.
    if size.is_some() && opts.has("size") {
        return Err(named(Failure::new(
            "The image size must be specified only once",
            1,
        )));
    }
    if let Some(b) = opts.get_str("backing_file") {
        if b == filename {
            return Err(named(Failure::new(
                "Error: Trying to create an image with the same filename as the backing file",
                1,
            )));
        }
        // qemu-img opens the backing file (unless -u) before it creates anything.
        if !a.unsafe_backing {
            let path = backing_path(&filename, b);
            let bf = opts
                .get_str("backing_fmt")
                .and_then(vimg::Format::from_name);
            if let Err(e) = vimg::Image::open(&path, &backing_open_options(bf)) {
                return Err(named(Failure::new(
                    format!(
                        "Could not open '{}': {}\nCould not open backing image.",
                        path.display(),
                        e.message()
                    ),
                    1,
                )));
            }
        }
        if !opts.has("backing_fmt") {
            // qemu-img probes the backing file to say what it found (unless -u).
            let found = if a.unsafe_backing {
                String::new()
            } else {
                vimg::Image::open(backing_path(&filename, b), &backing_open_options(None))
                    .map(|i| format!("\nDetected format of {}.", i.format().name()))
                    .unwrap_or_default()
            };
            return Err(named(Failure::new(
                format!("Backing file specified without backing format{found}"),
                1,
            )));
        }
    }
    let size = match (
        size,
        opts.get_size("size").map_err(|e| named(Failure::from(e)))?,
        &a.backing,
    ) {
        (Some(s), _, _) | (None, Some(s), _) => Some(s),
        (None, None, Some(b)) => {
            // The size of the backing image, which the user named directly.
            let path = backing_path(&filename, b);
            let bf = parse_format_opt(a.backing_format.as_deref())?;
            let img = vimg::Image::open(&path, &backing_open_options(bf))
                .map_err(|e| Failure::open(&path.display().to_string(), &e))?;
            Some(img.virtual_size())
        }
        (None, None, None) => None,
    };
    // Option names and types were checked above and the size is known: what qemu-img
    // checks before it prints "Formatting ...". The format's own checks (cluster size,
    // refcount width) come after the line, as in qemu-img.
    let Some(size) = size else {
        return Err(named(Failure::new(
            "Image creation needs a size parameter",
            1,
        )));
    };
    let size = Some(size);
    if !a.quiet {
        let line = formatting_line(&filename, format, &opts, size)?;
        crate::print_out(&format!("{line}\n"))?;
    }
    vimg::create(file_path(&filename), format, size, &opts)
        .map_err(|e| Failure::new(format!("{filename}: {}", e.message()), 1))?;
    Ok(0)
}

/// How `create` opens the backing file it checks or takes the size of: without its own
/// backing chain, and for metadata only, as qemu-img opens it (no I/O), so an encrypted
/// backing file needs no secret (iotests 189, 198).
fn backing_open_options(format: Option<vimg::Format>) -> vimg::OpenOptions {
    let mut o = vimg::OpenOptions::with_format(format).open_backing(false);
    o.metadata_only = true;
    o
}

/// The file a command-line image name creates: qemu's `file:` protocol prefix names the
/// path after it (`file:a:b.qcow2` is `a:b.qcow2`; iotest 126).
fn file_path(filename: &str) -> &str {
    filename
        .strip_prefix("file:")
        .filter(|p| !p.is_empty())
        .unwrap_or(filename)
}

/// Where a backing name given for a new image points: next to the image unless absolute.
fn backing_path(filename: &str, backing: &str) -> std::path::PathBuf {
    // A `json:` name is options, not a path (qemu-img opens it as it is).
    if backing.starts_with("json:") {
        return backing.into();
    }
    std::path::Path::new(file_path(filename))
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| p.join(backing))
        .unwrap_or_else(|| backing.into())
}

/// The line qemu-img create prints before it creates the image: its options in QEMU's order,
/// defaults included, sizes in bytes, other values as given; options only vimg has follow.
fn formatting_line(
    filename: &str,
    format: vimg::Format,
    opts: &vimg::CreateOptions,
    size: Option<u64>,
) -> Result<String, Failure> {
    let specs = vimg::formats::registry::all_options(format);
    let value = |k: &str| -> Result<Option<String>, Failure> {
        if k == "size" {
            return Ok(size.map(|s| s.to_string()));
        }
        let is_size = specs
            .iter()
            .any(|s| s.name == k && s.ty == vimg::options::OptionType::Size);
        let is_number = specs
            .iter()
            .any(|s| s.name == k && s.ty == vimg::options::OptionType::Number);
        if is_size {
            Ok(opts
                .get_size(k)
                .map_err(Failure::from)?
                .map(|n| n.to_string()))
        } else if is_number {
            // As QEMU prints a number option: signed decimal (`-1` stays `-1`).
            Ok(opts
                .get_number(k)
                .map_err(Failure::from)?
                .map(|n| (n as i64).to_string()))
        } else {
            // QEMU prints a string option with its commas doubled (as an option string
            // spells them): `backing_file=json:{"a":1,,"b":2}`.
            Ok(opts.get_str(k).map(|v| v.replace(',', ",,")))
        }
    };
    let order = format.driver().capabilities().printed;
    let listed = |k: &str| order.iter().any(|o| o.name == k);
    let mut line = format!("Formatting '{filename}', fmt={}", format.name());
    for o in order {
        if let Some(v) = value(o.name)?.or_else(|| o.default.map(str::to_string)) {
            line.push_str(&format!(" {}={v}", o.name));
        }
    }
    // The file protocol's options follow the format's, in QEMU's order.
    let protocol = vimg::formats::PROTOCOL_PRINTED.iter().map(|o| o.name);
    for k in protocol.clone().filter(|k| *k != "size" && !listed(k)) {
        if let Some(v) = value(k)? {
            line.push_str(&format!(" {k}={v}"));
        }
    }
    for k in opts.keys() {
        if k != "size" && !listed(k) && !protocol.clone().any(|p| p == k) {
            line.push_str(&format!(" {k}={}", value(k)?.unwrap_or_default()));
        }
    }
    Ok(line)
}

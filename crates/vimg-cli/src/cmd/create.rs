//! `vimg create`: qemu-img create's command line.

use super::{parse_create_options, parse_format, parse_format_opt};
use crate::args::CreateArgs;
use crate::{CmdResult, Failure};

pub fn run(a: CreateArgs) -> CmdResult {
    let format = parse_format(&a.format)?;
    if super::wants_help(&a.options) {
        super::print_option_help(format)?;
        return Ok(0);
    }
    let Some(filename) = a.filename.clone() else {
        return Err(Failure::new("Expecting image file name", 1));
    };
    let mut opts = parse_create_options(&a.options)?;
    if let Some(b) = &a.backing {
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
    let size = match (
        size,
        opts.get_size("size").map_err(Failure::from)?,
        &a.backing,
    ) {
        (Some(s), _, _) | (None, Some(s), _) => Some(s),
        (None, None, Some(b)) => {
            // The size of the backing image, which the user named directly.
            let path = std::path::Path::new(&filename)
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(|p| p.join(b))
                .unwrap_or_else(|| b.into());
            let bf = parse_format_opt(a.backing_format.as_deref())?;
            let img = vimg::Image::open(
                &path,
                &vimg::OpenOptions {
                    format: bf,
                    open_backing: false,
                    ..vimg::OpenOptions::default()
                },
            )
            .map_err(|e| Failure::open(&path.display().to_string(), &e))?;
            Some(img.virtual_size())
        }
        (None, None, None) => None,
    };
    if !a.quiet {
        let mut line = format!("Formatting '{filename}', fmt={}", format.name());
        for k in opts.keys() {
            if k != "size" {
                line.push_str(&format!(" {k}={}", opts.get_str(k).unwrap_or("")));
            }
        }
        if let Some(s) = size {
            line.push_str(&format!(" size={s}"));
        }
        crate::print_out(&format!("{line}\n"))?;
    }
    vimg::create(&filename, format, size, &opts)
        .map_err(|e| Failure::new(format!("{filename}: {e}"), 1))?;
    Ok(0)
}

//! `vimg measure`: qemu-img measure's output and refusals (vimg also measures vpc and vhdx).

use serde_json::{Map, Value};
use vimg::Image;

use super::{open_options, parse_create_options, parse_format, parse_format_opt};
use crate::args::{MeasureArgs, OutputFormat};
use crate::human::qemu_json;
use crate::{CmdResult, Failure};

/// In qemu-img's order: the size, the source image, the output format, whether it is
/// created at all, its options, whether it is measured.
pub fn run(a: MeasureArgs) -> CmdResult {
    if super::wants_help(&a.options) {
        super::print_option_help(parse_format(&a.out_format)?, None)?;
        return Ok(0);
    }
    let mut opts = parse_create_options(&a.options)?;
    let size = match &a.size {
        Some(s) => Some(
            vimg::options::parse_size(s)
                .map_err(|_| Failure::new(format!("Invalid image size specified: '{s}'."), 1))?,
        ),
        None => None,
    };
    if size.is_some() == a.filename.is_some() {
        return Err(Failure::new(
            "Either --size N or one filename must be specified.",
            1,
        ));
    }
    let image = match &a.filename {
        Some(f) => {
            let fmt = parse_format_opt(a.format.as_deref())?;
            Some(Image::open(f, &open_options(fmt, &a.safety)).map_err(|e| Failure::open(f, &e))?)
        }
        None => None,
    };
    let out_format = parse_format(&a.out_format)?;
    if !out_format.driver().create_options().is_empty() {
        opts.check_for(out_format).map_err(|e| {
            let name = out_format.name();
            let again = crate::trust::prefix();
            let msg = format!(
                "{}\n{again}: Invalid options for file format '{name}'",
                e.message()
            );
            Failure::new(msg, 1)
        })?;
    }
    let m = vimg::measure(out_format, &opts, size, image.as_ref())?;
    let text = match a.output {
        OutputFormat::Json => {
            let mut obj = Map::new();
            if let Some(b) = m.bitmaps {
                obj.insert("bitmaps".into(), b.into());
            }
            obj.insert("required".into(), m.required.into());
            obj.insert("fully-allocated".into(), m.fully_allocated.into());
            qemu_json(&Value::Object(obj))
        }
        OutputFormat::Human => {
            let mut s = format!(
                "required size: {}\nfully allocated size: {}\n",
                m.required, m.fully_allocated
            );
            if let Some(b) = m.bitmaps {
                s.push_str(&format!("bitmaps size: {b}\n"));
            }
            s
        }
    };
    crate::print_out(&text)?;
    Ok(0)
}

//! `vimg map`: qemu-img map's human table and JSON array.

use vimg::Extent;
use vimg::Image;

use super::{open_options, parse_format_opt};
use crate::args::{MapArgs, OutputFormat};
use crate::{CmdResult, Failure};

pub fn run(a: MapArgs) -> CmdResult {
    let fmt = parse_format_opt(a.format.as_deref())?;
    let image = Image::open(&a.filename, &open_options(fmt, &a.safety))
        .map_err(|e| Failure::open(&a.filename, &e))?;
    let parse = |s: &Option<String>, what: &str| -> Result<Option<u64>, Failure> {
        s.as_deref()
            .map(|v| {
                vimg::options::parse_size(v)
                    .map_err(|_| Failure::new(format!("Invalid {what} specified: '{v}'"), 1))
            })
            .transpose()
    };
    let start = parse(&a.start_offset, "start offset")?.unwrap_or(0);
    let len = parse(&a.max_length, "max length")?;
    let entries = vimg::map_range(&image, start, len).collect::<vimg::Result<Vec<_>>>()?;
    let text = match a.output {
        OutputFormat::Json => json(&entries),
        OutputFormat::Human => human(&entries)?,
    };
    crate::print_out(&text)?;
    Ok(0)
}

/// qemu-img's JSON: one object per line, in an array.
fn json(entries: &[Extent]) -> String {
    let lines: Vec<String> = entries
        .iter()
        .map(|e| {
            let mut s = format!(
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
            );
            if let Some(o) = e.offset {
                s.push_str(&format!(", \"offset\": {o}"));
            }
            s.push('}');
            s
        })
        .collect();
    format!("[{}]\n", lines.join(",\n"))
}

fn hex(n: u64) -> String {
    // C's %#x prints 0 without the prefix.
    if n == 0 {
        "0".into()
    } else {
        format!("{n:#x}")
    }
}

/// qemu-img's human table: data runs with their host offset and file.
fn human(entries: &[Extent]) -> Result<String, Failure> {
    let mut s = format!(
        "{:<16}{:<16}{:<16}{}\n",
        "Offset", "Length", "Mapped to", "File"
    );
    for e in entries {
        if e.data && e.offset.is_none() {
            // qemu-img prints the table up to here, then fails.
            crate::print_out(&s)?;
            return Err(Failure::new(
                "File contains external, encrypted or compressed clusters.",
                1,
            ));
        }
        if e.data && !e.zero {
            s.push_str(&format!(
                "{:<16}{:<16}{:<16}{}\n",
                hex(e.start),
                hex(e.length),
                hex(e.offset.unwrap_or(0)),
                e.filename
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ));
        }
    }
    Ok(s)
}

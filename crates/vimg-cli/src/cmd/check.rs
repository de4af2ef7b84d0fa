//! `vimg check`: metadata consistency, with qemu-img check's output and exit codes
//! (0 clean, 1 check not completed, 2 corruptions, 3 leaks only, 63 unsupported).
//!
//! An image whose reader refuses it at open because its tables are corrupt is reported as
//! corrupt (one corruption, the reader's error as its message, exit 2); see
//! [`vimg::check`]. Other open errors exit 1 with qemu-img's "Could not open" message.

use serde_json::{Map, Value};
use vimg::CheckReport;
use vimg::{ErrorKind, Format, Image};

use super::{open_options, parse_format_opt};
use crate::args::{CheckArgs, OutputFormat};
use crate::human::qemu_json;
use crate::{CmdResult, Failure};

pub fn run(a: CheckArgs) -> CmdResult {
    if a.repair.is_some() {
        return super::repair::run(a);
    }
    let format = parse_format_opt(a.format.as_deref())?;
    let mut opts = open_options(format, &a.safety);
    opts.open_backing = false;
    let (report, format) = match Image::open(&a.filename, &opts) {
        Ok(image) => match image.reader().check() {
            Ok(r) => (r, image.format()),
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                return Err(Failure::new(e.message().to_string(), 63));
            }
            Err(e) => {
                return Err(Failure::new(
                    format!("Check of '{}' failed: {}", a.filename, e.message()),
                    1,
                ))
            }
        },
        // Refused at open for corrupt tables: that is the check's finding.
        Err(e) => match CheckReport::from_open_error(&e) {
            Some(r) => (r, format.unwrap_or_else(|| probed_format(&a.filename))),
            // A snapshot table past QEMU's limits: qemu-img's check says why it cannot
            // read it (and how to repair it) and fails.
            None if format.is_none_or(|f| f == Format::Qcow2) => {
                return match snapshot_table_failure(&a.filename) {
                    Some(f) => Err(f),
                    None => Err(Failure::open(&a.filename, &e)),
                }
            }
            // Too broken to open otherwise: qemu-img reports it and exits 1.
            None => return Err(Failure::open(&a.filename, &e)),
        },
    };
    report_and_exit(&a, &report, format, false)
}

/// qemu-img check's lines for a qcow2 image whose snapshot table it cannot read (the
/// first one prefixed as an error, its hint as is), and its failure.
pub(crate) fn snapshot_table_failure(filename: &str) -> Option<Failure> {
    if probed_format(filename) != Format::Qcow2 {
        return None;
    }
    let lines =
        vimg::formats::qcow2::check_snapshots::check_failure(std::path::Path::new(filename))?;
    for (i, l) in lines.iter().enumerate() {
        if i == 0 {
            eprintln!("{}: {l}", crate::trust::prefix());
        } else {
            eprintln!("{l}");
        }
    }
    Some(Failure::new("Check failed: File too large", 1))
}

/// The format of an image that failed to open, for the report: what its content probes as.
fn probed_format(filename: &str) -> Format {
    vimg::storage::FileStorage::open(filename)
        .ok()
        .and_then(|s| vimg::formats::registry::probe(&s).ok())
        .unwrap_or(Format::Raw)
}

/// Prints `report` (its messages too, unless `printed` says they are out already) and
/// returns qemu-img check's exit code.
pub(crate) fn report_and_exit(
    a: &CheckArgs,
    report: &CheckReport,
    format: Format,
    printed: bool,
) -> CmdResult {
    if !a.quiet && !printed {
        for m in report.messages.iter().chain(report.omitted_line().iter()) {
            eprintln!("{m}");
        }
    }
    match a.output {
        OutputFormat::Json => {
            let mut m = Map::new();
            if let Ok(Value::Object(fields)) = serde_json::to_value(report) {
                for (k, v) in fields {
                    m.insert(k, v);
                }
            }
            m.insert("filename".into(), Value::String(a.filename.clone()));
            m.insert("format".into(), Value::String(format.name().into()));
            crate::print_out(&qemu_json(&Value::Object(m)))?;
        }
        OutputFormat::Human => {
            if !a.quiet {
                crate::print_out(&human(report))?;
            }
        }
    }
    Ok(if report.check_errors > 0 {
        1
    } else if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    })
}

/// qemu-img check's human summary.
fn human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if let (Some(total), Some(alloc)) = (r.total_clusters, r.allocated_clusters) {
        if total != 0 && alloc != 0 {
            let frag = r.fragmented_clusters.unwrap_or(0);
            let comp = r.compressed_clusters.unwrap_or(0);
            s.push_str(&format!(
                "{alloc}/{total} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
                alloc as f64 * 100.0 / total as f64,
                frag as f64 * 100.0 / alloc as f64,
                comp as f64 * 100.0 / alloc as f64
            ));
        }
    }
    if let Some(end) = r.image_end_offset.filter(|e| *e != 0) {
        s.push_str(&format!("Image end offset: {end}\n"));
    }
    s
}

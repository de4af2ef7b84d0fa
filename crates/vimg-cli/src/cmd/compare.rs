//! `vimg compare`: qemu-img compare's messages and exit codes (0 identical, 1 different,
//! 2 open error, 4 read error).

use std::io::Write;

use vimg::Image;
use vimg::{compare, Comparison};

use super::{open_options, parse_format_opt};
use crate::args::CompareArgs;
use crate::{CmdResult, Failure};

pub fn run(a: CompareArgs) -> CmdResult {
    let fa = parse_format_opt(a.format_a.as_deref()).map_err(|f| Failure::new(f.message, 2))?;
    let fb = parse_format_opt(a.format_b.as_deref()).map_err(|f| Failure::new(f.message, 2))?;
    let open = |name: &str, f| {
        Image::open(name, &open_options(f, &a.safety))
            .map_err(|e| Failure::new(Failure::open(name, &e).message, 2))
    };
    let ia = open(&a.a, fa)?;
    let ib = open(&a.b, fb)?;
    let progress = a.progress && !a.quiet;
    let mut last = -1i64;
    let mut on_progress = |done: u64, total: u64| {
        if progress {
            let pct = if total == 0 {
                100.0
            } else {
                done as f64 * 100.0 / total as f64
            };
            if pct as i64 != last {
                last = pct as i64;
                let mut out = std::io::stdout().lock();
                let _ = write!(out, "    ({pct:3.2}/100%)\r");
                let _ = out.flush();
            }
        }
    };
    let report = match compare(&ia, &ib, a.strict, &mut on_progress) {
        Ok(r) => r,
        Err(e) => match e.message().downcast_ref::<vimg::CompareReadError>() {
            // qemu-img's words; its size warning goes to stdout, which it flushes at exit,
            // after the error on stderr.
            Some(r) => {
                eprintln!("{}: {}", crate::trust::prefix(), r);
                if r.size_warning && !a.quiet {
                    crate::print_out("Warning: Image size mismatch!\n")?;
                }
                return Ok(4);
            }
            None => {
                return Err(Failure::new(
                    format!("Error while reading: {}", e.message()),
                    4,
                ))
            }
        },
    };
    let mut text = String::new();
    if progress {
        text.push_str("    (100.00/100%)\r\n");
    }
    if report.size_warning {
        text.push_str("Warning: Image size mismatch!\n");
    }
    let code = match report.result {
        Comparison::Identical => {
            text.push_str("Images are identical.\n");
            0
        }
        Comparison::SizeMismatch => {
            text.push_str("Strict mode: Image size mismatch!\n");
            1
        }
        Comparison::StatusMismatch(off) => {
            text.push_str(&format!(
                "Strict mode: Offset {off} block status mismatch!\n"
            ));
            1
        }
        Comparison::Mismatch(off) => {
            text.push_str(&format!("Content mismatch at offset {off}!\n"));
            1
        }
        // `Comparison` is non-exhaustive; an outcome this binary does not know is an error
        // (qemu-img's exit code 2), never "identical".
        other => {
            return Err(Failure::new(
                format!("compare: unknown outcome {other:?}"),
                2,
            ))
        }
    };
    if !a.quiet {
        crate::print_out(&text)?;
    }
    Ok(code)
}

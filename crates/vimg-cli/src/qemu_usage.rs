//! qemu-img's words for a bad command line, in qemu-img compatibility mode.
//!
//! qemu-img parses each subcommand's options with getopt, so an unknown option, a missing
//! option argument or a missing file name come out as getopt's and qemu-img's own lines
//! ("qemu-img info: invalid option -- 'x'", "qemu-img: Expecting one image file name"),
//! followed by "Try 'qemu-img SUB --help' for more info", exit status 1. Scripts and QEMU's
//! iotests match on that text; clap words the same conditions its own way. Under its own
//! name vimg keeps clap's (longer, with a usage line and suggestions).

use clap::error::{ContextKind, ContextValue, Error, ErrorKind};

/// qemu-img's message for a clap parse error of `argv` (the whole command line, program
/// name first), or None where vimg keeps clap's.
pub fn message(e: &Error, argv: &[String]) -> Option<String> {
    let sub = argv.iter().skip(1).find(|a| !a.starts_with('-'))?.as_str();
    let body = match e.kind() {
        ErrorKind::UnknownArgument => {
            let arg = context(e, ContextKind::InvalidArg)?;
            if let Some(long) = arg.strip_prefix("--") {
                // getopt names the word as typed, `=value` included.
                let typed = argv
                    .iter()
                    .skip(1)
                    .find(|a| {
                        a.strip_prefix("--")
                            .is_some_and(|w| w == long || w.starts_with(&format!("{long}=")))
                    })
                    .map(String::as_str)
                    .unwrap_or(arg.as_str());
                format!("qemu-img {sub}: unrecognized option '{typed}'")
            } else if let Some(short) = arg.strip_prefix('-') {
                format!("qemu-img {sub}: invalid option -- '{short}'")
            } else {
                // A word too many.
                format!("qemu-img: {}", operands_message(sub, Some(&arg))?)
            }
        }
        ErrorKind::MissingRequiredArgument => {
            format!("qemu-img: {}", operands_message(sub, None)?)
        }
        ErrorKind::InvalidValue | ErrorKind::NoEquals => {
            let arg = context(e, ContextKind::InvalidArg)?;
            let name = arg.split([' ', '=']).next().unwrap_or(&arg).to_string();
            let value = context(e, ContextKind::InvalidValue).unwrap_or_default();
            if value.is_empty() {
                // The option was the last word, with nothing after it. getopt names it as
                // typed: the long or the short spelling.
                let typed = argv.last().map(String::as_str).unwrap_or("");
                match typed.strip_prefix("--") {
                    Some(_) => format!("qemu-img {sub}: option '{typed}' requires an argument"),
                    None => {
                        let short = typed
                            .strip_prefix('-')
                            .and_then(|s| s.chars().last())
                            .or_else(|| name.strip_prefix('-').and_then(|s| s.chars().next()))?;
                        format!("qemu-img {sub}: option requires an argument -- '{short}'")
                    }
                }
            } else if name == "--output" {
                format!("qemu-img: --output expects 'human' or 'json' not '{value}'")
            } else {
                return None;
            }
        }
        _ => return None,
    };
    Some(format!("{body}\nTry 'qemu-img {sub} --help' for more info"))
}

/// qemu-img's message when a subcommand gets too few or too many operands (`extra`: the
/// first word too many, if that was the error).
fn operands_message(sub: &str, extra: Option<&str>) -> Option<String> {
    Some(match sub {
        "info" | "check" | "map" | "snapshot" | "amend" | "commit" | "rebase" => {
            "Expecting one image file name".to_string()
        }
        "compare" => "Expecting two image file names".to_string(),
        "resize" => "Expecting image file name and size".to_string(),
        "create" => match extra {
            Some(x) => format!("Unexpected argument: {x}"),
            None => "Expecting image file name".to_string(),
        },
        _ => return None,
    })
}

fn context(e: &Error, kind: ContextKind) -> Option<String> {
    match e.get(kind)? {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(v) => v.first().cloned(),
        other => Some(other.to_string()),
    }
}

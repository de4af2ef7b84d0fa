//! `vimg bitmap`: qemu-img bitmap's command line for qcow2 persistent dirty bitmaps
//! (`--add [-g GRANULARITY]`, `--remove`, `--clear`, `--enable`, `--disable`,
//! `--merge SOURCE [-b FILE]`), applied in command-line order, each a crash-safe change
//! (`vimg::formats::qcow2::Qcow2Update::bitmap`), with qemu-img's messages.

use std::path::Path;

use clap::Args;
use vimg::formats::qcow2::BitmapOp;
use vimg::formats::updater::{self, UpdateOp};
use vimg::Image;

use super::{open_options, parse_format_opt};
use crate::args::SafetyArgs;
use crate::{CmdResult, Failure};

#[derive(Args, Debug)]
pub struct BitmapArgs {
    /// Create the bitmap (enabled; empty).
    #[arg(long = "add")]
    pub add: bool,
    /// Delete the bitmap.
    #[arg(long = "remove")]
    pub remove: bool,
    /// Clear every bit.
    #[arg(long = "clear")]
    pub clear: bool,
    /// Let the bitmap record writes.
    #[arg(long = "enable")]
    pub enable: bool,
    /// Stop the bitmap recording writes.
    #[arg(long = "disable")]
    pub disable: bool,
    /// Set every bit that is set in bitmap SOURCE (of this image, or of -b's).
    #[arg(long = "merge", value_name = "SOURCE")]
    pub merge: Vec<String>,
    /// The qcow2 image holding --merge's source (opened read-only).
    #[arg(short = 'b', long = "source-file", value_name = "SOURCE_FILE")]
    pub source_file: Option<String>,
    /// Format of -b's image.
    #[arg(short = 'F', long = "source-format", value_name = "SOURCE_FMT")]
    pub source_fmt: Option<String>,
    /// Bytes per bit of a new bitmap (--add): a power of two from 512 to 2G.
    #[arg(short = 'g', long = "granularity", value_name = "GRANULARITY")]
    pub granularity: Option<String>,
    /// Image format (probed from the content when absent).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Quiet (nothing is printed on success anyway).
    #[arg(short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub safety: SafetyArgs,
    /// The image.
    pub filename: String,
    /// The bitmap's name.
    pub bitmap: String,
}

/// The actions in the order the command line gives them (qemu-img applies them so).
fn ordered_ops(a: &BitmapArgs, g: Option<u64>) -> Vec<(&'static str, BitmapOp)> {
    let mut merges = a.merge.iter();
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1).peekable();
    while let Some(arg) = args.next() {
        let op = match arg.as_str() {
            "--add" => ("add", BitmapOp::Add { granularity: g }),
            "--remove" => ("remove", BitmapOp::Remove),
            "--clear" => ("clear", BitmapOp::Clear),
            "--enable" => ("enable", BitmapOp::Enable),
            "--disable" => ("disable", BitmapOp::Disable),
            s if s == "--merge" || s.starts_with("--merge=") => {
                if s == "--merge" {
                    args.next();
                }
                match merges.next() {
                    Some(m) => ("merge", BitmapOp::Merge(m.clone())),
                    None => continue,
                }
            }
            _ => continue,
        };
        out.push(op);
    }
    let flags = usize::from(a.add)
        + usize::from(a.remove)
        + usize::from(a.clear)
        + usize::from(a.enable)
        + usize::from(a.disable)
        + a.merge.len();
    if out.len() == flags {
        return out;
    }
    // The arguments did not come from this process's command line: a fixed order.
    let mut out = Vec::new();
    if a.add {
        out.push(("add", BitmapOp::Add { granularity: g }));
    }
    for m in &a.merge {
        out.push(("merge", BitmapOp::Merge(m.clone())));
    }
    for (on, name, op) in [
        (a.clear, "clear", BitmapOp::Clear),
        (a.enable, "enable", BitmapOp::Enable),
        (a.disable, "disable", BitmapOp::Disable),
        (a.remove, "remove", BitmapOp::Remove),
    ] {
        if on {
            out.push((name, op));
        }
    }
    out
}

pub fn run(a: BitmapArgs) -> CmdResult {
    let usage = |msg: &str| {
        Failure::new(
            format!(
                "{msg}\nTry '{} bitmap --help' for more info",
                crate::trust::prefix()
            ),
            1,
        )
    };
    if !(a.add || a.remove || a.clear || a.enable || a.disable || !a.merge.is_empty()) {
        return Err(Failure::new(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
            1,
        ));
    }
    if a.granularity.is_some() && !a.add {
        return Err(Failure::new("granularity only supported with --add", 1));
    }
    if a.source_fmt.is_some() && a.source_file.is_none() {
        return Err(Failure::new("-F only supported with -b", 1));
    }
    if a.source_file.is_some() && a.merge.is_empty() {
        return Err(Failure::new(
            "Merge bitmap source file only supported with --merge",
            1,
        ));
    }
    let g = match &a.granularity {
        None => None,
        Some(s) => Some(
            vimg::options::parse_size(s)
                .map_err(|_| usage(&format!("Invalid granularity specified: '{s}'")))?,
        ),
    };
    let format = parse_format_opt(a.format.as_deref())?;
    let mut opts = open_options(format, &a.safety);
    opts.open_backing = false;
    let image = Image::open(&a.filename, &opts).map_err(|e| Failure::open(&a.filename, &e))?;
    let ops = ordered_ops(&a, g);
    let fail = |op: &str, msg: String| {
        Failure::new(
            format!("Operation {op} on bitmap {} failed: {msg}", a.bitmap),
            1,
        )
    };
    let format = image.format();
    if a.format.is_none() {
        super::warn_if_probed_raw(&a.filename, format);
    }
    if let Err(e) = updater::require(format, UpdateOp::Bitmap) {
        let op = ops.first().map_or("add", |o| o.0);
        return Err(fail(
            op,
            format!(
                "Can't store persistent bitmaps to '{}': {}",
                a.filename,
                e.message()
            ),
        ));
    }
    // -b: the sources are bitmaps of another image (read-only), unless it is this one.
    let mut ops = ops;
    if let Some(src) = &a.source_file {
        let same = std::fs::canonicalize(src).ok() == std::fs::canonicalize(&a.filename).ok();
        for (_, op) in ops.iter_mut() {
            let BitmapOp::Merge(name) = op else { continue };
            let no_bitmaps =
                |f: &str| !vimg::Format::from_name(f).is_some_and(|f| updater::caps(f).bitmaps);
            if a.source_fmt.as_deref().is_some_and(no_bitmaps) {
                return Err(fail("merge", format!("Dirty bitmap '{name}' not found")));
            }
            if !same {
                *op = BitmapOp::MergeFrom {
                    file: src.into(),
                    source: name.clone(),
                };
            }
        }
    }
    let policy = crate::trust::policy(&a.safety);
    let mut img = updater::open(Path::new(&a.filename), format, policy)
        .map_err(|e| Failure::open(&a.filename, &e))?;
    for (name, op) in &ops {
        img.bitmap(&a.bitmap, op)
            .map_err(|e| fail(name, e.message().to_string()))?;
    }
    Ok(0)
}

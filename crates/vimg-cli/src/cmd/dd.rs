//! `vimg dd`: qemu-img dd's command line. `bs=`, `count=`, `skip=`, `if=`, `of=` operands
//! (the last of a repeated one wins), `-f`, `-O`. As qemu-img does: the copied range is
//! `[skip*bs, min(count*bs, input size))` (count counts from the start of the input, not
//! from `skip`: qemu-img's arithmetic, kept so the bytes match), and the output is a new
//! image of that many bytes, rounded up to a sector, created like convert creates its
//! target (temporary file and rename; devices written in place). A skip past the end
//! warns "cannot skip to specified offset" and writes an empty image.
//!
//! The copy is convert's: the source is opened as convert opens it and a window of it
//! ([`vimg::Image::window`]) goes through the same engine.

use std::path::PathBuf;

use clap::Args;
use vimg::output::OutputMode;
use vimg::{ConvertOptions, Format, Image, Source};

use super::open_options;
use crate::args::SafetyArgs;
use crate::{CmdResult, Failure};

#[derive(Args, Debug)]
pub struct DdArgs {
    /// Input image format (probed from the content when absent).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Output image format (raw when absent).
    #[arg(short = 'O', value_name = "OUTPUT_FMT")]
    pub out_format: Option<String>,
    #[command(flatten)]
    pub safety: SafetyArgs,
    /// Operands: bs=BLOCK_SIZE (default 512), count=BLOCKS, skip=BLOCKS, if=INPUT,
    /// of=OUTPUT.
    #[arg(value_name = "OPERAND")]
    pub operands: Vec<String>,
}

/// The operands, parsed.
#[derive(Debug, Default)]
struct Operands {
    bs: Option<u64>,
    count: Option<u64>,
    skip: Option<u64>,
    input: Option<String>,
    output: Option<String>,
}

const BS_MAX: u64 = i32::MAX as u64;
const SECTOR: u64 = 512;

/// `bs=`: a size as qemu-img's `qemu_strtosz` reads it (suffixes, a fraction, hex), 1 to
/// `INT_MAX` bytes.
fn parse_bs(v: &str) -> Result<u64, Failure> {
    let range = || {
        Failure::new(
            format!("Invalid bs specified. Must be between 1 and {BS_MAX}."),
            1,
        )
    };
    let invalid = || Failure::new(format!("Invalid bs specified: '{v}'."), 1);
    let t = v.trim_start();
    if t.starts_with('-') {
        return Err(range());
    }
    let n = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        u64::from_str_radix(hex, 16).map_err(|_| range())?
    } else {
        match vimg::options::parse_size(t) {
            Ok(n) => n,
            Err(vimg::options::SizeError::TooLarge(_)) => return Err(range()),
            Err(_) => return Err(invalid()),
        }
    };
    if n == 0 || n > BS_MAX {
        return Err(range());
    }
    Ok(n)
}

/// `count=` / `skip=`: an integer as C's `strtoll` with base 0 reads it (`0x` hex, a
/// leading `0` octal), the whole operand, 0 to `INT64_MAX`.
fn parse_blocks(what: &str, v: &str) -> Result<u64, Failure> {
    let invalid = || Failure::new(format!("Invalid {what} specified: '{v}'."), 1);
    let range = || {
        Failure::new(
            format!(
                "Invalid {what} specified. Must be between 0 and {}.",
                i64::MAX
            ),
            1,
        )
    };
    let t = v.trim_start();
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(invalid());
    }
    // Digits only: the one failure left is overflow.
    let n = u64::from_str_radix(digits, radix).map_err(|_| range())?;
    if n > i64::MAX as u64 || (neg && n != 0) {
        return Err(range());
    }
    Ok(n)
}

fn parse_operands(list: &[String]) -> Result<Operands, Failure> {
    let mut o = Operands::default();
    for arg in list {
        let (key, value) = arg.split_once('=').unwrap_or((arg.as_str(), ""));
        match (key, arg.contains('=')) {
            ("bs", true) => o.bs = Some(parse_bs(value)?),
            ("count", true) => o.count = Some(parse_blocks("count", value)?),
            ("skip", true) => o.skip = Some(parse_blocks("skip", value)?),
            ("if", true) => o.input = Some(value.to_string()),
            ("of", true) => o.output = Some(value.to_string()),
            _ => return Err(Failure::new(format!("unrecognized operand {key}"), 1)),
        }
    }
    Ok(o)
}

/// The guest range dd copies out of an input of `size` bytes: `(start, len)`, and whether
/// the skip went past the end (qemu-img warns then and copies nothing).
fn copy_range(size: u64, o: &Operands) -> (u64, u64, bool) {
    let bs = o.bs.unwrap_or(SECTOR);
    let mut end = size;
    if let Some(n) = o.count.and_then(|c| c.checked_mul(bs)) {
        if n <= i64::MAX as u64 {
            end = end.min(n);
        }
    }
    match o.skip {
        None => (0, end, false),
        Some(s) => match s.checked_mul(bs).filter(|&b| b <= i64::MAX as u64) {
            Some(start) if start <= end => (start, end - start, false),
            _ => (0, 0, true),
        },
    }
}

pub fn run(a: DdArgs) -> CmdResult {
    let o = parse_operands(&a.operands)?;
    let (Some(input), Some(output)) = (o.input.clone(), o.output.clone()) else {
        return Err(Failure::new("Must specify both input and output files", 1));
    };
    let src_format = match a.format.as_deref() {
        None => None,
        Some(name) => Some(Format::from_name(name).ok_or_else(|| {
            Failure::new(
                format!("Could not open '{input}': Unknown driver '{name}'"),
                1,
            )
        })?),
    };
    let open = open_options(src_format, &a.safety);
    let src = Image::open_source(&Source::from_arg(&input), &open)
        .map_err(|e| Failure::open(&input, &e))?;
    let out_format = match a.out_format.as_deref() {
        None => Format::Raw,
        Some(name) => {
            Format::from_name(name).ok_or_else(|| Failure::new("Unknown file format", 1))?
        }
    };
    for w in src.chain().iter().flat_map(|l| l.reader().warnings()) {
        eprintln!("{}: warning: {w}", crate::trust::prefix());
    }
    let (start, len, past_end) = copy_range(src.virtual_size(), &o);
    if past_end {
        eprintln!(
            "{}: {input}: cannot skip to specified offset",
            crate::trust::prefix()
        );
    }
    let size = len.div_ceil(SECTOR) * SECTOR;
    let window = src.window(start, len, size).map_err(Failure::from)?;
    let dst = PathBuf::from(&output);
    if output.is_empty() {
        return Err(Failure::new(
            ": error while creating output image: Could not create '': No such file or directory",
            1,
        ));
    }
    // A folder that is not there: qemu-img's words (the copy would fail on its temporary).
    let folder = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !folder.is_dir() {
        return Err(Failure::new(
            format!(
                "{output}: error while creating output image: Could not create '{output}': No such file or directory"
            ),
            1,
        ));
    }
    vimg::output::check_destination(&dst).map_err(|e| {
        Failure::new(
            format!(
                "{output}: error while creating output image: {}",
                e.message()
            ),
            1,
        )
    })?;
    let mut opts = ConvertOptions::new(out_format);
    opts.output_mode = OutputMode::Atomic;
    opts.copy.mapped_reads = true;
    opts.copy.cancel = Some(crate::signals::install_cancel_flag());
    vimg::convert_report(&window, &dst, &opts).map_err(|e| match e.path() {
        Some(p) if p != dst => Failure::new(
            format!("Could not open '{}': {}", p.display(), e.message()),
            1,
        ),
        _ if e.kind() == vimg::ErrorKind::Cancelled => {
            Failure::new("interrupted; no output was written", 130)
        }
        _ => Failure::new(
            format!(
                "{output}: error while copying to output image: {}",
                e.message()
            ),
            1,
        ),
    })?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_as_strtoll_reads_them() {
        assert_eq!(parse_blocks("count", "010").ok(), Some(8));
        assert_eq!(parse_blocks("count", "0x10").ok(), Some(16));
        assert_eq!(parse_blocks("count", "+5").ok(), Some(5));
        assert_eq!(parse_blocks("count", "0").ok(), Some(0));
        assert!(parse_blocks("count", "1k").is_err());
        assert!(parse_blocks("count", "").is_err());
        assert!(parse_blocks("count", "-1")
            .err()
            .is_some_and(|f| f.message.contains("Must be between")));
        assert!(parse_blocks("count", "99999999999999999999")
            .err()
            .is_some_and(|f| f.message.contains("Must be between")));
        assert_eq!(parse_bs("1k").ok(), Some(1024));
        assert_eq!(parse_bs("0x200").ok(), Some(512));
        assert!(parse_bs("0").is_err());
        assert!(parse_bs("3G")
            .err()
            .is_some_and(|f| f.message.contains("Must be between")));
    }

    #[test]
    fn count_counts_from_the_start_as_qemu_img_does() {
        let o = Operands {
            bs: Some(4096),
            count: Some(100),
            skip: Some(10),
            ..Operands::default()
        };
        assert_eq!(copy_range(1 << 20, &o), (40960, 368640, false));
        let o = Operands {
            bs: Some(4096),
            count: Some(5),
            skip: Some(10),
            ..Operands::default()
        };
        assert_eq!(copy_range(1 << 20, &o), (0, 0, true));
    }
}

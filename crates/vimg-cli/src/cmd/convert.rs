//! `vimg convert`: qemu-img convert's command line.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use std::sync::Arc;

use vimg::output::{DestKind, OutputMode, WriteCounter};
use vimg::{ConvertOptions, CopyMode, Format, Image, Progress, Source};

use super::{
    apply_source_args, open_options, parse_checksum, parse_create_options, parse_format,
    parse_format_opt,
};
use crate::args::ConvertArgs;
use crate::{CmdResult, Failure};

/// Checked convert options: the library's [`ConvertOptions`] (built directly, its defaults
/// kept where the command line says nothing) and what only the command line needs.
struct Plan {
    /// The sources, read one after another (`convert a b c out`).
    srcs: Vec<String>,
    dst: PathBuf,
    src_format: Option<Format>,
    /// The `-O` name as given, for messages (`host_device` is written as raw).
    out_name: String,
    /// What the destination is (looked at before the source is opened).
    dest: DestKind,
    progress: Option<crate::args::ProgressMode>,
    quiet: bool,
    /// Everything the library is told, but the progress callback and the cancel flag.
    opts: ConvertOptions,
}

const MAX_SPARSE: u64 = 16 << 20;

/// The cache modes qemu-img accepts for `-t` and `-T` (QEMU's `bdrv_parse_cache_mode`).
/// vimg reads through the page cache; the mode decides whether the output is made durable
/// (fsync of the files and the folder) before it is renamed into place: with every mode
/// named, except `-t unsafe`. Without `-t` nothing is flushed, as qemu-img's convert
/// default (`unsafe`) does not flush either. `none`/`off`/`directsync` also open a
/// block device target with `O_DIRECT`, as qemu-img does.
const CACHE_MODES: [&str; 6] = [
    "none",
    "off",
    "writeback",
    "writethrough",
    "directsync",
    "unsafe",
];

fn check_cache_mode(mode: Option<&str>, what: &str) -> Result<(), Failure> {
    match mode {
        Some(m) if !CACHE_MODES.contains(&m) => {
            Err(Failure::new(format!("Invalid {what}cache option: {m}"), 1))
        }
        _ => Ok(()),
    }
}

fn plan(a: &ConvertArgs) -> Result<Plan, Failure> {
    check_cache_mode(a.src_cache.as_deref(), "source ")?;
    check_cache_mode(a.cache.as_deref(), "")?;
    // qemu-img's host_device protocol: a raw image on an existing device.
    let host_device = a.out_format == "host_device";
    let out_format = if host_device {
        Format::Raw
    } else {
        parse_format(&a.out_format)?
    };
    if a.target_is_zero && !a.no_create {
        return Err(Failure::new("--target-is-zero requires use of -n flag", 1));
    }
    let src_format = parse_format_opt(a.src_format.as_deref())?;
    let mut create = parse_create_options(&a.options)?;
    create.compress = a.compress;
    if let Some(b) = &a.backing {
        if !out_format.driver().capabilities().backing_file {
            return Err(Failure::new(
                format!(
                    "Backing file not supported for file format '{}'",
                    out_format.name()
                ),
                1,
            ));
        }
        create.set("backing_file", b.clone());
        if let Some(f) = parse_format_opt(a.backing_format.as_deref())? {
            create.set("backing_fmt", f.name());
        }
    } else if a.backing_format.is_some() {
        return Err(Failure::new("-F requires -B", 1));
    }
    create.check_for(out_format).map_err(Failure::from)?;
    // `-o backing_file=` is `-B` spelled another way (qemu-img treats them alike): the
    // target gets only what the top image stores.
    let top_only = a.backing.is_some() || create.has("backing_file");
    if a.copy_offload && a.compress {
        return Err(Failure::new(
            "Cannot enable copy offloading when -c is used",
            1,
        ));
    }
    if a.copy_offload && a.sparse_size.is_some() {
        return Err(Failure::new(
            "Cannot enable copy offloading when -S is used",
            1,
        ));
    }
    if a.copy_offload && a.salvage {
        return Err(Failure::new(
            "Cannot use copy offloading in salvaging mode",
            1,
        ));
    }
    // qemu-img's order: after the offloading checks, before --target-is-zero's.
    if a.no_create && !a.options.is_empty() {
        return Err(Failure::new(
            "-o has no effect when skipping image creation",
            1,
        ));
    }
    if a.skip_broken_bitmaps && !a.bitmaps {
        return Err(Failure::new(
            "Use of --skip-broken-bitmaps requires --bitmaps",
            1,
        ));
    }
    if a.target_is_zero && !a.no_create {
        return Err(Failure::new("--target-is-zero requires use of -n flag", 1));
    }
    if a.target_is_zero && top_only {
        return Err(Failure::new(
            "Cannot use --target-is-zero when the destination image has a backing file",
            1,
        ));
    }
    if a.files.len() < 2 {
        return Err(Failure::new("Must specify image file name", 1));
    }
    if a.files.len() > 2 {
        if a.snapshot.is_some() || a.snapshot_old.is_some() {
            return Err(Failure::new(
                "No support for concatenating multiple snapshot",
                1,
            ));
        }
        if top_only {
            return Err(Failure::new(
                "Having a backing file for the target makes no sense when concatenating multiple input images",
                1,
            ));
        }
    }
    // After the concatenation checks, as qemu-img orders them (iotest 122).
    // With -n nothing is created: -B only says the target has a backing file (the ranges
    // the source's top image does not hold are left as they are), and needs no format.
    if top_only && !a.no_create && !create.has("backing_fmt") {
        return Err(Failure::new(
            "Use of backing file requires explicit backing format",
            1,
        ));
    }
    let mut opts = ConvertOptions::new(out_format);
    if let Some(s) = &a.sparse_size {
        let n = vimg::options::parse_size(s).map_err(|e| Failure::new(e.to_string(), 1))?;
        if n % 512 != 0 || n > MAX_SPARSE {
            return Err(Failure::new(
                "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).",
                1,
            ));
        }
        opts.copy.sparse_size = n;
    }
    let dest = if a.files[1] == "-" {
        DestKind::Missing
    } else {
        // Before the source is opened: a directory or socket is refused before any work.
        vimg::output::check_destination(std::path::Path::new(&a.files[1])).map_err(|e| {
            Failure::new(
                format!(
                    "{}: error while converting {}: {}",
                    a.files[1],
                    a.out_format,
                    e.message()
                ),
                1,
            )
        })?
    };
    if host_device && !matches!(dest, DestKind::BlockDevice | DestKind::CharDevice) {
        return Err(Failure::new(
            format!(
                "{}: error while converting host_device: 'host_device' driver requires '{}' to be either a character or block device",
                a.files[1], a.files[1]
            ),
            1,
        ));
    }
    if let Some(m) = &a.workers {
        // As qemu-img 10.0.2 reads -m: a whole number (C's base 0), between 1 and 16.
        match c_integer(m) {
            Some(n @ 1..=16) => opts.copy.workers = n as usize,
            Some(_) => {
                return Err(Failure::new(
                    "Invalid number of coroutines specified. Must be between 1 and 16.",
                    1,
                ))
            }
            None => {
                return Err(Failure::new(
                    format!("Invalid number of coroutines specified: '{m}'."),
                    1,
                ))
            }
        }
    }
    // Through blkdebug, which request meets a rule first (a `once` rule, a state a read
    // moves on) must not depend on thread timing: one reader.
    if a.files[..a.files.len() - 1].iter().any(|f| {
        vimg::blkdebug::parse_name(f, crate::trust::image_opts())
            .ok()
            .flatten()
            .is_some()
    }) {
        opts.copy.workers = 1;
    }
    opts.create = create;
    opts.direct = matches!(a.cache.as_deref(), Some("none" | "off" | "directsync"));
    // qemu-img's convert opens its target with cache=unsafe unless -t says otherwise,
    // so its output is never flushed; vimg's default follows (still renamed into place
    // only when complete). Any -t mode but unsafe flushes before the rename.
    opts.sync = a.cache.as_deref().is_some_and(|m| m != "unsafe");
    opts.target_is_zero = a.target_is_zero;
    if top_only {
        opts.copy.mode = CopyMode::TopOnly;
    }
    // The binary owns the process, so the SIGBUS handler mapped reads need is its call.
    opts.copy.mapped_reads = true;
    if a.salvage {
        // qemu-img's warnings; `-q` silences them, not the salvaging.
        let quiet = a.quiet;
        let warn: vimg::WarnFn = std::sync::Arc::new(move |m: &str| {
            if !quiet {
                eprintln!("{}: warning: {m}", crate::trust::prefix());
            }
        });
        opts.copy.salvage = Some(warn);
    }
    opts.output_mode = match (a.no_create, a.files[a.files.len() - 1] == "-") {
        (true, true) => {
            return Err(Failure::new(
                "-n writes into an existing image and cannot be combined with '-' (stdout)",
                1,
            ))
        }
        (true, false) => OutputMode::InPlace,
        (false, true) => OutputMode::Stdout,
        (false, false) => OutputMode::Atomic,
    };
    opts.checksum = parse_checksum(a.checksum.as_deref())?;
    Ok(Plan {
        srcs: a.files[..a.files.len() - 1].to_vec(),
        dst: PathBuf::from(&a.files[a.files.len() - 1]),
        src_format,
        out_name: a.out_format.clone(),
        dest,
        progress: if a.quiet {
            None
        } else {
            a.progress_mode
                .or(a.progress.then_some(crate::args::ProgressMode::Auto))
        },
        quiet: a.quiet,
        opts,
    })
}

/// True when `s` is a well-formed `-o` list as qemu-img's option parser takes it: not
/// empty, and no empty item between unescaped commas (`,,` is a literal comma).
fn valid_option_list(s: &str) -> bool {
    if s.is_empty() {
        return false;
    }
    let b = s.as_bytes();
    let mut item_len = 0usize;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b',' {
            if b.get(i + 1) == Some(&b',') {
                item_len += 1;
                i += 2;
                continue;
            }
            if item_len == 0 {
                return false;
            }
            item_len = 0;
        } else {
            item_len += 1;
        }
        i += 1;
    }
    item_len > 0
}

/// The checks qemu-img makes while reading its command line, before any option is
/// interpreted, in its order: a malformed `-o` list, then the flag combinations it
/// refuses outright. With `-n` nothing is created, so any `-o` is refused (qemu-img 5.1
/// on: "-o has no effect when skipping image creation"), before `-o help` or the
/// options themselves are looked at.
fn command_line_checks(a: &ConvertArgs) -> Result<(), Failure> {
    if let Some(bad) = a.options.iter().find(|s| !valid_option_list(s)) {
        return Err(Failure::new(format!("Invalid option list: {bad}"), 1));
    }
    if a.skip_broken_bitmaps && !a.bitmaps {
        return Err(Failure::new(
            "Use of --skip-broken-bitmaps requires --bitmaps",
            1,
        ));
    }
    if a.copy_offload && a.compress {
        return Err(Failure::new(
            "Cannot enable copy offloading when -c is used",
            1,
        ));
    }
    if a.copy_offload && a.sparse_size.is_some() {
        return Err(Failure::new(
            "Cannot enable copy offloading when -S is used",
            1,
        ));
    }
    if a.copy_offload && a.salvage {
        return Err(Failure::new(
            "Cannot use copy offloading in salvaging mode",
            1,
        ));
    }
    if a.no_create && !a.options.is_empty() {
        return Err(Failure::new(
            "-o has no effect when skipping image creation",
            1,
        ));
    }
    Ok(())
}

pub fn run(a: ConvertArgs) -> CmdResult {
    command_line_checks(&a)?;
    if super::wants_help(&a.options) {
        super::print_option_help(
            parse_format(&a.out_format)?,
            a.files.last().map(String::as_str),
        )?;
        return Ok(0);
    }
    let p = plan(&a)?;
    let mut open = open_options(p.src_format, &a.safety);
    apply_source_args(&mut open, &a.source)?;
    // convert_report settles the source before anything becomes visible, so the copy can
    // start while a container is still being decoded (one source: the parts of a
    // concatenation are not reached through the combined image).
    open.source.defer_whole_probe = p.srcs.len() == 1;
    let mut parts = Vec::with_capacity(p.srcs.len());
    for name in &p.srcs {
        let img = Image::open_source(&Source::from_arg(name), &open)
            .map_err(|e| Failure::open(name, &e))?;
        parts.push(img);
    }
    let mut src = if parts.len() == 1 {
        parts.remove(0)
    } else {
        if parts
            .iter()
            .any(|i| i.storage().sequential_window().is_some())
        {
            return Err(Failure::new(
                "a streamed source cannot be concatenated with others",
                1,
            ));
        }
        Image::concat(parts).map_err(Failure::from)?
    };
    load_snapshot(&mut src, &a)?;
    let mut bitmap_warnings = Vec::new();
    if a.bitmaps {
        if p.srcs.len() > 1 {
            return Err(Failure::new(
                "Copying bitmaps only possible with single source",
                1,
            ));
        }
        // qemu-img's checks and messages, before anything is written; the library checks
        // again and copies the bitmaps into the output before its rename.
        let mut o = ConvertOptions::new(p.opts.format);
        o.create = p.opts.create.clone();
        o.output_mode = p.opts.output_mode;
        o.checksum = p.opts.checksum;
        o.skip_broken_bitmaps = a.skip_broken_bitmaps;
        let plan = vimg::convert::bitmaps::plan(&src, &o)
            .map_err(|e| Failure::new(e.message().to_string(), 1))?;
        bitmap_warnings = plan.warnings;
    }
    let rate = match &a.rate_limit {
        Some(r) => vimg::options::parse_size(r)
            .map_err(|_| Failure::new(format!("Invalid rate limit specified: '{r}'."), 1))?,
        None => 0,
    };
    let src_name = &p.srcs[0];
    for w in src.chain().iter().flat_map(|l| l.reader().warnings()) {
        eprintln!("vimg: warning: {w}");
    }
    if let (Some(c), false) = (&src.origin().container, p.quiet) {
        if c.access == vimg::container::Access::TemporaryFile {
            eprintln!(
                "vimg: note: '{}' ({} inside {}) is decoded into a sparse temporary file in {}",
                src_name,
                src.format(),
                c.compression,
                std::env::temp_dir().display()
            );
        }
    }
    // `-`, or a name for this process's stdout (`/dev/stdout`, `/proc/self/fd/1`): progress
    // and the checksum line go to stderr then, so they never mix into the image's bytes.
    let to_stdout = p.opts.output_mode == OutputMode::Stdout || names_stdout(&p.dst);
    let json = a.output == Some(crate::args::OutputFormat::Json);
    if json && to_stdout {
        return Err(Failure::new(
            "--output=json prints a report on stdout, where the image is to go; write the image to a file",
            1,
        ));
    }
    let counter = Arc::new(WriteCounter::default());
    // Written in place: a failure or signal leaves it partly written, and the user is told
    // how far it got.
    let in_place = p.opts.output_mode == OutputMode::InPlace || p.dest.is_special();
    let what = match p.dest {
        DestKind::BlockDevice => "block device",
        DestKind::CharDevice => "character device",
        DestKind::Fifo => "FIFO",
        _ => "file",
    };
    let how_far = {
        let (counter, dst, size) = (counter.clone(), p.dst.clone(), src.virtual_size());
        move || {
            format!(
                "the {what} '{}' was written in place and is incomplete: {} bytes written, up to offset {} of {size}",
                dst.display(),
                counter.bytes.load(Ordering::Relaxed),
                counter.high.load(Ordering::Relaxed),
            )
        }
    };
    let note: Option<crate::signals::ExitNote> = in_place.then(|| {
        let (counter, how_far) = (counter.clone(), how_far.clone());
        Box::new(move || (counter.bytes.load(Ordering::Relaxed) > 0).then(&how_far))
            as crate::signals::ExitNote
    });
    let cancel = crate::signals::install_cancel_flag_with(note);
    // With --output=json, stdout carries the report: progress goes to stderr.
    let printer = Arc::new(crate::progress::Reporter::new(
        p.progress,
        to_stdout || json,
    ));
    let pace = crate::progress::RateLimit::new(rate);
    let progress_fn: vimg::ProgressFn = {
        let printer = printer.clone();
        Arc::new(move |pr: Progress| {
            printer.update(pr);
            pace.pace(pr.done);
        })
    };
    let out_format = p.opts.format;
    let mut opts: ConvertOptions = p.opts;
    opts.counter = Some(counter.clone());
    opts.target_policy = crate::trust::policy(&a.safety);
    opts.copy.progress = (printer.enabled() || rate > 0).then_some(progress_fn);
    opts.copy.cancel = Some(cancel.clone());
    opts.bitmaps = a.bitmaps;
    opts.skip_broken_bitmaps = a.skip_broken_bitmaps;
    opts.target_key_secret = a.target_key_secret.clone();
    for w in &bitmap_warnings {
        eprintln!("vimg: warning: {w}");
    }
    let result = vimg::convert_report(&src, &p.dst, &opts);
    printer.finish(result.is_ok());
    if result.is_err() && cancel.load(Ordering::SeqCst) {
        if in_place && counter.bytes.load(Ordering::Relaxed) > 0 {
            return Err(Failure::new(format!("interrupted; {}", how_far()), 130));
        }
        return Err(Failure::new("interrupted; no output was written", 130));
    }
    if let (Err(_), true) = (
        &result,
        in_place && counter.bytes.load(Ordering::Relaxed) > 0,
    ) {
        eprintln!("vimg: {}", how_far());
    }
    let report = result.map_err(|e| match e.path() {
        // A source file found unreadable or corrupt while it was read.
        Some(path) if src.chain().iter().any(|l| l.filename() == path.as_os_str()) => Failure::new(
            format!("error while reading '{}': {}", path.display(), e.message()),
            1,
        ),
        Some(path) if path != p.dst => Failure::new(
            format!("Could not open '{}': {}", path.display(), e.message()),
            1,
        ),
        // qemu-img checks compression before it creates the target and words those
        // refusals plainly; everything the format's create refuses it prefixes with the
        // target's name.
        _ if e.is_refusal() => Failure::new(e.message().to_string(), 1),
        _ if matches!(
            e.kind(),
            vimg::ErrorKind::InvalidArgument | vimg::ErrorKind::Unsupported
        ) =>
        {
            Failure::new(
                format!(
                    "{}: error while converting {}: {}",
                    p.dst.display(),
                    p.out_name,
                    e.message()
                ),
                1,
            )
        }
        _ => Failure::new(
            format!("error while converting {}: {}", p.out_name, e.message()),
            1,
        ),
    })?;
    if !p.quiet {
        for n in &report.notes {
            eprintln!("vimg: note: {n}");
        }
    }
    if json {
        let text = super::convert_report::json_report(&p.dst, out_format, &p.out_name, &report)?;
        crate::print_out(&text)?;
        return Ok(0);
    }
    if let Some(c) = report.checksum {
        // sha256sum's layout, so `sha256sum -c` and image-service scripts take it as is.
        let line = format!("{c}  {}\n", p.dst.display());
        if to_stdout {
            eprint!("{line}");
        } else {
            crate::print_out(&line)?;
        }
    }
    Ok(0)
}

/// True when `path` is what this process's stdout is (same device and inode).
fn names_stdout(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(path) else {
        return false;
    };
    // SAFETY: fstat writes into the zeroed struct it is given.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(1, &mut st) } != 0 {
        return false;
    }
    m.dev() == st.st_dev as u64 && m.ino() == st.st_ino as u64
}

/// `-l` / `-s`: read the source as it was at an internal snapshot, as qemu-img does
/// (`snapshot.id=` / `snapshot.name=` options, or an ID or name, the ID tried first).
fn load_snapshot(src: &mut Image, a: &ConvertArgs) -> Result<(), Failure> {
    let param = match (&a.snapshot, &a.snapshot_old) {
        (Some(p), _) | (None, Some(p)) => p.as_str(),
        (None, None) => return Ok(()),
    };
    let r = if param.starts_with("snapshot.") {
        let (mut id, mut name) = (None, None);
        for kv in param.split(',') {
            match kv.split_once('=') {
                Some(("snapshot.id", v)) => id = Some(v),
                Some(("snapshot.name", v)) => name = Some(v),
                _ => {
                    let key = kv.split('=').next().unwrap_or(kv);
                    return Err(Failure::new(
                        format!(
                            "Invalid parameter '{key}'\nFailed in parsing snapshot param '{param}'"
                        ),
                        1,
                    ));
                }
            }
        }
        src.load_snapshot(id, name)
    } else {
        src.load_snapshot(Some(param), None)
            .or_else(|_| src.load_snapshot(None, Some(param)))
    };
    r.map_err(|e| Failure::new(format!("Failed to load snapshot: {}", e.message()), 1))
}

/// A whole number as C's `strtol` with base 0 reads all of `s`: leading white space, an
/// optional sign, then
/// `0x` hexadecimal, `0` octal or decimal digits.
fn c_integer(s: &str) -> Option<i64> {
    let s = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else if body.len() > 1 && body.starts_with('0') {
        i64::from_str_radix(&body[1..], 8).ok()?
    } else if !body.is_empty() && body.bytes().all(|b| b.is_ascii_digit()) {
        body.parse().ok()?
    } else {
        return None;
    };
    Some(if neg { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::valid_option_list;

    #[test]
    fn option_lists_as_qemu_img_reads_them() {
        for ok in [
            "a",
            "a,b",
            "a,,",
            "a,,b",
            "a=1,,b=2",
            "backing_file=x,backing_fmt=raw",
        ] {
            assert!(valid_option_list(ok), "{ok}");
        }
        for bad in ["", ",", "a,", ",a", "a,,,", "a,,b,", "a,,,,,"] {
            assert!(!valid_option_list(bad), "{bad}");
        }
    }
}

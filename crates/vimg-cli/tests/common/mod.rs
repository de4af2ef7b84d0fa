//! Shared helpers for the integration tests, in one place: qemu-img as the oracle, the
//! vimg binary, byte patching, and the shared corpus ([`corpus`]).
//!
//! Tests that need qemu-img run when it is on PATH; when it is missing they skip with a
//! visible `SKIPPED test: reason` line (see [`skipped_line`]), except with `CI` set, where
//! they fail. Corpus tests skip visibly when the corpus is absent (it never is in CI's
//! checkout, so that is not a failure).

#![allow(dead_code)]

pub mod corpus;
pub mod kill;
pub mod limited;

#[allow(unused_imports)]
pub use corpus::*;
#[allow(unused_imports)]
pub use limited::*;

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Prints a `SKIPPED ...` line where `cargo test` shows it. The harness captures
/// `println!`/`eprintln!` (shown only with `--nocapture` or on failure), so a skipped test
/// would just say `ok`; this writes to the process's stderr directly, past the capture.
pub fn skipped_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The running test's name: libtest names each test's thread after the test.
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("a test")
        .to_string()
}

/// True when `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// True when qemu-img and qemu-io can be used. Without them: fail under CI, else skip
/// (returns false after saying so).
pub fn qemu_available(test: &str) -> bool {
    if have("qemu-img") && have("qemu-io") {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: qemu-img/qemu-io are required when CI is set");
    }
    skipped_line(format_args!("SKIPPED {test}: qemu-img/qemu-io not on PATH"));
    false
}

/// Like [`qemu_available`] for another tool (vmdkinfo, vhdiinfo...).
pub fn tool_available(test: &str, tool: &str) -> bool {
    if have(tool) {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {tool} is required when CI is set");
    }
    skipped_line(format_args!("SKIPPED {test}: {tool} not on PATH"));
    false
}

/// The vimg binary under test.
pub fn vimg_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vimg"))
}

/// Runs a command, returns its output (no status check).
pub fn run_cmd(prog: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
    Command::new(prog.as_ref())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", prog.as_ref()))
}

/// Runs a command and panics with its stderr when it fails.
pub fn run_ok(prog: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> String {
    let out = run_cmd(prog.as_ref(), args);
    assert!(
        out.status.success(),
        "{:?} {:?} failed ({}):\n{}\n{}",
        prog.as_ref(),
        args,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `vimg ARGS`, which must succeed; returns stdout.
pub fn vimg(args: &[&str]) -> String {
    run_ok(vimg_bin(), args)
}

/// `vimg ARGS`, whatever happens.
pub fn vimg_raw(args: &[&str]) -> Output {
    run_cmd(vimg_bin(), args)
}

/// `qemu-img ARGS`, which must succeed; returns stdout.
pub fn qemu_img(args: &[&str]) -> String {
    run_ok("qemu-img", args)
}

/// `qemu-img ARGS` run in `dir` (so relative backing names resolve there), which must
/// succeed; returns stdout.
pub fn qemu_in(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img: {e}"));
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Parses JSON output, saying what it was when it is not JSON.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{text}"))
}

/// Overwrites the bytes at `off` in the file `p`.
pub fn patch(p: &Path, off: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// `N` bytes of the file `p` at `off`.
/// The length of file `p`.
pub fn size_of(p: &Path) -> u64 {
    fs::metadata(p).unwrap().len()
}

pub fn read_bytes<const N: usize>(p: &Path, off: u64) -> [u8; N] {
    let mut b = [0u8; N];
    fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    b
}

/// A big-endian u64 of the file `p` at `off`.
pub fn rd64be(p: &Path, off: u64) -> u64 {
    u64::from_be_bytes(read_bytes(p, off))
}

/// `s` as UTF-16LE bytes (VHD and VHDX parent names).
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// `qemu-io -f FMT -c CMD IMAGE` for each command, which must succeed.
pub fn qemu_io(format: &str, image: &Path, cmds: &[&str]) {
    let mut args: Vec<String> = vec!["-f".into(), format.into()];
    for c in cmds {
        args.push("-c".into());
        args.push((*c).into());
    }
    args.push(image.display().to_string());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok("qemu-io", &refs);
}

/// A path as &str (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// sha256 of a file, hex.
pub fn sha256_file(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut f = fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Asserts two files have identical bytes (and says where they first differ).
pub fn assert_same_file(a: &Path, b: &Path) {
    let x = fs::read(a).unwrap();
    let y = fs::read(b).unwrap();
    if x != y {
        let first = x.iter().zip(&y).position(|(p, q)| p != q);
        panic!(
            "{} ({} bytes) and {} ({} bytes) differ, first at {:?}",
            a.display(),
            x.len(),
            b.display(),
            y.len(),
            first
        );
    }
}

/// Asserts `vimg info --output=json` gives qemu-img's values for `keys` (qemu-img runs in
/// the image's folder, so relative backing names resolve alike).
pub fn assert_info_like_qemu(img: &Path, keys: &[&str]) {
    let q = json(&qemu_in(
        img.parent().unwrap(),
        &["info", "--output=json", s(img)],
    ));
    let v = json(&vimg(&["info", "--output=json", s(img)]));
    for key in keys {
        assert_eq!(q.get(key), v.get(key), "{key} of {}", img.display());
    }
}

/// Converts `img` to raw with qemu-img and with vimg (with and without `-f`) and asserts
/// the three outputs are byte-identical.
pub fn assert_reads_like_qemu(img: &Path, fmt: &str, dir: &Path) {
    let q = dir.join("qemu.raw");
    let v = dir.join("vimg.raw");
    let vf = dir.join("vimg-f.raw");
    qemu_img(&["convert", "-f", fmt, "-O", "raw", s(img), s(&q)]);
    vimg(&["convert", "-O", "raw", s(img), s(&v)]);
    vimg(&["convert", "-f", fmt, "-O", "raw", s(img), s(&vf)]);
    assert_same_file(&q, &v);
    assert_same_file(&q, &vf);
    for p in [&q, &v, &vf] {
        let _ = fs::remove_file(p);
    }
}

/// Asserts qemu-img sees `img` (format `fmt`) with the same content as `reference`
/// (`qemu-img compare`), and, for formats qemu-img can check, no errors or leaks.
pub fn assert_qemu_accepts(img: &Path, fmt: &str, reference: &Path, ref_fmt: &str) {
    let info = qemu_img(&["info", "--output=json", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        v["format"],
        fmt,
        "qemu-img probes {} as {}",
        img.display(),
        v["format"]
    );
    qemu_img(&["compare", "-f", fmt, "-F", ref_fmt, s(img), s(reference)]);
    if matches!(fmt, "qcow2" | "vmdk" | "vhdx" | "vdi") {
        let out = run_cmd("qemu-img", &["check", "-f", fmt, s(img)]);
        assert!(
            out.status.success(),
            "qemu-img check {} failed:\n{}{}",
            img.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A deterministic pseudo-random byte pattern (xorshift), for test data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Writes a sparse raw file of `size` bytes with the given `(offset, bytes)` pieces.
pub fn write_sparse_raw(path: &Path, size: u64, pieces: &[(u64, &[u8])]) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (off, data) in pieces {
        f.write_all_at(data, *off).unwrap();
    }
}

/// A raw test image with a mix of random data, text-like data, written zeros and holes;
/// `size` should be at least 8 MiB.
pub fn mixed_raw(path: &Path, size: u64) {
    let rnd = pattern(1 << 20, 7);
    let text: Vec<u8> = b"The quick brown fox jumps over the lazy dog. 0123456789\n"
        .iter()
        .cycle()
        .take(1 << 20)
        .copied()
        .collect();
    let zeros = vec![0u8; 1 << 20];
    let small = pattern(3000, 9);
    let pieces: Vec<(u64, &[u8])> = vec![
        (0, &rnd[..]),
        (size / 4, &text[..]),
        (size / 4 + (1 << 20), &zeros[..]),
        (size / 2 + 12345, &small[..]),
        (size - (1 << 20), &text[..]),
    ];
    write_sparse_raw(path, size, &pieces);
}

/// The shared corpus folder, if present (`../shared/corpus` from the workspace root).
pub fn corpus_dir() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let d = root.join("../shared/corpus");
    if d.join("MANIFEST.tsv").is_file() {
        Some(d)
    } else {
        skipped_line(format_args!(
            "SKIPPED {}: the corpus {} is not present",
            test_name(),
            d.display()
        ));
        None
    }
}

/// Sets the 16-bit refcount of qcow2 host cluster `c` in the first refcount block, growing
/// the file to hold the cluster: a leak when nothing references it.
pub fn set_refcount(img: &Path, c: u64, v: u16) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .expect("open");
    let mut h = [0u8; 104];
    f.read_exact_at(&mut h, 0).expect("header");
    let cb = u32::from_be_bytes(h[20..24].try_into().expect("4"));
    let rt = u64::from_be_bytes(h[48..56].try_into().expect("8"));
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, rt).expect("reftable");
    let rb = u64::from_be_bytes(e);
    f.write_all_at(&v.to_be_bytes(), rb + 2 * c)
        .expect("refcount");
    let len = f.metadata().expect("stat").len();
    f.set_len(len.max((c + 1) << cb)).expect("grow");
}

/// `qemu-img create -q -f qcow2 [-o OPTS] -b BACKING -F qcow2 IMG [SIZE]`: a qcow2 overlay
/// storing `backing` as given (a relative name resolves next to `img`).
pub fn qcow2_overlay(img: &Path, backing: &str, opts: &str, size: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.push(s(img));
    args.extend(size);
    qemu_img(&args);
}

/// `qemu-img create -q -f FMT [-o OPTS] IMG SIZE`.
pub fn qemu_create(img: &Path, fmt: &str, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(img), size]);
    qemu_img(&args);
}

/// `qemu-img check -f FMT IMG`: its exit code and its stdout and stderr together.
pub fn qemu_check_output(img: &Path, fmt: &str) -> (i32, String) {
    let out = run_cmd("qemu-img", &["check", "-f", fmt, s(img)]);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// What a run said: its stderr then its stdout, with the tools' `qemu-img: ` and `vimg: `
/// prefixes removed, for comparing vimg's words with qemu-img's.
pub fn said(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stderr)
            .replace("qemu-img: ", "")
            .replace("vimg: ", ""),
        String::from_utf8_lossy(&o.stdout)
    )
}

/// `v` and `q` (vimg's and qemu-img's runs of `what`) have the same stderr, stdout and
/// exit status.
pub fn assert_same_output(v: &Output, q: &Output, what: &str) {
    assert_eq!(
        String::from_utf8_lossy(&v.stderr),
        String::from_utf8_lossy(&q.stderr),
        "stderr of {what}"
    );
    assert_eq!(
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&q.stdout),
        "stdout of {what}"
    );
    assert_eq!(v.status.code(), q.status.code(), "exit status of {what}");
}

/// vimg with `args` exits with `code` and prints exactly `stderr` (trimmed).
pub fn assert_vimg_fails_with(args: &[&str], code: i32, stderr: &str) {
    let out = vimg_raw(args);
    assert_eq!(out.status.code(), Some(code), "vimg {args:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        stderr,
        "vimg {args:?}"
    );
}

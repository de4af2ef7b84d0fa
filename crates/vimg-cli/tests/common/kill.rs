//! The kill-at-any-point harness of the in-place tests: run vimg killed (SIGKILL,
//! through `VIMG_TEST_CRASH_AFTER_WRITES`) before its N-th write, then judge the images
//! it left (`qemu-img check`, guest content old or new). Used by the snapshot and bitmap
//! tests and by the data operations (rebase, commit).

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use super::{qemu_check_output, qemu_img, run_cmd, s, vimg, vimg_bin, vimg_raw};

pub const HOOK: &str = "VIMG_TEST_CRASH_AFTER_WRITES";

/// Kill points a loop visits by default: every point below this one...
pub const EVERY_BELOW: u64 = 48;
/// ...then every `STRIDE`-th (a prime, so that it falls on every phase of a periodic write
/// pattern, e.g. data, L2, refcount). `VIMG_KILL_EVERY_POINT=1` visits every point: run so
/// before changing an in-place operation's write order.
pub const STRIDE: u64 = 7;

/// Whether a kill loop visits point `n` (see [`EVERY_BELOW`]). The loops still end with a
/// run that finishes, so the complete operation is always judged too.
pub fn sampled(n: u64) -> bool {
    n < EVERY_BELOW
        || (n - EVERY_BELOW).is_multiple_of(STRIDE)
        || std::env::var_os("VIMG_KILL_EVERY_POINT").is_some()
}

/// The kill points of a loop: `0..` filtered by [`sampled`].
pub fn points() -> impl Iterator<Item = u64> {
    (0u64..).filter(|&n| sampled(n))
}

/// The kill point after `n` ([`sampled`]).
pub fn next_point(n: u64) -> u64 {
    (n + 1..).find(|&m| sampled(m)).expect("u64 range")
}

/// Runs vimg with the hook at `n`; true when it was killed, false when it finished (then
/// it must have succeeded).
pub fn run_killed(args: &[&str], n: u64) -> bool {
    run_killed_in(None, args, n)
}

/// SIGKILL before every write: for n = 0, 1, ... copies `pristine` over `work`, runs vimg
/// `args` killed before its n-th write ([`run_killed`]) and calls `after(n, finished)` to
/// judge what it left; stops after the first run that finished. Returns how many runs were
/// killed; more than `max` killed runs fail the test.
pub fn each_kill_point(
    pristine: &Path,
    work: &Path,
    args: &[&str],
    max: u64,
    mut after: impl FnMut(u64, bool),
) -> u64 {
    let mut killed = 0;
    for n in points() {
        std::fs::copy(pristine, work).unwrap();
        let done = !run_killed(args, n);
        after(n, done);
        if done {
            break;
        }
        killed += 1;
        assert!(n < max, "vimg {args:?} still killed after {n} runs");
    }
    killed
}

/// [`run_killed`] with the working folder `dir` (relative names in `args` from there).
pub fn run_killed_in(dir: Option<&Path>, args: &[&str], n: u64) -> bool {
    let mut cmd = Command::new(vimg_bin());
    cmd.args(args).env(HOOK, n.to_string());
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd.output().expect("run vimg");
    match out.status.signal() {
        Some(9) => true,
        Some(sig) => panic!("vimg {args:?} died of signal {sig}"),
        None => {
            assert!(
                out.status.success(),
                "vimg {args:?} with {HOOK}={n} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            false
        }
    }
}

/// What `qemu-img check` found after a kill.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    Leaks,
    /// Only copied flags missing on clusters with refcount 1 (the window QEMU's snapshot
    /// create and delete have too; `check -r all` repairs it).
    CopiedFlagsOnly,
}

/// `qemu-img check`; panics on any corruption except, with `allow_copied`, copied flags
/// missing where the refcount is 1.
pub fn qemu_check(img: &Path, allow_copied: bool, what: &str) -> Verdict {
    let out = run_cmd("qemu-img", &["check", "-f", "qcow2", s(img)]);
    let code = out.status.code().unwrap_or(-1);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match code {
        0 => Verdict::Clean,
        3 => Verdict::Leaks,
        2 if allow_copied => {
            let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("ERROR")).collect();
            assert!(
                !errors.is_empty()
                    && errors
                        .iter()
                        .all(|l| l.starts_with("ERROR OFLAG_COPIED") && l.ends_with("refcount=1")),
                "{what}: qemu-img check exit 2:\n{text}"
            );
            Verdict::CopiedFlagsOnly
        }
        _ => panic!("{what}: qemu-img check exit {code}:\n{text}"),
    }
}

/// `qemu-img check` finds no corruption (leaks allowed); then `vimg check -r leaks` leaves
/// the image clean.
pub fn check_then_repair(img: &Path, fmt: &str, what: &str) {
    let code = |img: &Path| {
        let out = run_cmd("qemu-img", &["check", "-f", fmt, s(img)]);
        let c = out.status.code().unwrap_or(-1);
        assert!(
            c == 0 || c == 3,
            "{what}: qemu-img check of {} exit {c}:\n{}{}",
            img.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c
    };
    if code(img) == 3 {
        let out = vimg_raw(&["check", "-r", "leaks", "-f", fmt, s(img)]);
        assert_eq!(out.status.code(), Some(0), "{what}: vimg check -r leaks");
        assert_eq!(code(img), 0, "{what}: leaks left after vimg check -r leaks");
    }
}

/// The guest content of `img` (through its backing chain), by qemu-img.
pub fn guest(img: &Path, fmt: &str) -> Vec<u8> {
    let raw = img.with_extension("guest.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_img(&["convert", "-f", fmt, "-O", "raw", s(img), s(&raw)]);
    let v = std::fs::read(&raw).expect("read raw");
    let _ = std::fs::remove_file(&raw);
    v
}

/// Every `cs`-byte cluster of `got` equals the same cluster of `old` or of `new` (missing
/// bytes read as zeros).
pub fn assert_old_or_new(got: &[u8], old: &[u8], new: &[u8], cs: usize, what: &str) {
    let at = |v: &[u8], i: usize, n: usize| -> Vec<u8> {
        let mut b = vec![0u8; n];
        if i < v.len() {
            let m = (v.len() - i).min(n);
            b[..m].copy_from_slice(&v[i..i + m]);
        }
        b
    };
    let len = got.len().max(old.len()).max(new.len());
    let mut i = 0;
    while i < len {
        let n = cs.min(len - i);
        let g = at(got, i, n);
        assert!(
            g == at(old, i, n) || g == at(new, i, n),
            "{what}: guest cluster at {i:#x} is neither old nor new"
        );
        i += n;
    }
}

/// The verdict after a kill of a write into a vdi, vpc or parallels image `img` whose guest
/// content is now `got`: vpc has no check in qemu-img (exit 63), vdi is clean, parallels is
/// clean or has space leaked past its last cluster (exit 3, no other error), which
/// `vimg check -r REPAIR` repairs keeping the content; then vimg opens it.
pub fn assert_bat_check_after_kill(img: &Path, fmt: &str, got: &[u8], repair: &str, what: &str) {
    let (code, text) = qemu_check_output(img, fmt);
    match fmt {
        "vpc" => assert_eq!(code, 63, "{what}:\n{text}"),
        "vdi" => assert_eq!(code, 0, "{what}:\n{text}"),
        _ => {
            let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("ERROR")).collect();
            assert!(
                matches!(code, 0 | 3)
                    && errors
                        .iter()
                        .all(|l| l.starts_with("ERROR space leaked at the end")),
                "{what}: qemu-img check exit {code}:\n{text}"
            );
            if code != 0 {
                let out = vimg_raw(&["check", "-r", repair, s(img)]);
                assert_eq!(out.status.code(), Some(0), "{what}: vimg check -r {repair}");
                assert_eq!(qemu_check_output(img, fmt).0, 0, "{what}: after repair");
                assert_eq!(guest(img, fmt), got, "{what}: the repair kept the data");
            }
        }
    }
    vimg(&["info", s(img)]);
}

//! Helpers of the kill-at-any-point tests of the snapshot and bitmap operations
//! (`inplace_snapshot.rs`, `inplace_bitmap.rs`): run vimg with the test-only crash hook,
//! and judge what `qemu-img check` says afterwards.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use super::{run_cmd, s, vimg_bin};

/// The crash hook's environment variable (`vimg::formats::qcow2::update::CRASH_HOOK_ENV`).
pub const HOOK: &str = "VIMG_TEST_CRASH_AFTER_WRITES";

/// Runs vimg with the hook at `n`; true when it was killed, false when it finished (which
/// it must do successfully).
pub fn run_killed(args: &[&str], n: u64) -> bool {
    let out = Command::new(vimg_bin())
        .args(args)
        .env(HOOK, n.to_string())
        .output()
        .expect("run vimg");
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

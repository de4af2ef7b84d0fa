//! Running vimg under an address-space limit with its time and peak RSS measured, for the
//! hostile-image tests.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{s, vimg_bin};

/// GNU time, which measures the peak RSS.
pub const TIME: &str = "/usr/bin/time";

/// How a [`run_limited`] run ended.
pub struct LimitedRun {
    /// The exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// Peak resident set size in bytes.
    pub max_rss: u64,
}

/// Runs vimg with `args` under RLIMIT_AS = `address_space`; returns how it ended.
///
/// The peak RSS comes from GNU time (`%M`): `wait4`'s `ru_maxrss` of a child started with a
/// `pre_exec` hook would count the forked copy of this (big) test process before `exec`;
/// time's own fork is small.
pub fn run_limited<S: AsRef<OsStr>>(args: &[S], address_space: u64) -> LimitedRun {
    let rss_file = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(TIME);
    cmd.args(["-f", "%M", "-o", s(rss_file.path())])
        .arg(vimg_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: address_space as libc::rlim_t,
                rlim_max: address_space as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t = Instant::now();
    let out = cmd.output().unwrap();
    let elapsed = t.elapsed();
    let rss = fs::read_to_string(rss_file.path()).unwrap();
    // "Command exited with non-zero status 1\n12345\n": the last line is %M, in KiB.
    let kib: u64 = rss
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("time wrote {rss:?}"));
    LimitedRun {
        // time exits with the command's status, or 128 + signal when it was killed.
        code: out.status.code().filter(|c| *c < 128),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed,
        max_rss: kib * 1024,
    }
}

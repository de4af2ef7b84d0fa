//! Who is trusted, decided once per run: the name the binary was invoked under, and the
//! folders an operator trusts for files that images name.
//!
//! - `vimg` (any name but `qemu-img`): safe by default. A name read from an image must
//!   resolve to a regular file inside the image's own folder. Operators widen that in scope:
//!   `--allow-external=DIR` (repeatable), the colon-separated folders in `$VIMG_ALLOW_EXTERNAL`,
//!   and the folders listed one per line in `/etc/vimg/allow-external` (another file with
//!   `$VIMG_ALLOW_EXTERNAL_CONFIG`). Bare `--allow-external` trusts the image entirely.
//! - `qemu-img` (a symlink or copy named so): compatibility mode for programs that call
//!   `qemu-img` and cannot be changed. Names from images are followed as qemu-img follows them
//!   (any regular file, relative to the image's folder or absolute), messages start with
//!   `qemu-img:`, and `--version` starts with a `qemu-img version X.Y.Z` line.
//!
//! Names the user typed (files, `-b`, `-B`, `-o backing_file=`, `-o data_file=`) are never
//! judged: the command line is trusted.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vimg::ExternalPolicy;

use crate::args::SafetyArgs;
use crate::Failure;

/// The environment variable holding extra trusted folders, colon-separated.
pub const ENV_DIRS: &str = "VIMG_ALLOW_EXTERNAL";
/// The environment variable naming the system list of trusted folders (tests, packagers).
pub const ENV_CONFIG: &str = "VIMG_ALLOW_EXTERNAL_CONFIG";
/// The system list of trusted folders, one absolute path per line, `#` starts a comment.
pub const CONFIG_PATH: &str = "/etc/vimg/allow-external";
/// The qemu-img version whose behaviour vimg reproduces (shown in compatibility mode).
pub const QEMU_VERSION: &str = "10.0.2";

static QEMU_MODE: OnceLock<bool> = OnceLock::new();
static POLICY: OnceLock<ExternalPolicy> = OnceLock::new();
static IMAGE_OPTS: OnceLock<bool> = OnceLock::new();

/// Records `--image-opts` (the user's image names are option strings).
pub fn set_image_opts(on: bool) {
    let _ = IMAGE_OPTS.set(on);
}

/// True with `--image-opts`.
pub fn image_opts() -> bool {
    IMAGE_OPTS.get().copied().unwrap_or(false)
}

/// True when `argv0`'s file name is `qemu-img`.
pub fn is_qemu_name(argv0: &std::ffi::OsStr) -> bool {
    Path::new(argv0)
        .file_name()
        .is_some_and(|n| n == "qemu-img")
}

/// Records the mode from the name the binary was invoked under. Call once, first.
pub fn init(argv0: Option<&std::ffi::OsStr>) {
    let _ = QEMU_MODE.set(argv0.is_some_and(is_qemu_name));
}

/// True in qemu-img compatibility mode.
pub fn qemu_mode() -> bool {
    QEMU_MODE.get().copied().unwrap_or(false)
}

/// The prefix of messages on stderr: `vimg` or, in compatibility mode, `qemu-img`.
pub fn prefix() -> &'static str {
    if qemu_mode() {
        "qemu-img"
    } else {
        "vimg"
    }
}

/// `--version` in compatibility mode: qemu-img's first line (which version-parsing callers
/// such as libvirt and oslo read), then what this binary really is.
pub fn qemu_version_text() -> String {
    format!(
        "qemu-img version {QEMU_VERSION} (vimg {v})\n\
         vimg {v}: a qemu-img compatible image tool, not QEMU; invoked as qemu-img, it follows \
         the files images name as qemu-img does\n",
        v = env!("CARGO_PKG_VERSION")
    )
}

/// Checks the folders given with `--allow-external=DIR` (each must be an existing folder) and
/// fixes the run's policy. Call once, before any image is opened.
pub fn init_policy(safety: Option<&SafetyArgs>) -> Result<(), Failure> {
    let policy = compute(safety)?;
    let _ = POLICY.set(policy);
    Ok(())
}

/// The run's policy for files images name.
pub fn policy(safety: &SafetyArgs) -> ExternalPolicy {
    match POLICY.get() {
        Some(p) => *p,
        // Not initialised (a test or a new command path): compute it the same way, dropping
        // folders that do not resolve.
        None => compute(Some(safety)).unwrap_or_default(),
    }
}

fn compute(safety: Option<&SafetyArgs>) -> Result<ExternalPolicy, Failure> {
    let cli: &[String] = safety.map_or(&[], |s| &s.allow_external);
    if qemu_mode() || cli.iter().any(String::is_empty) {
        return Ok(ExternalPolicy::Allow);
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for d in cli {
        if !Path::new(d).is_dir() {
            return Err(Failure::new(
                format!("--allow-external={d}: not a folder"),
                1,
            ));
        }
        dirs.push(PathBuf::from(d));
    }
    dirs.extend(env_dirs());
    dirs.extend(config_dirs());
    Ok(ExternalPolicy::scoped(dirs))
}

/// `$VIMG_ALLOW_EXTERNAL`: absolute folders separated by colons; empty entries skipped.
fn env_dirs() -> Vec<PathBuf> {
    std::env::var_os(ENV_DIRS)
        .map(|v| {
            std::env::split_paths(&v)
                .filter(|p| p.is_absolute())
                .collect()
        })
        .unwrap_or_default()
}

/// The system list: one absolute folder per line, blank lines and `#` comments skipped. A
/// file that others than its owner may write, or owned by someone other than root or the
/// user running vimg, is ignored with a warning: it would let them widen the trust.
fn config_dirs() -> Vec<PathBuf> {
    let path = std::env::var_os(ENV_CONFIG)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(CONFIG_PATH));
    let Ok(meta) = std::fs::metadata(&path) else {
        return Vec::new();
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.mode() & 0o022 != 0 || (meta.uid() != 0 && meta.uid() != euid) {
        eprintln!(
            "{}: warning: ignoring '{}': it must be owned by root or you and writable only by its owner",
            prefix(),
            path.display()
        );
        return Vec::new();
    }
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Vec::new();
    };
    parse_config(&text)
}

fn parse_config(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| l.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_names() {
        for n in ["qemu-img", "/usr/bin/qemu-img", "./qemu-img"] {
            assert!(is_qemu_name(n.as_ref()), "{n}");
        }
        for n in [
            "vimg",
            "/usr/bin/qemu-img.real",
            "qemu-img-x",
            "/qemu-img/vimg",
        ] {
            assert!(!is_qemu_name(n.as_ref()), "{n}");
        }
    }

    #[test]
    fn config_lines() {
        let t = "# trusted\n/var/lib/nova/instances/_base\n\n  /srv/base  # shared\nrelative/x\n";
        assert_eq!(
            parse_config(t),
            vec![
                PathBuf::from("/var/lib/nova/instances/_base"),
                PathBuf::from("/srv/base")
            ]
        );
    }

    #[test]
    fn version_first_line() {
        let t = qemu_version_text();
        let first = t.lines().next().unwrap();
        assert!(first.starts_with("qemu-img version 10.0.2 "), "{first}");
        assert!(t.contains(env!("CARGO_PKG_VERSION")));
    }
}

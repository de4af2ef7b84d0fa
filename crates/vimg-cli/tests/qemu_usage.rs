//! qemu-img's own words where vimg runs as qemu-img (issue 14): usage errors, messages for
//! hostile headers, and command-line forms qemu-img refuses. Each case runs qemu-img and
//! vimg (through a link named `qemu-img`) on the same command line and compares the exit
//! status and what each prints.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A link named `qemu-img` to the vimg binary (its compatibility mode) in `dir`.
fn as_qemu_img(dir: &Path) -> PathBuf {
    let link = dir.join("qemu-img");
    std::os::unix::fs::symlink(vimg_bin(), &link).unwrap();
    link
}

/// Runs `args` in `dir` with qemu-img and with vimg as qemu-img; asserts the same exit
/// status, stdout and stderr.
fn assert_same_words(dir: &Path, link: &Path, args: &[&str]) {
    let q = std::process::Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let v = std::process::Command::new(link)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&v.stderr),
        String::from_utf8_lossy(&q.stderr),
        "stderr of {args:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&q.stdout),
        "stdout of {args:?}"
    );
    assert_eq!(v.status.code(), q.status.code(), "exit status of {args:?}");
}

/// Unknown options, a missing option argument, too few or too many file names, a bad
/// `--output`: getopt's and qemu-img's lines and "Try 'qemu-img SUB --help'", exit 1.
#[test]
fn usage_errors_in_qemu_img_words() {
    if !qemu_available("usage_errors_in_qemu_img_words") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let link = as_qemu_img(dir.path());
    qemu_in(dir.path(), &["create", "-f", "qcow2", "a.qcow2", "1M"]);
    let cases: &[&[&str]] = &[
        &["info", "--bogus", "a.qcow2"],
        &["check", "--bogus=1", "a.qcow2"],
        &["info", "-x", "a.qcow2"],
        &["info", "-qx", "a.qcow2"],
        &["convert", "-O", "raw", "--target-bogus", "a.qcow2", "b"],
        &["info", "-f"],
        &["convert", "-O"],
        &["info", "--output"],
        &["info", "--output=xml", "a.qcow2"],
        &["map", "a.qcow2", "b"],
        &["map"],
        &["check"],
        &["info", "a.qcow2", "b"],
        &["compare", "a.qcow2"],
        &["resize", "a.qcow2"],
        &["create", "-f", "qcow2", "x", "1M", "extra"],
        &["frob"],
        &[],
    ];
    for args in cases {
        assert_same_words(dir.path(), &link, args);
    }
    // Under its own name vimg keeps clap's fuller message, with the same exit status.
    let own = vimg_raw(&["info", "--bogus", "a.qcow2"]);
    assert_eq!(own.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&own.stderr).contains("'--bogus'"));
}

/// `rebase` without -b and without -u is a usage error in qemu-img ("Must specify backing
/// file (-b) or use unsafe mode (-u)"); vimg used to read it as "remove the backing file"
/// and did so. The image must be left as it was.
#[test]
fn rebase_without_backing_or_unsafe_is_refused() {
    if !qemu_available("rebase_without_backing_or_unsafe_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let link = as_qemu_img(dir.path());
    qemu_in(dir.path(), &["create", "-f", "qcow2", "b.qcow2", "1M"]);
    qemu_in(
        dir.path(),
        &["create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "c.qcow2"],
    );
    let before = std::fs::read(dir.path().join("c.qcow2")).unwrap();
    assert_same_words(dir.path(), &link, &["rebase", "c.qcow2"]);
    assert_eq!(std::fs::read(dir.path().join("c.qcow2")).unwrap(), before);
    let own = vimg_raw(&["rebase", s(&dir.path().join("c.qcow2"))]);
    assert_eq!(own.status.code(), Some(1));
    assert_eq!(std::fs::read(dir.path().join("c.qcow2")).unwrap(), before);
}

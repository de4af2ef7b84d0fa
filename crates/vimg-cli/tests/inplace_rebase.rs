//! `vimg rebase -u` against `qemu-img rebase -u` (issue 15): the same command line on two
//! copies of an image gives the same exit code, the same stderr (prefix and file name
//! aside), the same backing reference and guest content, and `qemu-img check` finds the
//! result clean. Safe mode is refused and leaves the image as it was.

mod common;

use std::path::Path;

use common::*;

/// `tool rebase ARGS IMG` (IMG left out when empty) in `dir`: (exit code, stderr with the program and image named
/// `PROG` and `IMG`).
fn rebase(tool: &Path, dir: &Path, args: &[&str], img: &str) -> (i32, String) {
    let mut cmd = std::process::Command::new(tool);
    cmd.arg("rebase").args(args).current_dir(dir);
    if !img.is_empty() {
        cmd.arg(img);
    }
    let out = cmd.output().expect("run rebase");
    let mut err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !img.is_empty() {
        err = err.replace(img, "IMG");
    }
    (
        out.status.code().unwrap_or(-1),
        err.replace("qemu-img", "PROG").replace("vimg", "PROG"),
    )
}

fn info(img: &Path) -> serde_json::Value {
    let mut v = json(&qemu_img(&["info", "--output=json", "-U", s(img)]));
    // Only what the backing reference decides.
    let keep = [
        "backing-filename",
        "backing-filename-format",
        "virtual-size",
    ];
    if let Some(m) = v.as_object_mut() {
        m.retain(|k, _| keep.contains(&k.as_str()));
    }
    v
}

fn setup(d: &Path, compat: &str) {
    qemu_in(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    qemu_io("qcow2", &d.join("base.qcow2"), &["write -P 7 0 1M"]);
    qemu_in(d, &["create", "-q", "-f", "qcow2", "new.qcow2", "1M"]);
    qemu_io("qcow2", &d.join("new.qcow2"), &["write -P 8 0 512k"]);
    qemu_in(d, &["create", "-q", "-f", "raw", "new.raw", "1M"]);
    qcow2_overlay(
        &d.join("top.qcow2"),
        "base.qcow2",
        &format!("compat={compat}"),
        None,
    );
    qemu_io("qcow2", &d.join("top.qcow2"), &["write -P 1 64k 64k"]);
}

#[test]
fn rebase_unsafe_like_qemu_img() {
    if !qemu_available("rebase_unsafe_like_qemu_img") {
        return;
    }
    let cases: &[&[&str]] = &[
        &["-u", "-b", "new.qcow2", "-F", "qcow2"],
        &["-u", "-b", "new.raw", "-F", "raw"],
        &["-u", "-b", "new.qcow2", "-F", "raw"],
        &["-u", "-b", ""],
        &["-u", "-b", "", "-F", "qcow2"],
        &["-u"],
        &["-u", "-F", "qcow2"],
        // Unsafe mode does not open the new backing file.
        &["-u", "-b", "missing.qcow2", "-F", "qcow2"],
        &["-u", "-b", "sub/dir/x.qcow2", "-F", "qcow2", "-q", "-p"],
        &[
            "-u",
            "-f",
            "qcow2",
            "-t",
            "none",
            "-T",
            "none",
            "-b",
            "new.qcow2",
            "-F",
            "qcow2",
        ],
        // Refusals.
        &["-u", "-b", "new.qcow2"],
        &["-u", "-b", "new.qcow2", "-F", "foo"],
        &["-u", "-b", "new.qcow2", "-F", "qcow2", "-f", "foo"],
    ];
    let qemu = Path::new("qemu-img");
    for compat in ["1.1", "0.10"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        setup(d, compat);
        for case in cases {
            let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
            std::fs::copy(d.join("top.qcow2"), &q).expect("copy");
            std::fs::copy(d.join("top.qcow2"), &v).expect("copy");
            let rq = rebase(qemu, d, case, "q.qcow2");
            let rv = rebase(&vimg_bin(), d, case, "v.qcow2");
            let what = format!("compat={compat} rebase {case:?}");
            assert_eq!(rv, rq, "{what}: vimg (left) vs qemu-img (right)");
            assert_eq!(info(&v), info(&q), "{what}: backing reference");
            if rq.0 != 0 {
                // Refused: not a byte changed.
                assert_same_file(&v, &d.join("top.qcow2"));
                continue;
            }
            let out = run_cmd("qemu-img", &["check", "-U", "-f", "qcow2", s(&v)]);
            let missing = case
                .iter()
                .any(|a| a.contains("missing") || a.contains("sub/"));
            if !missing {
                assert_eq!(out.status.code(), Some(0), "{what}: check: {out:?}");
                let out = run_cmd("qemu-img", &["compare", s(&v), s(&q)]);
                assert_eq!(out.status.code(), Some(0), "{what}: compare: {out:?}");
            }
        }
    }
}

#[test]
fn rebase_refusals() {
    if !qemu_available("rebase_refusals") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    setup(d, "1.1");
    let before = std::fs::read(d.join("top.qcow2")).expect("read");
    // Safe mode with -c compresses the copies now (tests/inplace_qcow2_more.rs).
    // No file name, or two: qemu-img's words.
    let qemu = Path::new("qemu-img");
    for args in [
        &["-u", "-b", ""][..],
        &["-u", "-b", "", "top.qcow2", "top.qcow2"][..],
    ] {
        let q = rebase(qemu, d, args, "");
        let v = rebase(&vimg_bin(), d, args, "");
        assert_eq!(v, q, "rebase {args:?}");
    }
    // A raw image has no backing file to change.
    let q = rebase(
        qemu,
        d,
        &["-u", "-f", "raw", "-b", "x", "-F", "raw"],
        "new.raw",
    );
    let v = rebase(
        &vimg_bin(),
        d,
        &["-u", "-f", "raw", "-b", "x", "-F", "raw"],
        "new.raw",
    );
    assert_eq!(v, q);
    assert_eq!(q.0, 1);
    // A name too long for the one-sector header write: refused, the image unchanged.
    let long = "n".repeat(600);
    let (code, err) = rebase(
        &vimg_bin(),
        d,
        &["-u", "-b", &long, "-F", "qcow2"],
        "top.qcow2",
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        std::fs::read(d.join("top.qcow2")).expect("read") == before,
        "the image changed"
    );
}

/// `amend -o backing_file=/backing_fmt=`: qemu-img takes them only when they repeat what
/// the image has, and otherwise points to rebase; vimg the same, byte for byte.
#[test]
fn amend_backing_like_qemu_img() {
    if !qemu_available("amend_backing_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    setup(d, "1.1");
    let qemu = Path::new("qemu-img");
    for o in [
        "backing_file=new.qcow2",
        "backing_file=base.qcow2",
        "backing_fmt=qcow2",
        "backing_file=",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "backing_file=base.qcow2,backing_fmt=raw",
        "compat=0.10,backing_file=new.qcow2",
        "backing_file=new.qcow2,compat=foo",
        "backing_file=base.qcow2,backing_fmt=qcow2,compat=0.10",
    ] {
        let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
        std::fs::copy(d.join("top.qcow2"), &q).expect("copy");
        std::fs::copy(d.join("top.qcow2"), &v).expect("copy");
        let run = |tool: &Path, img: &str| {
            let out = std::process::Command::new(tool)
                .args(["amend", "-o", o, img])
                .current_dir(d)
                .output()
                .expect("run amend");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
                    .replace("qemu-img", "PROG")
                    .replace("vimg", "PROG"),
            )
        };
        let rq = run(qemu, "q.qcow2");
        let rv = run(&vimg_bin(), "v.qcow2");
        assert_eq!(rv, rq, "amend -o {o}: vimg (left) vs qemu-img (right)");
        let mut iq = info(&q);
        let mut iv = info(&v);
        let compat = |p: &Path| {
            json(&qemu_img(&["info", "--output=json", s(p)]))["format-specific"]["data"]["compat"]
                .clone()
        };
        iq["compat"] = compat(&q);
        iv["compat"] = compat(&v);
        assert_eq!(iv, iq, "amend -o {o}: result");
        if rq.0 != Some(0) {
            assert_same_file(&v, &d.join("top.qcow2"));
        }
    }
}

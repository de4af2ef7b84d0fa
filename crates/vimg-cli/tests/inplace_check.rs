//! `vimg check -r` and `vimg amend` against qemu-img (issue 15): the same command on two
//! copies gives the same stdout, stderr (prefix aside), exit code and guest content, and
//! `qemu-img check` finds the results clean.

mod common;

use std::path::Path;

use common::*;

fn run(tool: &Path, args: &[&str], img: &Path) -> (i32, String, String) {
    let a: Vec<String> = args
        .iter()
        .map(|x| {
            if *x == "{}" {
                s(img).to_string()
            } else {
                x.to_string()
            }
        })
        .collect();
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = run_cmd(tool, &refs);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).replace(s(img), "IMG"),
        String::from_utf8_lossy(&out.stderr)
            .replace("qemu-img", "vimg")
            .replace(s(img), "IMG"),
    )
}

/// Runs each step with both tools on their own copy of `img` and compares.
fn same_as_qemu(img: &Path, steps: &[&[&str]]) {
    let dir = img.parent().expect("dir");
    let q = dir.join("q.qcow2");
    let v = dir.join("v.qcow2");
    std::fs::copy(img, &q).expect("copy");
    std::fs::copy(img, &v).expect("copy");
    for step in steps {
        let rq = run(Path::new("qemu-img"), step, &q);
        let rv = run(&vimg_bin(), step, &v);
        assert_eq!(rv, rq, "{step:?}: vimg (left) vs qemu-img (right)");
        let out = run_cmd(
            "qemu-img",
            &["compare", "-s", "-f", "qcow2", "-F", "qcow2", s(&q), s(&v)],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "content after {step:?}: {out:?}"
        );
        // What qemu-img reads from the headers (compat, lazy refcounts, backing file).
        let keys = |i: &Path| -> Vec<String> {
            qemu_img(&["info", s(i)])
                .lines()
                .filter(|l| l.contains("compat") || l.contains("lazy") || l.contains("backing"))
                .map(|l| l.replace(s(i), "IMG"))
                .collect()
        };
        assert_eq!(keys(&v), keys(&q), "qemu-img info after {step:?}");
    }
}

fn image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    qemu_io("qcow2", &img, &["write -P 1 0 1M", "write -c -P 2 8M 128k"]);
    img
}

#[test]
fn check_repair_leaks_like_qemu() {
    if !qemu_available("check_repair_leaks_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path());
    let end = std::fs::metadata(&img).expect("stat").len() / 65536;
    set_refcount(&img, end, 1);
    set_refcount(&img, end + 1, 2);
    same_as_qemu(
        &img,
        &[
            &["check", "{}"],
            &["check", "-r", "foo", "{}"],
            &["check", "-r", "leaks", "--output=json", "{}"],
            &["check", "-r", "leaks", "{}"],
            &["check", "{}"],
        ],
    );
    let img = image(dir.path());
    let end = std::fs::metadata(&img).expect("stat").len() / 65536;
    set_refcount(&img, end + 3, 5);
    same_as_qemu(&img, &[&["check", "-r", "all", "{}"], &["check", "{}"]]);
}

#[test]
fn check_repair_refcount_zero_like_qemu() {
    if !qemu_available("check_repair_refcount_zero_like_qemu") {
        return;
    }
    // A used cluster with refcount 0: qemu-img -r leaks refuses ("need to rebuild"), as
    // vimg does; -r all repairs (qemu-img rebuilds, vimg sets the refcount: the summary,
    // exit code and content agree, the stderr lines differ).
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path());
    set_refcount(&img, 10, 0);
    set_refcount(&img, 11, 2);
    same_as_qemu(&img, &[&["check", "-r", "leaks", "{}"]]);
    let q = dir.path().join("q2.qcow2");
    let v = dir.path().join("v2.qcow2");
    std::fs::copy(&img, &q).expect("copy");
    std::fs::copy(&img, &v).expect("copy");
    let rq = run(Path::new("qemu-img"), &["check", "-r", "all", "{}"], &q);
    let rv = run(&vimg_bin(), &["check", "-r", "all", "{}"], &v);
    assert_eq!(rv.0, rq.0);
    let summary = |o: &str| o.lines().take(5).collect::<Vec<_>>().join("\n");
    assert_eq!(summary(&rv.1), summary(&rq.1));
    for i in [&q, &v] {
        let out = run_cmd("qemu-img", &["check", s(i)]);
        assert_eq!(out.status.code(), Some(0));
    }
}

#[test]
fn amend_like_qemu() {
    if !qemu_available("amend_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "64M"]);
    qemu_io("qcow2", &base, &["write -P 1 0 2M"]);
    let img = dir.path().join("a.qcow2");
    qcow2_overlay(&img, "base.qcow2", "", None);
    qemu_io("qcow2", &img, &["write -P 2 64k 64k"]);
    let steps: &[&[&str]] = &[
        &["amend", "{}"],
        &["amend", "-o", "compat=0.10", "{}"],
        &["amend", "-o", "compat=0.9", "{}"],
        &["amend", "-o", "cluster_size=4k", "{}"],
        &["amend", "-o", "lazy_refcounts=on", "{}"],
        &["amend", "-o", "compat=1.1,lazy_refcounts=on", "{}"],
        &["amend", "-o", "lazy_refcounts=off", "{}"],
        &["amend", "-o", "foo=1", "{}"],
        &["check", "{}"],
    ];
    same_as_qemu(&img, steps);
}

#[test]
fn amend_refusals_leave_the_image_alone() {
    if !qemu_available("amend_refusals_leave_the_image_alone") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("a.qcow2");
    qemu_create(&img, "qcow2", "refcount_bits=8", "8M");
    let before = std::fs::read(&img).expect("read");
    let out = vimg_raw(&["amend", "-o", "compat=0.10", s(&img)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("compat=0.10 requires refcount_bits=16"));
    // Zero clusters in internal snapshots are expanded now, as qemu-img expands them
    // (tests/inplace_amend3.rs).
    assert_eq!(std::fs::read(&img).expect("read"), before);
}

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

/// `check -r` on formats whose QEMU driver has no repair (vmdk and vdi refuse fixes, vpc,
/// raw and qcow have no check at all): the same refusal, exit code 63 and untouched file,
/// as qemu-img. Without `-r` vimg checks VHDs, where qemu-img has no check (on purpose,
/// README "check"; hostile.rs lists the exit codes).
#[test]
fn check_repair_refused_like_qemu_where_qemu_has_no_repair() {
    if !qemu_available("check_repair_refused_like_qemu_where_qemu_has_no_repair") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for (fmt, opts) in [
        ("vmdk", ""),
        ("vmdk", "subformat=streamOptimized"),
        ("vmdk", "subformat=monolithicFlat"),
        ("vdi", ""),
        ("vpc", ""),
        ("raw", ""),
        ("qcow", ""),
    ] {
        let img = dir.path().join(format!("a.{fmt}"));
        let _ = std::fs::remove_file(&img);
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&img), "16M"]);
        qemu_img(&args);
        if opts != "subformat=streamOptimized" {
            qemu_io(fmt, &img, &["write -P 5 0 64k"]);
        }
        let before = std::fs::read(&img).expect("read");
        let plain: &[&str] = &["check", "-f", fmt, "{}"];
        let steps = [
            plain,
            &["check", "-r", "leaks", "-f", fmt, "{}"],
            &["check", "-r", "all", "{}"],
        ];
        for step in steps.into_iter().filter(|st| fmt != "vpc" || *st != plain) {
            let rq = run(Path::new("qemu-img"), step, &img);
            let rv = run(&vimg_bin(), step, &img);
            assert_eq!(
                rv, rq,
                "{fmt} {opts} {step:?}: vimg (left) vs qemu-img (right)"
            );
            assert!(
                std::fs::read(&img).expect("read") == before,
                "{fmt} {step:?} wrote"
            );
        }
    }
}

/// Every in-place command warns, as qemu-img does, when it opens for writing an image whose
/// format it probed as raw, before its own error; read-only commands do not.
#[test]
fn probed_raw_warned_by_in_place_commands_like_qemu() {
    if !qemu_available("probed_raw_warned_by_in_place_commands_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("r.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("write");
    for step in [
        &["amend", "-o", "size=2M", "{}"][..],
        &["snapshot", "-c", "s", "{}"],
        &["snapshot", "-l", "{}"],
        &["commit", "{}"],
        &["rebase", "-u", "-b", "x", "{}"],
        &["check", "-r", "leaks", "{}"],
        &["check", "{}"],
        &["resize", "{}", "2M"],
        &["amend", "-f", "raw", "-o", "size=2M", "{}"],
    ] {
        let rq = run(Path::new("qemu-img"), step, &img);
        let rv = run(&vimg_bin(), step, &img);
        assert_eq!(rv, rq, "{step:?}: vimg (left) vs qemu-img (right)");
        std::fs::write(&img, vec![0u8; 1 << 20]).expect("write");
    }
}

//! `vimg resize` against qemu-img resize (issue 15): the same command on two copies gives
//! the same stdout, stderr (prefix aside), exit code, virtual size and guest content, and
//! `qemu-img check` finds both clean.

mod common;

use std::path::Path;

use common::*;

/// Runs `tool resize ARGS` (with `{}` for the image) on `img`.
fn run(tool: &Path, args: &[&str], img: &Path) -> (i32, String, String) {
    let a: Vec<String> = std::iter::once("resize".to_string())
        .chain(args.iter().map(|x| {
            if *x == "{}" {
                s(img).to_string()
            } else {
                x.to_string()
            }
        }))
        .collect();
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = run_cmd(tool, &refs);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr)
            .replace("qemu-img", "vimg")
            .replace(s(img), "IMG"),
    )
}

/// `qemu-img compare -s`: same size and same guest content (sparse-aware, so a 10 TiB
/// virtual disk costs nothing).
fn assert_same_guest(a: &Path, b: &Path, fmt: &str, what: &str) {
    let out = run_cmd(
        "qemu-img",
        &["compare", "-s", "-f", fmt, "-F", fmt, s(a), s(b)],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Applies each step with both tools to its own copy of `img`, comparing after each.
fn same_as_qemu(img: &Path, fmt: &str, steps: &[&[&str]]) {
    let dir = img.parent().expect("dir");
    let q = dir.join(format!("q.{fmt}"));
    let v = dir.join(format!("v.{fmt}"));
    std::fs::copy(img, &q).expect("copy");
    std::fs::copy(img, &v).expect("copy");
    let qemu = Path::new("qemu-img");
    for step in steps {
        let rq = run(qemu, step, &q);
        let rv = run(&vimg_bin(), step, &v);
        assert_eq!(rv, rq, "resize {step:?}: vimg (left) vs qemu-img (right)");
        if fmt == "qcow2" {
            for i in [&q, &v] {
                let out = run_cmd("qemu-img", &["check", "-f", "qcow2", s(i)]);
                assert_eq!(out.status.code(), Some(0), "check after {step:?}: {out:?}");
            }
        }
        assert_same_guest(&v, &q, fmt, &format!("guest content after {step:?}"));
    }
}

#[test]
fn resize_qcow2_like_qemu() {
    if !qemu_available("resize_qcow2_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 1 0 1M",
            "write -P 2 60M 4M",
            "write -c -P 3 8M 128k",
            "write -z 20M 1M",
        ],
    );
    same_as_qemu(
        &img,
        "qcow2",
        &[
            &["-f", "qcow2", "{}", "+1G"],
            &["{}", "32M"],
            &["{}", "--", "-100M"],
            &["--shrink", "{}", "-100M"],
            &["{}", "-2G"],
            &["{}", "abc"],
            &["--preallocation=bogus", "{}", "+1M"],
            &["-q", "{}", "+1M"],
            &["--shrink", "{}", "40000k"],
            &["--shrink", "{}", "70M"],
            &["{}", "1T"],
            &["--shrink", "-f", "qcow2", "{}", "1M"],
            &["{}", "64M"],
        ],
    );
}

#[test]
fn resize_qcow2_small_clusters_like_qemu() {
    if !qemu_available("resize_qcow2_small_clusters_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("a.qcow2");
    qemu_create(&img, "qcow2", "cluster_size=512", "1M");
    qemu_io(
        "qcow2",
        &img,
        &["write -P 1 0 100k", "write -P 2 900k 124k"],
    );
    same_as_qemu(
        &img,
        "qcow2",
        &[
            &["{}", "+20M"],
            &["--shrink", "{}", "950k"],
            &["{}", "1M"],
            &["{}", "41G"],
        ],
    );
}

/// Every refcount width and the header variants an in-place writer must keep: the same
/// grow and shrink as qemu-img, `qemu-img check` clean after each.
#[test]
fn resize_qcow2_every_refcount_width_and_variant_like_qemu() {
    if !qemu_available("resize_qcow2_every_refcount_width_and_variant_like_qemu") {
        return;
    }
    let variants = [
        "refcount_bits=1,cluster_size=4096",
        "refcount_bits=2,cluster_size=4096",
        "refcount_bits=4,cluster_size=4096",
        "refcount_bits=8,cluster_size=4096",
        "refcount_bits=32,cluster_size=4096",
        "refcount_bits=64,cluster_size=4096",
        "extended_l2=on",
        "compat=0.10",
        "lazy_refcounts=on",
    ];
    for o in variants {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("a.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", o, s(&img), "8M"]);
        qemu_io("qcow2", &img, &["write -P 0x5a 0 3M", "write -z 4M 1M"]);
        same_as_qemu(
            &img,
            "qcow2",
            &[&["{}", "+5G"], &["--shrink", "{}", "--", "-4G"]],
        );
    }
}

#[test]
fn resize_qcow2_with_backing_like_qemu() {
    if !qemu_available("resize_qcow2_with_backing_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    write_sparse_raw(&base, 4 << 20, &[(0, &pattern(1 << 20, 7))]);
    let img = dir.path().join("a.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&img),
        "4M",
    ]);
    qemu_io("qcow2", &img, &["write -P 9 64k 64k"]);
    same_as_qemu(&img, "qcow2", &[&["{}", "+4M"], &["--shrink", "{}", "6M"]]);
}

#[test]
fn resize_qcow2_over_larger_backing_zeroes_like_qemu() {
    if !qemu_available("resize_qcow2_over_larger_backing_zeroes_like_qemu") {
        return;
    }
    // qemu-img zero-fills the new area where the backing file would show through; vimg
    // does the same (zero clusters switched in with the new size), so the backing file's
    // data past the old size never shows.
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    write_sparse_raw(&base, 4 << 20, &[(2 << 20, &pattern(1 << 20, 7))]);
    let img = dir.path().join("a.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&img),
        "1M",
    ]);
    let theirs = dir.path().join("b.qcow2");
    std::fs::copy(&img, &theirs).expect("copy");
    vimg(&["resize", "-q", s(&img), "4M"]);
    qemu_img(&["resize", "-q", s(&theirs), "4M"]);
    qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", s(&img), s(&theirs)]);
    qemu_img(&["check", "-q", s(&img)]);
    // The backing file's data at 2M..3M does not show through.
    let raw = dir.path().join("out.raw");
    vimg(&["convert", "-f", "qcow2", "-O", "raw", s(&img), s(&raw)]);
    let f = std::fs::File::open(&raw).expect("open");
    let mut got = vec![1u8; 1 << 20];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, 2 << 20).expect("read");
    assert!(got.iter().all(|&b| b == 0));
}

#[test]
fn resize_raw_like_qemu() {
    if !qemu_available("resize_raw_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("a.raw");
    write_sparse_raw(&img, 10 << 20, &[(0, &pattern(65536, 3))]);
    same_as_qemu(
        &img,
        "raw",
        &[
            &["{}", "5M"],
            &["-f", "raw", "{}", "20M"],
            &["-f", "raw", "--preallocation=full", "{}", "30M"],
            &["-f", "raw", "--preallocation=falloc", "{}", "+1M"],
            &["-f", "raw", "--shrink", "{}", "1M"],
            &["{}", "+1M"],
        ],
    );
}

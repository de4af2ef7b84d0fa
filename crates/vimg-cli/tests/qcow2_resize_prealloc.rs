//! `resize --preallocation=metadata|falloc|full` of qcow2 in place, against qemu-img 10:
//! the same image resized by each, then `qemu-img map --output=json`, `qemu-img check`,
//! the file length and the guest content compared (iotest 271's preallocation part); a
//! kill test at sampled points; the refusals.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use common::*;

/// Creates `o` (qcow2 with `opts`, `size`), writes `written` bytes of a pattern at 0.
fn source(o: &Path, opts: &str, size: &str, written: &str) {
    qemu_create(o, "qcow2", opts, size);
    if written != "0" {
        qemu_io("qcow2", o, &[&format!("write -q -P 0x5a 0 {written}")]);
    }
}

fn map(img: &Path) -> String {
    qemu_img(&["map", "--output=json", "-f", "qcow2", s(img)])
}

fn compare_with_qemu(opts: &str, size: &str, written: &str, new: &str, mode: &str) {
    let what = format!("-o {opts} {size} (written {written}) -> {new} --preallocation={mode}");
    let dir = tempfile::tempdir().expect("tempdir");
    let o = dir.path().join("o.qcow2");
    let q = dir.path().join("q.qcow2");
    let v = dir.path().join("v.qcow2");
    source(&o, opts, size, written);
    std::fs::copy(&o, &q).expect("copy");
    std::fs::copy(&o, &v).expect("copy");
    let pre = format!("--preallocation={mode}");
    qemu_img(&["resize", "-q", "-f", "qcow2", &pre, s(&q), new]);
    vimg(&["resize", "-q", "-f", "qcow2", &pre, s(&v), new]);
    assert_eq!(map(&v), map(&q), "{what}: qemu-img map");
    let (vc, vout) = qemu_check_output(&v, "qcow2");
    let (qc, qout) = qemu_check_output(&q, "qcow2");
    assert_eq!(vc, 0, "{what}: qemu-img check:\n{vout}");
    assert_eq!(
        vout.replace(s(&v), "IMG"),
        qout.replace(s(&q), "IMG"),
        "{what}: qemu-img check output"
    );
    assert_eq!(qc, 0);
    assert_eq!(size_of(&v), size_of(&q), "{what}: file length");
    let out = run_cmd("qemu-img", &["compare", "-q", s(&q), s(&v)]);
    assert_eq!(out.status.code(), Some(0), "{what}: guest content");
    // The old content is still there; the new area reads as zeros.
    let out = run_cmd("qemu-img", &["compare", "-q", s(&o), s(&v)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: content against the source"
    );
}

#[test]
fn resize_preallocation_like_qemu() {
    if !qemu_available("resize_preallocation_like_qemu") {
        return;
    }
    let cases: &[(&str, &str, &str, &str)] = &[
        // iotest 271's: extended L2, grown from a size inside a cluster.
        ("extended_l2=on,cluster_size=32768", "503k", "503k", "1013k"),
        ("extended_l2=on", "503k", "0", "1013k"),
        ("cluster_size=65536", "503k", "503k", "1013k"),
        ("cluster_size=65536", "1M", "512k", "3M"),
        // v2, small clusters, several L2 tables and a growing L1 table.
        ("compat=0.10,cluster_size=4096", "503k", "300k", "7M"),
        ("cluster_size=4096", "1M", "0", "5M"),
        ("cluster_size=65536,refcount_bits=1", "1M", "300k", "13M"),
        ("extended_l2=on,cluster_size=16384", "1M", "200k", "600M"),
    ];
    for &(opts, size, written, new) in cases {
        for mode in ["metadata", "falloc", "full"] {
            compare_with_qemu(opts, size, written, new, mode);
        }
    }
}

#[test]
fn resize_preallocation_over_compressed_and_zero_head_reads_right() {
    if !qemu_available("resize_preallocation_over_compressed_and_zero_head_reads_right") {
        return;
    }
    // The cluster the old size ends in is compressed (moved by every mode) or a zero
    // cluster: the guest content before the old size survives, the rest reads zeros.
    for head in ["compressed", "zero"] {
        for mode in ["metadata", "falloc", "full"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let o = dir.path().join("o.qcow2");
            let v = dir.path().join("v.qcow2");
            let q = dir.path().join("q.qcow2");
            qemu_create(&o, "qcow2", "cluster_size=4096", "12k");
            if head == "compressed" {
                qemu_io("qcow2", &o, &["write -q -c -P 0x77 8k 4k"]);
            } else {
                qemu_io("qcow2", &o, &["write -q -z 8k 4k"]);
            }
            qemu_io("qcow2", &o, &["write -q -P 0x11 0 4k"]);
            // The size then ends inside that cluster.
            qemu_img(&["resize", "-q", "--shrink", s(&o), "10k"]);
            std::fs::copy(&o, &v).expect("copy");
            std::fs::copy(&o, &q).expect("copy");
            let pre = format!("--preallocation={mode}");
            vimg(&["resize", "-q", "-f", "qcow2", &pre, s(&v), "100k"]);
            qemu_img(&["resize", "-q", "-f", "qcow2", &pre, s(&q), "100k"]);
            let what = format!("{head} head, {mode}");
            let (code, out) = qemu_check_output(&v, "qcow2");
            assert_eq!(code, 0, "{what}: {out}");
            let out = run_cmd("qemu-img", &["compare", "-q", s(&o), s(&v)]);
            assert_eq!(out.status.code(), Some(0), "{what}: content");
            let out = run_cmd("qemu-img", &["compare", "-q", s(&q), s(&v)]);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{what}: content against qemu-img's"
            );
        }
    }
}

#[test]
fn resize_preallocation_refusals() {
    if !qemu_available("resize_preallocation_refusals") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("t.qcow2");
    qemu_create(&img, "qcow2", "", "1M");
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    let before = sha256_file(&img);
    let out = vimg_raw(&["resize", "--preallocation=metadata", s(&img), "2M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vimg cannot preallocate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256_file(&img), before, "refused, but the image changed");
    // Shrinking with preallocation: qemu-img's words.
    let img2 = dir.path().join("u.qcow2");
    qemu_create(&img2, "qcow2", "", "1M");
    let q = run_cmd(
        "qemu-img",
        &[
            "resize",
            "--shrink",
            "--preallocation=falloc",
            s(&img2),
            "512k",
        ],
    );
    let v = vimg_raw(&[
        "resize",
        "--shrink",
        "--preallocation=falloc",
        s(&img2),
        "512k",
    ]);
    assert_eq!(v.status.code(), q.status.code());
    assert!(said(&v).contains("Preallocation can't be used for shrinking an image"));
}

const HOOK: &str = "VIMG_TEST_CRASH_AFTER_WRITES";

#[test]
fn resize_preallocation_killed_at_sampled_points() {
    if !qemu_available("resize_preallocation_killed_at_sampled_points") {
        return;
    }
    for (opts, mode) in [
        ("cluster_size=4096", "metadata"),
        ("cluster_size=4096", "falloc"),
        ("extended_l2=on,cluster_size=16384", "full"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let o = dir.path().join("o.qcow2");
        source(&o, opts, "503k", "503k");
        let q = dir.path().join("q.qcow2");
        std::fs::copy(&o, &q).expect("copy");
        let pre = format!("--preallocation={mode}");
        qemu_img(&["resize", "-q", "-f", "qcow2", &pre, s(&q), "9M"]);
        let mut n = 0u64;
        let mut kills = 0;
        loop {
            let v = dir.path().join("v.qcow2");
            std::fs::copy(&o, &v).expect("copy");
            let out = Command::new(vimg_bin())
                .args(["resize", "-q", "-f", "qcow2", &pre, s(&v), "9M"])
                .env(HOOK, n.to_string())
                .output()
                .expect("run vimg");
            let killed = out.status.signal() == Some(9);
            let status = out;
            let what = format!("{opts} {mode}, killed at point {n}");
            let (code, text) = qemu_check_output(&v, "qcow2");
            assert!(code == 0 || code == 3, "{what}: qemu-img check:\n{text}");
            let info = json(&qemu_img(&["info", "--output=json", s(&v)]));
            let vs = info["virtual-size"].as_u64().expect("virtual-size");
            assert!(vs == 515072 || vs == 9 << 20, "{what}: size {vs}");
            // The old guest content is intact; the new area (if switched in) reads zeros.
            let out = run_cmd("qemu-img", &["compare", "-q", s(&o), s(&v)]);
            assert_eq!(out.status.code(), Some(0), "{what}: content");
            if !killed {
                assert!(status.status.success(), "{what}: {}", said(&status));
                assert_eq!(map(&v), map(&q), "{what}: finished run's map");
                break;
            }
            kills += 1;
            // `check -r leaks` then leaves it clean.
            vimg(&["check", "-q", "-r", "leaks", s(&v)]);
            let (code, text) = qemu_check_output(&v, "qcow2");
            assert_eq!(code, 0, "{what}: after check -r leaks:\n{text}");
            // Sample the points: every one early, then in wider steps.
            n += if n < 12 { 1 } else { 1 + n / 4 };
        }
        assert!(kills >= 5, "{opts} {mode}: only {kills} kill points");
    }
}

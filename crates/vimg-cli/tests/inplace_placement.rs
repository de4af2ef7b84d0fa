//! qcow2 in-place changes that keep QEMU's placement of the tables (iotests 271, 061):
//! - `resize` growing an image over a longer backing file zero-flags the new area in the
//!   L2 tables where they are, grows the L1 table first when it must and puts new L2
//!   tables where QEMU's allocator does: the file is byte for byte qemu-img's; a SIGKILL
//!   at every point leaves the old or the new image, clean or leaking;
//! - `amend -o compat=0.10` of an image with zero clusters and no snapshots expands them
//!   where the L2 tables are: byte for byte qemu-img's file; killed at every point, the
//!   guest is unchanged and `check` finds leaks at worst;
//! - `amend -o compat=1.1` writes QEMU's feature-name table into the new version 3 header
//!   (when it fits in the one sector vimg writes atomically).

mod common;

use std::path::Path;

use common::kill::{check_then_repair, each_kill_point, guest};
use common::*;

/// A raw backing file of 4 MiB of 0xff, and a qcow2 image over it created with `opts`,
/// 1 MiB of which the first 128 KiB are written, shrunk to 64 KiB (iotest 271's way of
/// discarding clusters past 64 KiB).
fn shrunk_over_backing(d: &Path, name: &str, opts: &str) -> std::path::PathBuf {
    let base = d.join("base.raw");
    if !base.exists() {
        qemu_img(&["create", "-q", "-f", "raw", s(&base), "4M"]);
        qemu_io("raw", &base, &["write -q -P 0xff 0 4M"]);
    }
    let img = d.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&img),
        "1M",
    ]);
    qemu_io("qcow2", &img, &["write -q -P 1 0 128k"]);
    qemu_img(&["resize", "-q", "--shrink", s(&img), "64k"]);
    img
}

#[test]
fn grow_over_backing_zeroes_in_place_as_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Existing tables (64 KiB clusters, standard and extended entries), new L2 tables and
    // a longer L1 table (512-byte clusters).
    for opts in ["extended_l2=on", "cluster_size=65536", "cluster_size=512"] {
        let q = shrunk_over_backing(d, "q.qcow2", opts);
        let v = shrunk_over_backing(d, "v.qcow2", opts);
        qemu_img(&["resize", "-q", s(&q), "3M"]);
        vimg(&["resize", "-q", s(&v), "3M"]);
        let (qb, vb) = (std::fs::read(&q).unwrap(), std::fs::read(&v).unwrap());
        assert!(qb == vb, "{opts}: vimg's file differs from qemu-img's");
        qemu_img(&["check", "-q", s(&v)]);
    }
    // 4 KiB clusters: the new L1 table is the file's last structure; qemu-img writes only
    // its entries, vimg the whole cluster (the file is extended before a refcount
    // describes it), so only the length differs.
    let q = shrunk_over_backing(d, "q.qcow2", "cluster_size=4096");
    let v = shrunk_over_backing(d, "v.qcow2", "cluster_size=4096");
    qemu_img(&["resize", "-q", s(&q), "3M"]);
    vimg(&["resize", "-q", s(&v), "3M"]);
    let (qb, vb) = (std::fs::read(&q).unwrap(), std::fs::read(&v).unwrap());
    assert!(
        vb.len() >= qb.len() && vb[..qb.len()] == qb[..],
        "4 KiB clusters: layout"
    );
    assert!(vb[qb.len()..].iter().all(|&b| b == 0));
    qemu_img(&["compare", "-q", s(&q), s(&v)]);
    qemu_img(&["check", "-q", s(&v)]);
}

#[test]
fn grow_over_backing_in_place_killed() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 512-byte clusters, 64 KiB to 160 KiB: a longer L1 table, three new L2 tables and an
    // existing one zero-flagged (a few dozen writes: every point is run).
    for (opts, to) in [("cluster_size=512", "160k"), ("extended_l2=on", "1M")] {
        let pristine = shrunk_over_backing(d, "p.qcow2", opts);
        let old = guest(&pristine, "qcow2");
        let want = d.join("want.qcow2");
        std::fs::copy(&pristine, &want).unwrap();
        qemu_img(&["resize", "-q", s(&want), to]);
        let new = guest(&want, "qcow2");
        let work = d.join("w.qcow2");
        let killed = each_kill_point(&pristine, &work, &["resize", "-q", s(&work), to], 200, {
            |n, _done| {
                let what = format!("{opts}: killed before write {n}");
                check_then_repair(&work, "qcow2", &what);
                let got = guest(&work, "qcow2");
                assert!(got == old || got == new, "{what}: neither old nor new");
            }
        });
        assert!(killed > 3, "{opts}: only {killed} kill points");
    }
}

/// A version 3 image `t.qcow2` in `dir` (created there), over `base.qcow2` when
/// `backing`, with zero clusters: unallocated ones and, over data, allocated ones.
fn zero_clusters_image(dir: &Path, backing: bool) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let img = dir.join("t.qcow2");
    if backing {
        let base = dir.join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "64M"]);
        qemu_io(
            "qcow2",
            &base,
            &[
                "write -q -P 9 0 1M",
                "write -q -P 9 20M 1M",
                "write -q -P 9 63M 1M",
            ],
        );
        qemu_in(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "t.qcow2",
                "64M",
            ],
        );
    } else {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(&img),
            "64M",
        ]);
    }
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -q -P 1 0 256k",
            "write -q -z 64k 64k",
            "write -q -z 20M 8k",
            "write -q -P 3 40M 64k",
            "write -q -z 40M 64k",
            "write -q -z 63M 8k",
        ],
    );
    img
}

#[test]
fn downgrade_expands_zero_clusters_in_place_as_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for backing in [true, false] {
        // Same folder names on both sides, so the backing names are the same bytes.
        let q = zero_clusters_image(&dir.path().join(format!("q{backing}")), backing);
        let v = zero_clusters_image(&dir.path().join(format!("v{backing}")), backing);
        qemu_img(&["amend", "-o", "compat=0.10", s(&q)]);
        vimg(&["amend", "-o", "compat=0.10", s(&v)]);
        let (qb, vb) = (std::fs::read(&q).unwrap(), std::fs::read(&v).unwrap());
        assert!(
            qb == vb,
            "backing {backing}: vimg's file differs from qemu-img's"
        );
        qemu_img(&["check", "-q", s(&v)]);
    }
}

#[test]
fn downgrade_in_place_killed() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pristine = zero_clusters_image(d, true);
    let old = guest(&pristine, "qcow2");
    let work = d.join("w.qcow2");
    let killed = each_kill_point(
        &pristine,
        &work,
        &["amend", "-o", "compat=0.10", s(&work)],
        100,
        |n, done| {
            let what = format!("killed before write {n}");
            check_then_repair(&work, "qcow2", &what);
            assert!(guest(&work, "qcow2") == old, "{what}: the guest changed");
            let v = rd64be(&work, 0) & 0xffff_ffff;
            assert!(!done || v == 2, "{what}: finished, version {v}");
        },
    );
    assert!(killed > 5, "only {killed} kill points");
}

/// `amend -o compat=1.1` of a version 2 image: the header QEMU writes, its feature-name
/// table included, byte for byte.
#[test]
fn upgrade_writes_qemus_feature_table() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
    for p in [&q, &v] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            s(p),
            "64M",
        ]);
        qemu_io("qcow2", p, &["write -q -P 5 1M 64k"]);
    }
    qemu_img(&["amend", "-o", "compat=1.1,size=128M", s(&q)]);
    vimg(&["amend", "-o", "compat=1.1,size=128M", s(&v)]);
    let (qb, vb) = (std::fs::read(&q).unwrap(), std::fs::read(&v).unwrap());
    assert!(qb == vb, "vimg's file differs from qemu-img's");
}

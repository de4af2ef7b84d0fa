//! `create`/`convert -O qcow2 -o preallocation=falloc|full` lay the file out as qemu-img
//! does (QEMU's `qcow2_co_truncate`: a new refcount table after the L1 table, the data in one
//! run after it, the first L2 table in the freed cluster 1): byte for byte the same file over
//! cluster sizes, refcount widths, extended L2, compat=0.10 and sizes that need several L2
//! tables and refcount blocks. Writes into preallocated extended-L2 clusters use them
//! (vimg allocated new clusters and leaked the preallocated ones).

mod common;

use std::path::Path;

use common::*;

fn same_file(q: &Path, v: &Path, what: &str) {
    // cmp(1): the files are up to 1 GiB (mostly holes).
    let out = run_cmd("cmp", &[s(q), s(v)]);
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn create_falloc_full_byte_identical_to_qemu_img() {
    if !qemu_available("create_falloc_full_byte_identical_to_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (q, v) = (dir.path().join("q.qcow2"), dir.path().join("v.qcow2"));
    let mut n = 0;
    for opts in [
        "cluster_size=65536",
        "cluster_size=512",
        "cluster_size=512,refcount_bits=64",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=2097152",
        "cluster_size=16384,extended_l2=on,refcount_bits=8",
        "compat=0.10",
        "cluster_size=1024,refcount_bits=32,lazy_refcounts=on",
    ] {
        // qemu-img takes half a minute for 1G with 512-byte clusters: small sizes there
        // (5000000 bytes still need several refcount blocks and table clusters).
        let small = opts.contains("=512,") || opts.ends_with("=512") || opts.contains("=1024");
        // 1G (several L2 tables with 64 KiB clusters; comparing takes seconds) for the
        // default and the largest clusters only.
        let sizes: &[&str] = if small {
            &["0", "1M", "5000000"]
        } else if opts == "cluster_size=65536" || opts == "cluster_size=2097152" {
            &["0", "1M", "100000k", "5000000", "1G"]
        } else {
            &["0", "1M", "100000k", "5000000"]
        };
        for &size in sizes {
            for mode in ["falloc", "full"] {
                // `full` writes every byte, in both tools: the small sizes only.
                if mode == "full" && (size == "1G" || size == "100000k") {
                    continue;
                }
                let o = format!("preallocation={mode},{opts}");
                let _ = std::fs::remove_file(&q);
                let _ = std::fs::remove_file(&v);
                qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, s(&q), size]);
                vimg(&["create", "-q", "-f", "qcow2", "-o", &o, s(&v), size]);
                same_file(&q, &v, &format!("create -o {o} {size}"));
                n += 1;
            }
        }
    }
    assert_eq!(n, 55);
}

#[test]
fn convert_falloc_full_byte_identical_to_qemu_img() {
    if !qemu_available("convert_falloc_full_byte_identical_to_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("s.raw");
    let data = pattern(3 << 20, 7);
    write_sparse_raw(
        &src,
        24_000 << 10,
        &[(0, &data[..]), (20 << 20, &data[..1 << 20])],
    );
    let (q, v) = (dir.path().join("q.qcow2"), dir.path().join("v.qcow2"));
    for opts in [
        "cluster_size=65536",
        "cluster_size=512,refcount_bits=64",
        "cluster_size=2097152",
        "compat=0.10",
        "cluster_size=1024,refcount_bits=32",
    ] {
        for mode in ["falloc", "full"] {
            let o = format!("preallocation={mode},{opts}");
            let _ = std::fs::remove_file(&q);
            let _ = std::fs::remove_file(&v);
            qemu_img(&[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &o,
                s(&src),
                s(&q),
            ]);
            vimg(&[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &o,
                s(&src),
                s(&v),
            ]);
            same_file(&q, &v, &format!("convert -o {o}"));
        }
    }
}

/// Preallocated extended-L2 clusters have a host offset and no allocated subcluster; a
/// write goes into them, as in QEMU, so `qemu-img check` finds no leak and the map is
/// qemu-img's.
#[test]
fn extended_l2_preallocated_clusters_are_written_in_place() {
    if !qemu_available("extended_l2_preallocated_clusters_are_written_in_place") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("s.raw");
    let data = pattern(3 << 20, 9);
    write_sparse_raw(
        &src,
        64 << 20,
        &[(0, &data[..]), (30 << 20, &data[..1 << 20])],
    );
    for mode in ["metadata", "falloc", "full"] {
        let (q, v) = (dir.path().join("q.qcow2"), dir.path().join("v.qcow2"));
        let _ = std::fs::remove_file(&q);
        let _ = std::fs::remove_file(&v);
        let o = format!("preallocation={mode},extended_l2=on");
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &o,
            s(&src),
            s(&q),
        ]);
        vimg(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &o,
            s(&src),
            s(&v),
        ]);
        let out = run_cmd("qemu-img", &["check", s(&v)]);
        assert_eq!(out.status.code(), Some(0), "{o}: {out:?}");
        let map = |f: &Path| qemu_img(&["map", "--output=json", s(f)]);
        assert_eq!(map(&v), map(&q), "{o}: map");
        same_file(&q, &v, &o);
    }
}

/// A backing file with preallocation needs extended L2 entries (a preallocated cluster would
/// hide the backing file's data otherwise): refused by `create` and `convert -B` with
/// qemu-img's words and exit code, and nothing left behind; with extended L2 the same file.
#[test]
fn backing_with_preallocation_needs_extended_l2_like_qemu_img() {
    if !qemu_available("backing_with_preallocation_needs_extended_l2_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "8M"]);
    let src = d.join("s.raw");
    write_sparse_raw(&src, 8 << 20, &[(0, &pattern(1 << 20, 3)[..])]);
    let out = d.join("o.qcow2");
    let runs: [&[&str]; 3] = [
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "preallocation=falloc",
            "o.qcow2",
            "8M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "o.qcow2",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "preallocation=full",
            "s.raw",
            "o.qcow2",
        ],
    ];
    for args in runs {
        let mut res = Vec::new();
        for tool in [std::path::PathBuf::from("qemu-img"), vimg_bin()] {
            let o = std::process::Command::new(&tool)
                .args(args)
                .current_dir(d)
                .output()
                .expect("run");
            assert!(!out.exists(), "{tool:?} {args:?} left the output");
            res.push((
                o.status.code(),
                String::from_utf8_lossy(&o.stdout).to_string(),
                String::from_utf8_lossy(&o.stderr).replace("qemu-img:", "vimg:"),
            ));
        }
        assert_eq!(res[1], res[0], "{args:?}: vimg (left) vs qemu-img (right)");
        assert_eq!(res[0].0, Some(1), "{args:?}");
    }
    let o = "preallocation=falloc,extended_l2=on";
    let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        "-o",
        o,
        s(&q),
        "8M",
    ]);
    vimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        "-o",
        o,
        s(&v),
        "8M",
    ]);
    same_file(&q, &v, o);
}

//! Guest writes into existing qcow (version 1) images and compressed qcow output (issue
//! 15), qemu-img 10.0.2 as the oracle: `convert -n` into a qcow image (with old data, with
//! compressed clusters, over a backing file), `commit` of a qcow top into a qcow base
//! (sub-cluster writes into compressed clusters of the base, the top emptied as QEMU's
//! `qcow_make_empty` leaves it) and of a qcow2 top, each done by qemu-img and by vimg on
//! copies: the results read the same (`qemu-img compare`). `convert -c -O qcow` writes
//! compressed clusters qemu-img reads identically, uncompressed where compression saves
//! nothing. What qemu-img's qcow driver cannot do (resize, rebase, amend, check) is refused
//! in qemu-img's words with nothing written. A run killed (SIGKILL) before any of its
//! writes and flushes leaves every cluster old or new and an image that opens, and the rerun
//! completes.

mod common;

use std::path::{Path, PathBuf};

use common::kill::{assert_old_or_new, guest, run_killed};
use common::*;

const MIB: u64 = 1 << 20;

/// A 6 MiB raw source: data over cluster boundaries, zeros over old data, a partial
/// cluster, data in the last cluster.
fn source(dir: &Path) -> PathBuf {
    let src = dir.join("src.raw");
    let a = pattern(MIB as usize + 4096, 3);
    let b = pattern(200 << 10, 4);
    write_sparse_raw(
        &src,
        6 * MIB,
        &[
            (0, &a[..]),
            (2 * MIB, &[0u8; 512 << 10][..]),
            (3 * MIB + 512, &b[..]),
            (6 * MIB - 8192, &a[..8192]),
        ],
    );
    src
}

/// `qemu-img convert -c -O qcow ...`: qemu-img 10.0.2 writes the whole image, then its
/// final zero-length compressed write ("signal EOF to align") fails in QEMU's qcow driver
/// (-EINVAL for a write that is not one cluster), so it exits 1 without a message. vimg
/// exits 0 (the image is complete).
fn qemu_convert_c(args: &[&str]) {
    let mut all = vec!["convert", "-c"];
    all.extend_from_slice(args);
    let out = run_cmd("qemu-img", &all);
    assert!(
        matches!(out.status.code(), Some(0 | 1)) && out.stderr.is_empty(),
        "qemu-img {all:?}: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn compare(a: &Path, b: &Path, what: &str) {
    let out = run_cmd("qemu-img", &["compare", s(a), s(b)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: {} vs {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn digests(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                sha256_file(&e.path()),
            )
        })
        .collect();
    v.sort();
    v
}

/// The L2 entries of a qcow image that are compressed (bit 63).
fn compressed_entries(img: &Path) -> usize {
    let b = std::fs::read(img).unwrap();
    let be64 = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let size = be64(0x18);
    let (cb, l2b) = (u32::from(b[0x20]), u32::from(b[0x21]));
    let l1_off = be64(0x28) as usize;
    let l1_size = size.div_ceil(1 << (cb + l2b)) as usize;
    let mut n = 0;
    for i in 0..l1_size {
        let l2 = be64(l1_off + i * 8) as usize;
        if l2 == 0 {
            continue;
        }
        for j in 0..(1usize << l2b) {
            if be64(l2 + j * 8) >> 63 == 1 {
                n += 1;
            }
        }
    }
    n
}

/// Targets: plain with old data; compressed (every cluster of old data compressed); a
/// top over a raw backing file (512-byte clusters, as qemu-img creates it).
fn targets(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let mut v = Vec::new();
    let p = dir.join("plain");
    std::fs::create_dir_all(&p).unwrap();
    let t = p.join("t.qcow");
    qemu_img(&["create", "-q", "-f", "qcow", s(&t), "8M"]);
    qemu_io(
        "qcow",
        &t,
        &[
            "write -P 0xaa 0 3M",
            "write -P 0xbb 6M 1M",
            "write -P 0xcc 5M 64k",
        ],
    );
    v.push(("plain", p));
    let p = dir.join("compressed");
    std::fs::create_dir_all(&p).unwrap();
    let old = p.join("old.raw");
    let x = pattern(3 * MIB as usize, 9);
    // Compressible: each 4 KiB cluster repeats a 256-byte pattern.
    let x: Vec<u8> = x
        .iter()
        .enumerate()
        .map(|(i, _)| x[i % 256 + (i / 4096) % 7])
        .collect();
    write_sparse_raw(&old, 8 * MIB, &[(0, &x[..]), (6 * MIB, &x[..MIB as usize])]);
    let t = p.join("t.qcow");
    qemu_convert_c(&["-q", "-f", "raw", "-O", "qcow", s(&old), s(&t)]);
    std::fs::remove_file(&old).unwrap();
    assert!(compressed_entries(&t) > 100);
    v.push(("compressed", p));
    let p = dir.join("backed");
    std::fs::create_dir_all(&p).unwrap();
    let b = p.join("b.raw");
    write_sparse_raw(&b, 8 * MIB, &[(MIB, &pattern(3 * MIB as usize, 5)[..])]);
    let t = p.join("t.qcow");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "-b",
        "b.raw",
        "-F",
        "raw",
        s(&t),
        "8M",
    ]);
    qemu_io(
        "qcow",
        &t,
        &["write -P 0xdd 512 64k", "write -P 0xee 7M 4k"],
    );
    v.push(("backed", p));
    v
}

#[test]
fn convert_n_into_qcow_like_qemu_img() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    for (name, p) in targets(d) {
        let (qd, vd) = (d.join(format!("q-{name}")), d.join(format!("v-{name}")));
        copy_dir(&p, &qd);
        copy_dir(&p, &vd);
        let (qt, vt) = (qd.join("t.qcow"), vd.join("t.qcow"));
        qemu_img(&["convert", "-n", "-f", "raw", "-O", "qcow", s(&src), s(&qt)]);
        vimg(&["convert", "-n", "-f", "raw", "-O", "qcow", s(&src), s(&vt)]);
        compare(&qt, &vt, name);
        // What lies past the source's end is left as it was.
        let (g, o) = (guest(&vt, "qcow"), guest(&p.join("t.qcow"), "qcow"));
        assert!(
            g[6 * MIB as usize..] == o[6 * MIB as usize..],
            "{name}: tail"
        );
        assert!(
            g[..6 * MIB as usize] == std::fs::read(&src).unwrap()[..],
            "{name}"
        );
        // vimg reads what it wrote as qemu-img does.
        assert_reads_like_qemu(&vt, "qcow", &vd);
        // A second run writes in place: nothing new is allocated, the file keeps its size.
        let before = size_of(&vt);
        vimg(&["convert", "-n", "-f", "raw", "-O", "qcow", s(&src), s(&vt)]);
        compare(&qt, &vt, name);
        assert_eq!(before, size_of(&vt), "{name}: second run");
    }
}

#[test]
fn commit_into_qcow_like_qemu_img() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, p) in targets(d) {
        if name == "backed" {
            continue;
        }
        for top_fmt in ["qcow", "qcow2"] {
            let top = p.join(format!("top.{top_fmt}"));
            let _ = std::fs::remove_file(&top);
            qemu_img(&[
                "create",
                "-q",
                "-f",
                top_fmt,
                "-b",
                "t.qcow",
                "-F",
                "qcow",
                s(&top),
            ]);
            // A qcow top has 512-byte clusters: sub-cluster writes into the base's 4 KiB
            // (compressed) clusters.
            qemu_io(
                top_fmt,
                &top,
                &[
                    "write -P 0x11 512 1k",
                    "write -P 0x22 4M 1M",
                    "write -P 0x33 2047k 3k",
                    "write -z 6M 8k",
                ],
            );
            let what = format!("{name} <- {top_fmt}");
            let (qd, vd) = (d.join("q"), d.join("v"));
            copy_dir(&p, &qd);
            copy_dir(&p, &vd);
            let want = guest(&qd.join(top.file_name().unwrap()), top_fmt);
            let qc = run_cmd(
                "qemu-img",
                &["commit", s(&qd.join(top.file_name().unwrap()))],
            );
            assert_eq!(qc.status.code(), Some(0), "{what}: qemu-img commit");
            let vc = vimg_raw(&["commit", s(&vd.join(top.file_name().unwrap()))]);
            assert_eq!(
                vc.status.code(),
                Some(0),
                "{what}: vimg commit: {}",
                String::from_utf8_lossy(&vc.stderr)
            );
            let (qb, vb) = (qd.join("t.qcow"), vd.join("t.qcow"));
            compare(&qb, &vb, &what);
            assert!(
                guest(&vb, "qcow") == want,
                "{what}: the base holds the top's content"
            );
            // The top reads the same through the base; a qcow top is emptied as QEMU
            // empties it (L1 zeroed, the file cut after it): the same bytes.
            let (qt, vt) = (
                qd.join(top.file_name().unwrap()),
                vd.join(top.file_name().unwrap()),
            );
            compare(&qt, &vt, &what);
            if top_fmt == "qcow" {
                assert_same_file(&qt, &vt);
            }
            std::fs::remove_file(&top).unwrap();
        }
    }
}

#[test]
fn convert_c_to_qcow_like_qemu_img() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    // Compressible text, an incompressible cluster (random), zeros, and a size that does
    // not end on a cluster boundary.
    let text: Vec<u8> = (0..(2 * MIB as usize))
        .map(|i| b"qcow v1 "[i % 8] ^ (i / 4096) as u8)
        .collect();
    let noise = pattern(8192, 11);
    write_sparse_raw(
        &src,
        4 * MIB + 1536,
        &[
            (0, &text[..]),
            (3 * MIB, &noise[..]),
            (4 * MIB, &text[..1536]),
        ],
    );
    let (q, v) = (d.join("q.qcow"), d.join("v.qcow"));
    qemu_convert_c(&["-f", "raw", "-O", "qcow", s(&src), s(&q)]);
    vimg(&["convert", "-c", "-f", "raw", "-O", "qcow", s(&src), s(&v)]);
    compare(&q, &v, "convert -c");
    compare(&src, &v, "convert -c against the source");
    assert_reads_like_qemu(&v, "qcow", d);
    let (nq, nv) = (compressed_entries(&q), compressed_entries(&v));
    assert_eq!(nq, nv, "the same clusters compressed");
    assert!(nv >= 512, "{nv} compressed clusters");
    assert!(size_of(&v) < 4 * MIB / 4, "{} bytes", size_of(&v));
    // The incompressible clusters are stored plain: qemu-img map shows them at an offset.
    let m = json(&qemu_img(&["map", "--output=json", s(&v)]));
    let plain = m
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true && e.get("offset").is_some())
        .count();
    assert!(plain >= 1, "{m}");
    // Over a backing file (512-byte clusters): compressed too.
    let top = d.join("top.qcow");
    vimg(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow",
        "-B",
        "src.raw",
        "-F",
        "raw",
        s(&src),
        s(&top),
    ]);
    compare(&src, &top, "convert -c -B");
    // Encrypted and compressed: QEMU would store the clusters in clear; refused.
    let e = d.join("e.qcow");
    let out = vimg_raw(&[
        "convert",
        "-c",
        "--object",
        "secret,id=sec0,data=123456",
        "-O",
        "qcow",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        s(&src),
        s(&e),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unencrypted"));
    assert!(!e.exists());
}

#[test]
fn what_qemu_img_cannot_do_on_qcow_is_refused_untouched() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = d.join("b.qcow");
    let t = d.join("t.qcow");
    qemu_img(&["create", "-q", "-f", "qcow", s(&b), "4M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "-b",
        "b.qcow",
        "-F",
        "qcow",
        s(&t),
    ]);
    qemu_io("qcow", &t, &["write -P 0x5a 0 64k"]);
    let e = d.join("e.qcow");
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=sec0,data=123456",
        "-f",
        "qcow",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        s(&e),
        "4M",
    ]);
    let src = d.join("s.raw");
    write_sparse_raw(&src, 4 * MIB, &[(0, &pattern(4096, 1)[..])]);
    let cases: &[(&[&str], i32)] = &[
        (&["resize", s(&t), "8M"], 1),
        (&["rebase", "-u", "-b", "s.raw", "-F", "raw", s(&t)], 1),
        (&["rebase", "-b", "", s(&t)], 1),
        (&["amend", "-o", "size=8M", s(&t)], 1),
        (&["check", "-r", "all", s(&t)], 63),
        (&["snapshot", "-c", "s1", s(&t)], 1),
        (&["convert", "-n", "-O", "qcow", s(&src), s(&e)], 1),
    ];
    for (args, code) in cases {
        let before = digests(d);
        let q = run_cmd("qemu-img", args);
        let qerr = String::from_utf8_lossy(&q.stderr).replace("qemu-img: ", "");
        assert_eq!(q.status.code(), Some(*code), "qemu-img {args:?}: {qerr}");
        let after_q = digests(d);
        // Restore whatever qemu-img changed (nothing, for these).
        assert_eq!(before, after_q, "qemu-img {args:?} changed files");
        let v = vimg_raw(args);
        let verr = String::from_utf8_lossy(&v.stderr).replace("vimg: ", "");
        assert_eq!(v.status.code(), Some(*code), "vimg {args:?}: {verr}");
        assert_eq!(verr, qerr, "vimg {args:?}");
        assert_eq!(before, digests(d), "vimg {args:?} changed files");
    }
}

#[test]
fn killed_convert_n_and_commit_into_qcow() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    let a = pattern(200 << 10, 7);
    let b = pattern(3 * 4096 + 512, 8);
    // 40 MiB over 2 MiB L2 tables: new tables are allocated as well as clusters.
    write_sparse_raw(
        &src,
        40 * MIB,
        &[
            (4096, &a[..]),
            (MIB, &[0u8; 128 << 10][..]),
            (5 * MIB + 512, &b[..]),
            (33 * MIB + 512, &b[..]),
        ],
    );
    let p = d.join("p");
    std::fs::create_dir_all(&p).unwrap();
    let t = p.join("t.qcow");
    let old_raw = d.join("old.raw");
    let c: Vec<u8> = (0..(MIB as usize)).map(|i| (i % 251) as u8).collect();
    write_sparse_raw(
        &old_raw,
        48 * MIB,
        &[(0, &c[..]), (5 * MIB, &c[..64 << 10])],
    );
    // Compressed old data: writes hit compressed clusters in part.
    qemu_convert_c(&["-q", "-f", "raw", "-O", "qcow", s(&old_raw), s(&t)]);
    qemu_io("qcow", &t, &["write -P 0xbb 40M 1M"]);
    let old = guest(&t, "qcow");
    let mut new = std::fs::read(&src).unwrap();
    new.extend_from_slice(&old[new.len()..]);
    let k = d.join("k");
    let kt = k.join("t.qcow");
    let convert = ["convert", "-n", "-f", "raw", "-O", "qcow", s(&src), s(&kt)];
    // Commit: a qcow top (512-byte clusters) with sub-cluster writes over the base.
    let top = p.join("top.qcow");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "-b",
        "t.qcow",
        "-F",
        "qcow",
        s(&top),
    ]);
    qemu_io(
        "qcow",
        &top,
        &[
            "write -P 0x11 1536 2k",
            "write -P 0x22 20M 64k",
            "write -P 0x33 5M 8k",
        ],
    );
    let committed = guest(&top, "qcow");
    let ktop = k.join("top.qcow");
    let commit = ["commit", s(&ktop)];
    for (op, args, want) in [
        ("convert -n", &convert[..], &new),
        ("commit", &commit[..], &committed),
    ] {
        let mut kills = 0;
        for n in 1.. {
            copy_dir(&p, &k);
            let killed = run_killed(args, n);
            let what = format!("{op}: killed before write {n}");
            // The base opens (vimg's reader checks every table) and every cluster holds
            // the old or the new content (in-place writes are sector-aligned).
            vimg(&["info", s(&kt)]);
            let got = guest(&kt, "qcow");
            assert_old_or_new(&got, &old, want, 512, &what);
            // New clusters are written whole before their entry: a cluster that was not
            // plain data is old or new as one.
            for (i, o) in old.chunks(4096).enumerate() {
                let r = i * 4096..((i + 1) * 4096).min(got.len());
                if o.iter().all(|b| *b == 0) {
                    assert_old_or_new(&got[r.clone()], o, &want[r], 4096, &what);
                }
            }
            if !killed {
                assert!(got == *want, "{what}: the finished run's content");
                break;
            }
            kills += 1;
            // The operation runs again to the end after the kill.
            vimg(args);
            assert!(guest(&kt, "qcow") == *want, "{what}: rerun after the kill");
        }
        assert!(kills >= 5, "{op}: only {kills} kill points");
    }
}

#[test]
fn convert_n_into_aes_qcow_through_its_secret_like_qemu_img() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let obj = "secret,id=sec0,data=123456";
    let e = d.join("e.qcow");
    qemu_img(&[
        "create",
        "-q",
        "--object",
        obj,
        "-f",
        "qcow",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        s(&e),
        "4M",
    ]);
    let opts = |p: &Path| format!("driver=qcow,file.filename={},encrypt.key-secret=sec0", s(p));
    // Old data (encrypted by qemu-io), overwritten in part and kept in part.
    let out = run_cmd(
        "qemu-io",
        &[
            "--object",
            obj,
            "--image-opts",
            "-c",
            "write -P 0x33 8k 12k",
            "-c",
            "write -P 0x44 3M 8k",
            &opts(&e),
        ],
    );
    assert!(out.status.success());
    let src = d.join("s.raw");
    write_sparse_raw(
        &src,
        3 * MIB,
        &[
            (0, &pattern(10240, 1)[..]),
            (MIB + 512, &pattern(5000 + 120, 2)[..]),
        ],
    );
    let (q, v) = (d.join("q.qcow"), d.join("v.qcow"));
    std::fs::copy(&e, &q).unwrap();
    std::fs::copy(&e, &v).unwrap();
    for (tool, t) in [("qemu-img", &q), ("vimg", &v)] {
        let args = [
            "convert",
            "-n",
            "--object",
            obj,
            "--target-image-opts",
            s(&src),
            &opts(t),
        ];
        let out = if tool == "vimg" {
            vimg_raw(&args)
        } else {
            run_cmd(tool, &args)
        };
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run_cmd(
        "qemu-img",
        &[
            "compare",
            "--object",
            obj,
            "--image-opts",
            &opts(&q),
            &opts(&v),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The data is encrypted on disk; without the key the guest reads as noise.
    let raw = std::fs::read(&v).unwrap();
    let p = pattern(10240, 1);
    assert!(!raw.windows(512).any(|w| w == &p[..512]));
}

//! qcow2 details of the in-place code, against qemu-img on a copy (iotest 261): snapshot
//! table entries as QEMU writes them (24 bytes of known extra data, unknown extra data
//! kept) after `amend -o compat=1.1` of a version-2 image, `snapshot -c` and `-d`; `check`
//! reporting version-3 entries without the disk size and `check -r all` completing them;
//! runs killed at every write leave an image qemu-img finds free of corruption.

mod common;

use std::path::{Path, PathBuf};

use common::kill::{check_then_repair, run_killed};
use common::*;

fn rd32(p: &Path, off: u64) -> u32 {
    u32::from_be_bytes(read_bytes(p, off))
}

fn rd16(p: &Path, off: u64) -> u16 {
    u16::from_be_bytes(read_bytes(p, off))
}

/// The snapshot table's bytes (header fields 60 and 64), each entry padded to 8.
fn table(img: &Path) -> Vec<u8> {
    let n = rd32(img, 60);
    let mut at = rd64be(img, 64);
    let mut data = std::fs::read(img).unwrap();
    // QEMU's file may end before the last entry's padding.
    data.resize(data.len() + 8, 0);
    let start = at as usize;
    for _ in 0..n {
        let len = 40 + rd32(img, at + 36) as u64 + rd16(img, at + 12) as u64 + rd16(img, at + 14) as u64;
        at += len.div_ceil(8) * 8;
    }
    data[start..at as usize].to_vec()
}

/// The extra data sizes of the table's entries.
fn extra_sizes(img: &Path) -> Vec<u32> {
    let mut at = rd64be(img, 64);
    (0..rd32(img, 60))
        .map(|_| {
            let x = rd32(img, at + 36);
            let len = 40 + x as u64 + rd16(img, at + 12) as u64 + rd16(img, at + 14) as u64;
            at += len.div_ceil(8) * 8;
            x
        })
        .collect()
}

/// iotest 261's template: a 64 MiB version-2 image with snapshots sn0 (no extra data), sn1
/// (50 bytes, unknown ones after the 24 known), sn2 (8 bytes: the VM state size only),
/// written back over the table qemu-img made (the entries only shrink or keep their size
/// plus padding, so the table fits its cluster).
fn v2_template(d: &Path) -> PathBuf {
    let img = d.join("v2.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", s(&img), "64M"]);
    qemu_io("qcow2", &img, &["write -P 0x11 0 64k", "write -P 0x22 1M 64k"]);
    for sn in ["sn0", "sn1", "sn2"] {
        qemu_img(&["snapshot", "-c", sn, s(&img)]);
    }
    let mut at = rd64be(&img, 64);
    let mut out = Vec::new();
    for new_extra in [0usize, 50, 8] {
        let x = rd32(&img, at + 36) as usize;
        let ids = (rd16(&img, at + 12) + rd16(&img, at + 14)) as usize;
        let len = (40 + x + ids).div_ceil(8) * 8;
        let mut data = std::fs::read(&img).unwrap();
        data.resize(data.len() + 8, 0);
        let e = &data[at as usize..at as usize + len];
        let mut entry = e[..40].to_vec();
        entry[36..40].copy_from_slice(&(new_extra as u32).to_be_bytes());
        let mut extra = e[40..40 + x].to_vec();
        extra.resize(new_extra, 0);
        if new_extra == 50 {
            extra[24..24 + 19].copy_from_slice(b"very important data");
        }
        entry.extend(extra);
        entry.extend(&e[40 + x..40 + x + ids]);
        entry.resize(entry.len().div_ceil(8) * 8, 0);
        out.extend(entry);
        at += len as u64;
    }
    patch(&img, rd64be(&img, 64), &out);
    assert_eq!(qemu_check_output(&img, "qcow2").0, 0);
    assert_eq!(extra_sizes(&img), [0, 50, 8]);
    img
}

/// The template made a version-3 image by hand (version, header length, refcount order),
/// as iotest 261 does: its entries 0 and 2 lack what version 3 requires.
fn botched_v3(d: &Path, name: &str) -> PathBuf {
    let img = d.join(name);
    std::fs::copy(v2_template(d), &img).unwrap();
    patch(&img, 4, &3u32.to_be_bytes());
    patch(&img, 100, &104u32.to_be_bytes());
    patch(&img, 96, &4u32.to_be_bytes());
    img
}

fn copies(d: &Path, img: &Path) -> (PathBuf, PathBuf) {
    let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
    std::fs::copy(img, &q).unwrap();
    std::fs::copy(img, &v).unwrap();
    (q, v)
}

fn both_ok(q: &Path, v: &Path, args: &[&str]) {
    let mut qa = args.to_vec();
    qa.push(s(q));
    let mut va = args.to_vec();
    va.push(s(v));
    qemu_img(&qa);
    vimg(&va);
}

fn snapshot_list(img: &Path) -> String {
    let out = qemu_img(&["snapshot", "-l", "-f", "qcow2", s(img)]);
    out.lines()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn amend_compat_completes_v2_entries_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = v2_template(d);
    let (q, v) = copies(d, &img);
    both_ok(&q, &v, &["amend", "-f", "qcow2", "-o", "compat=1.1"]);
    assert_eq!(extra_sizes(&v), [24, 50, 24]);
    assert_eq!(table(&v), table(&q), "snapshot tables differ");
    // The table goes where qemu-img puts it; the header is the same.
    assert_eq!(
        read_bytes::<104>(&v, 0),
        read_bytes::<104>(&q, 0),
        "headers differ"
    );
    assert_eq!(qemu_check_output(&v, "qcow2").0, 0);
    assert_eq!(snapshot_list(&v), snapshot_list(&q));
    assert_eq!(guest(&v), guest(&q));
    // Another amend of the now version-3 image leaves the complete table alone.
    let before = table(&v);
    vimg(&["amend", "-f", "qcow2", "-o", "lazy_refcounts=on", s(&v)]);
    assert_eq!(table(&v), before);
}

fn guest(img: &Path) -> Vec<u8> {
    common::kill::guest(img, "qcow2")
}

#[test]
fn snapshot_create_and_delete_write_entries_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = v2_template(d);
    for sn in ["sn0", "sn1", "sn2"] {
        let (q, v) = copies(d, &img);
        both_ok(&q, &v, &["snapshot", "-d", sn]);
        // Entries compared without their creation times (equal here: both kept).
        assert_eq!(table(&v), table(&q), "after snapshot -d {sn}");
        assert_eq!(qemu_check_output(&v, "qcow2").0, 0);
    }
    let (q, v) = copies(d, &img);
    both_ok(&q, &v, &["snapshot", "-c", "sn3"]);
    assert_eq!(extra_sizes(&v), extra_sizes(&q));
    assert_eq!(extra_sizes(&v), [24, 50, 24, 24]);
    // The first three entries are equal byte for byte (the fourth has its own time).
    let n = table(&q).len() - (40 + 24 + 1 + 3usize).div_ceil(8) * 8;
    assert_eq!(table(&v)[..n], table(&q)[..n]);
    assert_eq!(qemu_check_output(&v, "qcow2").0, 0);
}

fn output(o: &std::process::Output) -> (Option<i32>, String) {
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn check_reports_and_repairs_incomplete_v3_entries_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = botched_v3(d, "b.qcow2");
    let (q, v) = copies(d, &img);
    for args in [
        vec!["check", "-f", "qcow2"],
        vec!["check", "-r", "leaks", "-f", "qcow2"],
        vec!["check", "-r", "all", "-f", "qcow2"],
    ] {
        let mut qa = args.clone();
        qa.push(s(&q));
        let mut va = args.clone();
        va.push(s(&v));
        let (qc, qt) = output(&run_cmd("qemu-img", &qa));
        let (vc, vt) = output(&vimg_raw(&va));
        assert_eq!(vc, qc, "{args:?}: {vt}");
        assert_eq!(vt.replace(s(&v), "IMG"), qt.replace(s(&q), "IMG"), "{args:?}");
    }
    assert!(
        run_cmd("qemu-img", &["check", "-f", "qcow2", s(&img)])
            .stderr
            .starts_with(b"ERROR snapshot table entry 0 is incomplete\n"),
    );
    assert_eq!(extra_sizes(&v), [24, 50, 24]);
    assert_eq!(table(&v), table(&q));
    assert_eq!(read_bytes::<104>(&v, 0), read_bytes::<104>(&q, 0));
    assert_eq!(qemu_check_output(&v, "qcow2").0, 0);
}

/// The image after a kill: no corruption but the incomplete entries (leaks allowed);
/// `vimg check -r all` then leaves it clean with every entry complete.
fn judge_killed(img: &Path, snapshots: &str, what: &str) {
    let (code, text) = qemu_check_output(img, "qcow2");
    let version = rd32(img, 4);
    for l in text.lines().filter(|l| l.starts_with("ERROR")) {
        assert!(
            version == 3 && l.ends_with("is incomplete"),
            "{what}: {l}\n{text}"
        );
    }
    assert!([0, 2, 3].contains(&code), "{what}: exit {code}\n{text}");
    assert_eq!(snapshot_list(img), snapshots, "{what}");
    if code == 2 {
        vimg(&["check", "-r", "all", "-f", "qcow2", s(img)]);
    }
    check_then_repair(img, "qcow2", what);
}

#[test]
fn amend_compat_killed_at_every_write() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = v2_template(d);
    let snapshots = snapshot_list(&img);
    let old = guest(&img);
    let t = d.join("t.qcow2");
    for n in 0.. {
        std::fs::copy(&img, &t).unwrap();
        let killed = run_killed(&["amend", "-f", "qcow2", "-o", "compat=1.1", s(&t)], n);
        let what = format!("amend compat=1.1 killed after {n} writes");
        let version = rd32(&t, 4);
        assert!(version == 2 || version == 3, "{what}");
        if version == 3 {
            assert_eq!(extra_sizes(&t), [24, 50, 24], "{what}");
        }
        judge_killed(&t, &snapshots, &what);
        assert_eq!(guest(&t), old, "{what}");
        if !killed {
            assert!(n > 3, "the upgrade wrote too little");
            break;
        }
    }
}

#[test]
fn check_repair_killed_at_every_write() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = botched_v3(d, "b.qcow2");
    let snapshots = snapshot_list(&img);
    let old = guest(&img);
    let t = d.join("t.qcow2");
    for n in 0.. {
        std::fs::copy(&img, &t).unwrap();
        // A repair that fixed something exits 0 (the second check is clean).
        let killed = run_killed(&["check", "-r", "all", "-f", "qcow2", s(&t)], n);
        let what = format!("check -r all killed after {n} writes");
        let sizes = extra_sizes(&t);
        assert!(sizes == [0, 50, 8] || sizes == [24, 50, 24], "{what}: {sizes:?}");
        judge_killed(&t, &snapshots, &what);
        assert_eq!(guest(&t), old, "{what}");
        if !killed {
            assert!(n > 3, "the repair wrote too little");
            break;
        }
    }
}

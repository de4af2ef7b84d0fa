//! qcow2 snapshot tables past QEMU's limits (iotest 261), against qemu-img on copies:
//! `check` says why it cannot read the table, with QEMU's hint, and fails; `check -r all`
//! cuts an entry's extra data to 1024 bytes and drops the entries past 65536 (or past
//! 64 MiB of table), then repairs the refcounts, as qemu-img does: same lines, counts,
//! exit codes, snapshot list and guest content, and qemu-img finds the result clean. Runs
//! killed at sampled writes leave an image qemu-img finds free of corruption.

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

/// Offset of entry `i` of the snapshot table (entries padded to 8).
fn entry_offset(img: &Path, i: u32) -> u64 {
    let mut at = rd64be(img, 64);
    for _ in 0..i {
        let len = 40
            + u64::from(rd32(img, at + 36))
            + u64::from(rd16(img, at + 12))
            + u64::from(rd16(img, at + 14));
        at += len.div_ceil(8) * 8;
    }
    at
}

/// A version-3 image with data and three snapshots (qemu-img), the last entry's extra
/// data size set to `extra`. The table is the file's last cluster; the file is then
/// grown by two free clusters, so that extra data past the table's cluster runs into a
/// cluster with refcount 0 (not into data).
fn extra_image(d: &Path, extra: u32) -> PathBuf {
    let img = d.join(format!("extra{extra}.qcow2"));
    qemu_create(&img, "qcow2", "", "64M");
    qemu_io("qcow2", &img, &["write -P 1 0 128k"]);
    for (i, sn) in ["sn0", "sn1", "sn2"].into_iter().enumerate() {
        qemu_io("qcow2", &img, &[&format!("write -P {} 64k 64k", i + 2)]);
        qemu_img(&["snapshot", "-c", sn, s(&img)]);
    }
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(f.metadata().unwrap().len().div_ceil(65536) * 65536 + 2 * 65536)
        .unwrap();
    drop(f);
    let at = entry_offset(&img, 2);
    patch(&img, at + 36, &extra.to_be_bytes());
    img
}

/// A version-2 image whose snapshot table (at 1 MiB) has 65536 + `over` all-zero
/// entries, every cluster of it allocated; entry 65537 has an L1 table (cluster 14)
/// with one L2 table (cluster 15), so dropping it leaks them.
fn too_many_image(d: &Path, over: u32) -> PathBuf {
    let img = d.join("many.qcow2");
    qemu_create(&img, "qcow2", "compat=0.10", "64M");
    let n = 65536 + over;
    let table = 1u64 << 20;
    let end = table + 40 * u64::from(n);
    for c in 14..end.div_ceil(65536) {
        set_refcount(&img, c, 1);
    }
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(end).unwrap();
    drop(f);
    patch(&img, 60, &n.to_be_bytes());
    patch(&img, 64, &table.to_be_bytes());
    let e = table + 40 * 65537;
    patch(&img, e, &(14u64 << 16).to_be_bytes());
    patch(&img, e + 8, &1u32.to_be_bytes());
    patch(
        &img,
        14 << 16,
        &(0x8000_0000_0000_0000u64 | (15 << 16)).to_be_bytes(),
    );
    img
}

fn copies(d: &Path, img: &Path) -> (PathBuf, PathBuf) {
    let q = d.join("q.qcow2");
    let v = d.join("v.qcow2");
    std::fs::copy(img, &q).unwrap();
    std::fs::copy(img, &v).unwrap();
    (q, v)
}

/// Runs `args` + the image with qemu-img on `q` and vimg on `v`: same words (paths and
/// program prefixes aside) and exit code.
fn same_run(q: &Path, v: &Path, args: &[&str]) -> String {
    let mut qa = args.to_vec();
    qa.push(s(q));
    let mut va = args.to_vec();
    va.push(s(v));
    let qo = run_cmd("qemu-img", &qa);
    let vo = vimg_raw(&va);
    // Where the repaired image ends is placement, not what was repaired (vimg's refcount
    // rebuild places its structures after the file's end).
    let words = |o: &std::process::Output, p: &Path| {
        said(o)
            .replace(s(p), "IMG")
            .lines()
            .filter(|l| !l.starts_with("Image end offset"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    };
    let qt = words(&qo, q);
    let vt = words(&vo, v);
    assert_eq!(vt, qt, "{args:?}");
    assert_eq!(vo.status.code(), qo.status.code(), "{args:?}: {vt}");
    qt
}

fn snapshot_list(img: &Path) -> String {
    qemu_img(&["snapshot", "-l", "-f", "qcow2", s(img)])
}

/// After `check -r all` on both copies: the same snapshots, guest content and count in
/// the header, and qemu-img finds vimg's image clean.
fn same_result(q: &Path, v: &Path) {
    assert_eq!(
        qemu_check_output(v, "qcow2").0,
        0,
        "{}",
        qemu_check_output(v, "qcow2").1
    );
    assert_eq!(rd32(v, 60), rd32(q, 60));
    assert_eq!(snapshot_list(v), snapshot_list(q));
    let o = run_cmd(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "qcow2", s(q), s(v)],
    );
    assert_eq!(o.status.code(), Some(0), "{}", said(&o));
}

#[test]
fn too_much_extra_data_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 2048 bytes stay in the table's cluster; 65536 spill into the next one, which has
    // refcount 0 (QEMU then rebuilds the refcount structure).
    for extra in [2048u32, 65536] {
        let img = extra_image(d, extra);
        let (q, v) = copies(d, &img);
        let said = same_run(&q, &v, &["info", "-f", "qcow2"]);
        assert!(
            said.contains("You can force-remove this extra metadata"),
            "{said}"
        );
        let said = same_run(&q, &v, &["check", "-f", "qcow2"]);
        assert!(said.contains("Check failed: File too large"), "{said}");
        same_run(&q, &v, &["check", "-r", "leaks", "-f", "qcow2"]);
        let said = same_run(&q, &v, &["check", "-r", "all", "-f", "qcow2"]);
        assert!(
            said.starts_with(&format!(
                "Discarding too much extra metadata in snapshot table entry 2 ({extra} > 1024)"
            )),
            "{said}"
        );
        same_result(&q, &v);
        assert_eq!(rd32(&v, entry_offset(&v, 2) + 36), 1024);
    }
}

/// qemu-img reads a table of 65536 entries slowly (seconds per run): the runs here are
/// the ones that say something.
#[test]
fn too_many_snapshots_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = too_many_image(d, 3);
    let (q, v) = copies(d, &img);
    let said = same_run(&q, &v, &["check", "-f", "qcow2"]);
    assert!(
        said.contains("force-remove all 3 overhanging snapshots"),
        "{said}"
    );
    let said = same_run(&q, &v, &["check", "-r", "all", "-f", "qcow2"]);
    assert!(
        said.starts_with("Discarding 3 overhanging snapshots\n"),
        "{said}"
    );
    assert!(
        said.contains("    3 leaked clusters\n    3 corruptions\n"),
        "{said}"
    );
    assert_eq!(rd32(&v, 60), 65536);
    assert_eq!(qemu_check_output(&v, "qcow2").0, 0);
    // The same file but for the freed clusters (qemu-img discards them: zeros).
    let (qb, vb) = (std::fs::read(&q).unwrap(), std::fs::read(&v).unwrap());
    assert_eq!(qb.len(), vb.len());
    let freed = |i: usize| [14, 15, 56].contains(&(i >> 16));
    assert!((0..qb.len()).all(|i| freed(i) || qb[i] == vb[i]));
}

/// Names and IDs are C strings: an entry whose name is zero bytes is named "".
#[test]
fn zero_names_read_as_empty_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = extra_image(d, 24);
    let at = entry_offset(&img, 1);
    let names = at + 40 + u64::from(rd32(&img, at + 36));
    let len = u64::from(rd16(&img, at + 12)) + u64::from(rd16(&img, at + 14));
    patch(&img, names, &vec![0u8; len as usize]);
    let (q, v) = copies(d, &img);
    same_run(&q, &v, &["snapshot", "-l", "-f", "qcow2"]);
    same_run(&q, &v, &["info", "-f", "qcow2"]);
}

/// `check -r all` killed at sampled writes: qemu-img finds no corruption (leaks at
/// worst) or still the broken table (the repair's switch not reached), and a second
/// `check -r all` finishes the job as an uninterrupted one does.
#[test]
fn repairs_killed_at_sampled_writes() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The table of 65536 entries: one kill point (after the count is lowered, before the
    // leaks are freed), as qemu-img takes seconds per look at it.
    let cases = [
        (extra_image(d, 2048), vec![0u64, 1, 2, 3, 4, 5, 6, 8, 12]),
        (extra_image(d, 65536), vec![0, 1, 2, 4, 8, 16]),
        (too_many_image(d, 3), vec![1]),
    ];
    for (img, points) in cases {
        let (q, _) = copies(d, &img);
        let many = rd32(&img, 60) > 65536;
        qemu_img(&["check", "-r", "all", "-f", "qcow2", s(&q)]);
        let want = if many {
            String::new()
        } else {
            snapshot_list(&q)
        };
        let t = d.join("t.qcow2");
        let mut killed_any = false;
        for n in points {
            std::fs::copy(&img, &t).unwrap();
            let killed = run_killed(&["check", "-r", "all", "-f", "qcow2", s(&t)], n);
            let what = format!("{}: check -r all killed after {n} writes", img.display());
            let (code, text) = qemu_check_output(&t, "qcow2");
            if code == 1 {
                assert!(text.contains("snapshot table"), "{what}: {text}");
            } else {
                assert!(!text.contains("ERROR"), "{what}: {text}");
            }
            let o = vimg_raw(&["check", "-r", "all", "-f", "qcow2", s(&t)]);
            assert!(o.status.success(), "{what}: {}", said(&o));
            let o = vimg_raw(&["check", "-f", "qcow2", s(&t)]);
            assert!(o.status.success(), "{what}: {}", said(&o));
            assert_eq!(rd32(&t, 60), rd32(&q, 60), "{what}");
            if !many {
                assert_eq!(qemu_check_output(&t, "qcow2").0, 0, "{what}");
                assert_eq!(snapshot_list(&t), want, "{what}");
                check_then_repair(&t, "qcow2", &what);
            }
            if !killed {
                break;
            }
            killed_any = true;
        }
        assert!(killed_any, "{}: the repair wrote nothing", img.display());
    }
}

/// An image with extended L2 entries over a raw backing file whose first L2 entry's
/// offset is made unaligned (iotest 271): with `zeroed`, the cluster's only written
/// subcluster was zeroed first, so the entry holds no data.
fn misaligned_image(d: &Path, zeroed: bool) -> PathBuf {
    let base = d.join("base.raw");
    qemu_create(&base, "raw", "", "128k");
    qemu_io("raw", &base, &["write -P 0xff 0 128k"]);
    let img = d.join(format!("misaligned{zeroed}.qcow2"));
    qemu_create(
        &img,
        "qcow2",
        &format!("extended_l2=on,backing_file={},backing_fmt=raw", s(&base)),
        "128k",
    );
    qemu_io("qcow2", &img, &["write -P 1 4k 2k"]);
    if zeroed {
        qemu_io("qcow2", &img, &["write -z 4k 2k"]);
    }
    let l2 = rd64be(&img, rd64be(&img, 40)) & 0x00ff_ffff_ffff_fe00;
    patch(&img, l2 + 6, &[2]);
    img
}

/// `check -r all` of a misaligned entry: one without data is zeroed ("Repairing
/// offset=...") and its cluster freed as a leak, as qemu-img does; one with data is
/// refused before anything is written (qemu-img leaves it corrupt, exit 2).
#[test]
fn misaligned_l2_entries_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = misaligned_image(d, true);
    let (q, v) = copies(d, &img);
    same_run(&q, &v, &["check", "-f", "qcow2"]);
    let words = same_run(&q, &v, &["check", "-r", "all", "-f", "qcow2"]);
    assert!(
        words.starts_with("Repairing offset=50200: Preallocated cluster"),
        "{words}"
    );
    same_result(&q, &v);
    // Killed around its writes: the entry old or fixed, never corrupt beyond that.
    let t = d.join("t.qcow2");
    let (_, first) = qemu_check_output(&img, "qcow2");
    for n in [0u64, 1, 2] {
        std::fs::copy(&img, &t).unwrap();
        run_killed(&["check", "-r", "all", "-f", "qcow2", s(&t)], n);
        let (_, text) = qemu_check_output(&t, "qcow2");
        // No error the image did not have before (a leak at worst).
        for l in text.lines().filter(|l| l.starts_with("ERROR")) {
            assert!(first.lines().any(|f| f == l), "{n}: {text}");
        }
        let o = vimg_raw(&["check", "-r", "all", "-f", "qcow2", s(&t)]);
        assert!(o.status.success(), "{n}: {}", said(&o));
        assert_eq!(qemu_check_output(&t, "qcow2").0, 0, "{n}");
    }
    let img = misaligned_image(d, false);
    let before = std::fs::read(&img).unwrap();
    let o = vimg_raw(&["check", "-r", "all", "-f", "qcow2", s(&img)]);
    assert_eq!(o.status.code(), Some(1), "{}", said(&o));
    assert!(
        said(&o).contains("Data cluster is not properly aligned"),
        "{}",
        said(&o)
    );
    assert!(std::fs::read(&img).unwrap() == before);
}

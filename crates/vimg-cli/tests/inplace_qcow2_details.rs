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
        let len =
            40 + rd32(img, at + 36) as u64 + rd16(img, at + 12) as u64 + rd16(img, at + 14) as u64;
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
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&img),
        "64M",
    ]);
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x11 0 64k", "write -P 0x22 1M 64k"],
    );
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
        assert_eq!(
            vt.replace(s(&v), "IMG"),
            qt.replace(s(&q), "IMG"),
            "{args:?}"
        );
    }
    assert!(run_cmd("qemu-img", &["check", "-f", "qcow2", s(&img)])
        .stderr
        .starts_with(b"ERROR snapshot table entry 0 is incomplete\n"),);
    assert_eq!(extra_sizes(&v), [24, 50, 24]);
    assert_eq!(table(&v), table(&q));
    assert_eq!(read_bytes::<104>(&v, 0), read_bytes::<104>(&q, 0));
    assert_eq!(qemu_check_output(&v, "qcow2").0, 0);
}

/// `snapshot -c` and `-d` on a version-3 image with incomplete entries: qemu-img writes
/// on (completing every entry), and so does vimg.
#[test]
fn snapshot_on_incomplete_v3_entries_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = botched_v3(d, "b.qcow2");
    let (q, v) = copies(d, &img);
    both_ok(&q, &v, &["snapshot", "-d", "sn1"]);
    assert_eq!(extra_sizes(&v), [24, 24]);
    assert_eq!(table(&v), table(&q));
    assert_eq!(qemu_check_output(&v, "qcow2").0, 0);
    let (q, v) = copies(d, &img);
    both_ok(&q, &v, &["snapshot", "-c", "sn3"]);
    assert_eq!(extra_sizes(&v), extra_sizes(&q));
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
        assert!(
            sizes == [0, 50, 8] || sizes == [24, 50, 24],
            "{what}: {sizes:?}"
        );
        judge_killed(&t, &snapshots, &what);
        assert_eq!(guest(&t), old, "{what}");
        if !killed {
            assert!(n > 3, "the repair wrote too little");
            break;
        }
    }
}

/// The bitmaps extension's directory (offset, size, count) and each entry's table offset,
/// flags and name: the layout `qemu-img bitmap` leaves.
fn bitmap_layout(img: &Path) -> (u64, u64, u32, Vec<(u64, u32, String)>) {
    let data = std::fs::read(img).unwrap();
    let be32 = |o: usize| u32::from_be_bytes(data[o..o + 4].try_into().unwrap());
    let be64 = |o: usize| u64::from_be_bytes(data[o..o + 8].try_into().unwrap());
    let mut off = be32(100) as usize;
    loop {
        let (magic, len) = (be32(off), be32(off + 4) as usize);
        if magic == 0 {
            return (0, 0, 0, Vec::new());
        }
        if magic == 0x2385_2875 {
            let nb = be32(off + 8);
            let (size, at) = (be64(off + 16), be64(off + 24));
            let mut p = at as usize;
            let mut entries = Vec::new();
            for _ in 0..nb {
                let ns = u16::from_be_bytes(data[p + 18..p + 20].try_into().unwrap()) as usize;
                let es = be32(p + 20) as usize;
                let name = String::from_utf8_lossy(&data[p + 24 + es..p + 24 + es + ns]);
                entries.push((be64(p), be32(p + 12), name.into_owned()));
                p += (24 + es + ns).div_ceil(8) * 8;
            }
            return (at, size, nb, entries);
        }
        off += 8 + len.div_ceil(8) * 8;
    }
}

/// Each `qemu-img bitmap` command, run by both on copies one after another, leaves the
/// same layout: directory, tables, file length (iotest 190's `measure -f raw` of it).
#[test]
fn bitmap_layout_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for cluster in ["64k", "2M"] {
        let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster}"),
            s(&q),
            "4G",
        ]);
        qemu_io("qcow2", &q, &["write -P 0x5a 0 1M"]);
        std::fs::copy(&q, &v).unwrap();
        let steps: &[&[&str]] = &[
            &["--add", "--granularity", "512", "b1"],
            &["--add", "-g", "64k", "b2"],
            &["--add", "b3"],
            &["--disable", "b3"],
            &["--merge", "b2", "b1"],
            &["--clear", "b2"],
            &["--enable", "b3"],
            &["--remove", "b1"],
            &["--remove", "b2"],
            // Two actions in one run: qemu-img stores once, vimg after each (same
            // content, another layout; checked for consistency only).
            &["--add", "--disable", "b4"],
        ];
        for step in steps {
            let (name, ops) = step.split_last().unwrap();
            let run = |prog: &str, img: &Path| {
                let mut a = vec!["bitmap", "-f", "qcow2"];
                a.extend_from_slice(ops);
                a.extend([s(img), *name]);
                let out = run_cmd(prog, &a);
                assert!(
                    out.status.success(),
                    "{prog} {a:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            // Bits set in the enabled bitmaps before the merge (qemu-io stores them on
            // both copies alike): their data clusters are then stored anew too.
            if step[0] == "--merge" {
                for img in [&q, &v] {
                    qemu_io("qcow2", img, &["write -P 1 2M 64k", "write -P 2 3G 4k"]);
                }
            }
            run("qemu-img", &q);
            run(s(&vimg_bin()), &v);
            let what = format!("cluster {cluster}, bitmap {step:?}");
            if step.len() == 2 || step[1] != "--disable" {
                assert_eq!(bitmap_layout(&v), bitmap_layout(&q), "{what}");
                assert_eq!(size_of(&v), size_of(&q), "{what}: file length");
            }
            assert_eq!(qemu_check_output(&v, "qcow2").0, 0, "{what}");
        }
    }
}

/// A bitmap's stored bits (its data clusters in table order; zeros for empty entries).
fn bitmap_bits(img: &Path, name: &str) -> Vec<u8> {
    let cs = 1usize << rd32(img, 20);
    let (.., entries) = bitmap_layout(img);
    let data = std::fs::read(img).unwrap();
    let mut p = {
        let (at, ..) = bitmap_layout(img);
        at as usize
    };
    for (_, _, n) in &entries {
        let ns = u16::from_be_bytes(data[p + 18..p + 20].try_into().unwrap()) as usize;
        let es = rd32(img, p as u64 + 20) as usize;
        if n == name {
            let (t, size) = (rd64be(img, p as u64), rd32(img, p as u64 + 8) as usize);
            let mut out = Vec::new();
            for i in 0..size {
                let off = (rd64be(img, t + 8 * i as u64) & 0x00ff_ffff_ffff_fe00) as usize;
                if off == 0 {
                    out.extend(std::iter::repeat_n(0u8, cs));
                } else {
                    out.extend(&data[off..off + cs]);
                }
            }
            return out;
        }
        p += (24 + es + ns).div_ceil(8) * 8;
    }
    panic!("no bitmap {name}");
}

/// `bitmap --add` and `--remove` (every other bitmap stored anew) killed at every write:
/// qemu-img finds no corruption, the bitmaps are the old set or the new one, and the
/// stored bits of the others are unchanged.
#[test]
fn bitmap_store_killed_at_every_write() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("b.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        s(&img),
        "64M",
    ]);
    qemu_img(&["bitmap", "--add", "-g", "512", "-f", "qcow2", s(&img), "b1"]);
    qemu_img(&["bitmap", "--add", "-f", "qcow2", s(&img), "b2"]);
    qemu_io("qcow2", &img, &["write -P 1 0 64k", "write -P 2 40M 4k"]);
    let b1 = bitmap_bits(&img, "b1");
    let b2 = bitmap_bits(&img, "b2");
    assert!(b1.iter().any(|b| *b != 0));
    let t = d.join("t.qcow2");
    for (args, new) in [
        (&["--add", "b3"][..], &["b1", "b2", "b3"][..]),
        (&["--remove", "b1"][..], &["b2"][..]),
    ] {
        for n in 0.. {
            std::fs::copy(&img, &t).unwrap();
            let mut a = vec!["bitmap", "-f", "qcow2"];
            a.extend(&args[..args.len() - 1]);
            a.extend([s(&t), args[args.len() - 1]]);
            let killed = run_killed(&a, n);
            let what = format!("bitmap {args:?} killed after {n} writes");
            let names: Vec<String> = bitmap_layout(&t).3.into_iter().map(|e| e.2).collect();
            assert!(names == ["b1", "b2"] || names == new, "{what}: {names:?}");
            for (name, bits) in [("b1", &b1), ("b2", &b2)] {
                if names.iter().any(|x| x == name) {
                    assert_eq!(&bitmap_bits(&t, name), bits, "{what}: {name}");
                }
            }
            check_then_repair(&t, "qcow2", &what);
            if !killed {
                assert!(n > 3, "{what}: too few writes");
                break;
            }
        }
    }
}

//! qed changed in place (issue 15): `resize`, `rebase -u`, safe `rebase`, `commit` (a qed
//! top, a qed base) and `check -r`, each done by vimg and by qemu-img on two copies: same
//! exit code and message, same guest content, `qemu-img check` clean on vimg's result, the
//! same file where qemu-img is deterministic (header changes). Then SIGKILL before every
//! write of each operation: `qemu-img check` finds no corruption, every cluster holds its
//! old or its new content, and `vimg check -r all` leaves the image without the need-check
//! flag. Hostile images (tables past the end of the file) are refused, never written to.

mod common;

use std::path::Path;
use std::process::Command;

use common::kill::{assert_old_or_new, guest, run_killed_in};
use common::*;

const NEED_CHECK: u64 = 2;

/// `prog ARGS` in `dir`: (exit code, stderr with the program's prefix as `PROG`).
fn run_in(prog: &Path, dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr)
        .replace("qemu-img:", "PROG:")
        .replace("vimg:", "PROG:");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        err,
    )
}

fn qemu_bin() -> std::path::PathBuf {
    "qemu-img".into()
}

/// The same command by both tools on their own copy: same code, stdout and stderr.
fn both(v: &Path, q: &Path, args: &[&str]) -> i32 {
    let a = run_in(&vimg_bin(), v, args);
    let b = run_in(&qemu_bin(), q, args);
    assert_eq!(a, b, "{args:?}: vimg (left) and qemu-img (right) differ");
    a.0
}

fn features(img: &Path) -> u64 {
    u64::from_le_bytes(read_bytes::<8>(img, 0x10))
}

/// Sets the need-check feature bit, as a writer killed mid-update leaves it.
fn set_need_check(img: &Path) {
    let f = features(img) | NEED_CHECK;
    patch(img, 0x10, &f.to_le_bytes());
}

/// Runs `args` in `v` (vimg) and `q` (qemu-img), checks they exit alike (with `code`) and
/// leave `img.qed` byte-identical.
fn both_same(v: &Path, q: &Path, args: &[&str], code: i32, what: &str) {
    assert_eq!(both(v, q, args), code, "{what}");
    assert_same_file(&v.join("img.qed"), &q.join("img.qed"));
}

fn clean(img: &Path) {
    let out = run_cmd("qemu-img", &["check", "-f", "qed", s(img)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img check {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qed image (4 KiB clusters, two-cluster tables: an L2 table covers 4 MiB) with data
/// in two L2 ranges, a zero cluster, optionally backed by `base.qcow2`; plus the files the
/// operations name.
fn setup(d: &Path, backed: bool) {
    qemu_in(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "10M"]);
    qemu_io("qcow2", &d.join("base.qcow2"), &["write -P 7 0 10M"]);
    qemu_in(d, &["create", "-q", "-f", "qcow2", "new.qcow2", "10M"]);
    qemu_io(
        "qcow2",
        &d.join("new.qcow2"),
        &["write -P 8 64k 1M", "write -P 7 5M 1M"],
    );
    qemu_in(d, &["create", "-q", "-f", "raw", "new.raw", "10M"]);
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4096,table_size=2",
    ];
    if backed {
        args.extend(["-b", "base.qcow2", "-F", "qcow2"]);
    }
    args.extend(["img.qed", "8M"]);
    qemu_in(d, &args);
    qemu_io(
        "qed",
        &d.join("img.qed"),
        &[
            "write -P 1 4k 12k",
            "write -z 32k 4k",
            "write -P 2 4100k 8k",
        ],
    );
    // commit's chains: top.qcow2 over img.qed; top.qed over base.qcow2.
    qemu_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "img.qed",
            "-F",
            "qed",
            "top.qcow2",
        ],
    );
    qemu_io(
        "qcow2",
        &d.join("top.qcow2"),
        &[
            "write -P 3 0 6k",
            "write -z 1M 64k",
            "write -P 4 4098k 10k",
            "write -P 5 7M 4k",
        ],
    );
    qemu_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-o",
            "cluster_size=4096,table_size=2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qed",
        ],
    );
    qemu_io("qed", &d.join("top.qed"), &["write -P 9 10k 20k"]);
}

/// Both tools on two copies of `setup(backed)`; returns the folders.
fn pair(backed: bool) -> Option<(tempfile::TempDir, tempfile::TempDir)> {
    if !qemu_available(&test_name()) {
        return None;
    }
    let (v, q) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    setup(v.path(), backed);
    setup(q.path(), backed);
    Some((v, q))
}

#[test]
fn resize_like_qemu() {
    let Some((v, q)) = pair(false) else { return };
    let (v, q) = (v.path(), q.path());
    for args in [
        &["resize", "-f", "qed", "img.qed", "1M"][..],
        &["resize", "-f", "qed", "--shrink", "img.qed", "1M"],
        &[
            "resize",
            "-f",
            "qed",
            "--preallocation=falloc",
            "img.qed",
            "20M",
        ],
        &[
            "resize",
            "-f",
            "qed",
            "--preallocation=full",
            "img.qed",
            "20M",
        ],
        &["resize", "-f", "qed", "img.qed", "+1000"],
        &["resize", "-f", "qed", "img.qed", "5T"],
    ] {
        assert_eq!(both(v, q, args), 1, "{args:?}");
        assert_same_file(&v.join("img.qed"), &q.join("img.qed"));
    }
    assert_eq!(both(v, q, &["resize", "-f", "qed", "img.qed", "+3M"]), 0);
    assert_same_file(&v.join("img.qed"), &q.join("img.qed"));
    // Past one L2 table's reach and back into use: writes land where qemu reads them.
    assert_eq!(both(v, q, &["resize", "img.qed", "17M"]), 0);
    assert_same_file(&v.join("img.qed"), &q.join("img.qed"));
    clean(&v.join("img.qed"));
    qemu_io("qed", &v.join("img.qed"), &["write -P 6 16M 64k"]);
    clean(&v.join("img.qed"));
}

/// A backing file longer than the image would show through the grown area; QEMU's qed
/// cannot zero it and qemu-img refuses.
#[test]
fn resize_over_longer_backing_like_qemu() {
    let Some((v, q)) = pair(true) else { return };
    let (v, q) = (v.path(), q.path());
    assert_eq!(both(v, q, &["resize", "img.qed", "12M"]), 1);
    assert_same_file(&v.join("img.qed"), &q.join("img.qed"));
}

#[test]
fn rebase_unsafe_like_qemu() {
    let Some((v, q)) = pair(true) else { return };
    let (v, q) = (v.path(), q.path());
    let long = "x".repeat(4100);
    for args in [
        &[
            "rebase", "-u", "-f", "qed", "-b", "new.raw", "-F", "raw", "img.qed",
        ][..],
        &["rebase", "-u", "-b", "new.qcow2", "-F", "qcow2", "img.qed"],
        &["rebase", "-u", "-b", "", "img.qed"],
        &["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "img.qed"],
        // Longer than the header cluster: ENOSPC, nothing written.
        &["rebase", "-u", "-b", &long, "-F", "raw", "img.qed"],
    ] {
        let code = both(v, q, args);
        assert_eq!(code, i32::from(args.contains(&long.as_str())), "{args:?}");
        assert_same_file(&v.join("img.qed"), &q.join("img.qed"));
        clean(&v.join("img.qed"));
    }
    // A name longer than one sector but inside the header cluster.
    let name = format!("{}new.raw", "./".repeat(300));
    assert_eq!(
        both(v, q, &["rebase", "-u", "-b", &name, "-F", "raw", "img.qed"]),
        0
    );
    assert_same_file(&v.join("img.qed"), &q.join("img.qed"));
    assert_eq!(
        guest(&v.join("img.qed"), "qed"),
        guest(&q.join("img.qed"), "qed")
    );
}

#[test]
fn rebase_safe_like_qemu() {
    let Some((v, q)) = pair(true) else { return };
    let (v, q) = (v.path(), q.path());
    let before = guest(&v.join("img.qed"), "qed");
    for args in [
        &[
            "rebase",
            "-f",
            "qed",
            "-b",
            "new.qcow2",
            "-F",
            "qcow2",
            "img.qed",
        ][..],
        &["rebase", "-b", "", "img.qed"],
    ] {
        assert_eq!(both(v, q, args), 0, "{args:?}");
        clean(&v.join("img.qed"));
        assert_eq!(guest(&v.join("img.qed"), "qed"), before, "{args:?}");
        assert_eq!(guest(&q.join("img.qed"), "qed"), before, "{args:?}");
    }
    // Same header as qemu-img's (the data clusters' order may differ).
    assert_eq!(
        read_bytes::<64>(&v.join("img.qed"), 0),
        read_bytes::<64>(&q.join("img.qed"), 0)
    );
}

#[test]
fn commit_into_qed_like_qemu() {
    let Some((v, q)) = pair(false) else { return };
    let (v, q) = (v.path(), q.path());
    assert_eq!(both(v, q, &["commit", "top.qcow2"]), 0);
    clean(&v.join("img.qed"));
    assert_eq!(
        guest(&v.join("img.qed"), "qed"),
        guest(&q.join("img.qed"), "qed")
    );
    assert_eq!(
        guest(&v.join("top.qcow2"), "qcow2"),
        guest(&q.join("top.qcow2"), "qcow2")
    );
    assert_eq!(features(&v.join("img.qed")), 0, "need-check left set");
    // Same allocation (zero clusters where qemu-img writes zeros) and file size.
    let map = |d: &Path| {
        let m = json(&qemu_img(&["map", "--output=json", s(&d.join("img.qed"))]));
        m.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].clone(),
                    e["length"].clone(),
                    e["zero"].clone(),
                    e["data"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(map(v), map(q));
    assert_eq!(size_of(&v.join("img.qed")), size_of(&q.join("img.qed")));
}

#[test]
fn commit_from_qed_like_qemu() {
    let Some((v, q)) = pair(false) else { return };
    let (v, q) = (v.path(), q.path());
    assert_eq!(both(v, q, &["commit", "-f", "qed", "top.qed"]), 0);
    for (f, fmt) in [("base.qcow2", "qcow2"), ("top.qed", "qed")] {
        assert_eq!(guest(&v.join(f), fmt), guest(&q.join(f), fmt), "{f}");
    }
    clean(&v.join("top.qed"));
    // qemu's qed has no make_empty: the top keeps its clusters, as qemu-img leaves them.
    assert_same_file(&v.join("top.qed"), &q.join("top.qed"));
}

#[test]
fn check_repair_like_qemu() {
    let Some((v, q)) = pair(false) else { return };
    let (v, q) = (v.path(), q.path());
    for d in [v, q] {
        let img = d.join("img.qed");
        // A leaked cluster past the tables and the need-check flag.
        let len = size_of(&img);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(len + 3 * 4096)
            .unwrap();
        set_need_check(&img);
    }
    assert_eq!(both(v, q, &["check", "img.qed"]), 3);
    assert_eq!(both(v, q, &["check", "--output=json", "img.qed"]), 3);
    assert_same_file(&v.join("img.qed"), &q.join("img.qed"));
    for mode in ["leaks", "all"] {
        both_same(v, q, &["check", "-r", mode, "img.qed"], 3, mode);
        assert_eq!(features(&v.join("img.qed")) & NEED_CHECK, 0);
    }
    both_same(v, q, &["resize", "img.qed", "20M"], 0, "resize");
    // A need-check image changed in place: QEMU checks it at open and clears the flag.
    for d in [v, q] {
        let img = d.join("img.qed");
        set_need_check(&img);
    }
    both_same(v, q, &["resize", "img.qed", "24M"], 0, "resize need-check");
}

/// Invalid L1 and L2 entries (past the end of the file) are cleared by `check -r` as QEMU
/// clears them; a cluster named twice stays a corruption; same report, same file.
#[test]
fn check_repair_corrupt_like_qemu() {
    let Some((v, q)) = pair(false) else { return };
    let (v, q) = (v.path(), q.path());
    for d in [v, q] {
        let img = d.join("img.qed");
        let l1 = u64::from_le_bytes(read_bytes::<8>(&img, 0x28));
        let l2 = u64::from_le_bytes(read_bytes::<8>(&img, l1));
        let first = u64::from_le_bytes(read_bytes::<8>(&img, l2 + 8));
        patch(&img, l1 + 8, &0x1_0000_0000u64.to_le_bytes());
        patch(&img, l2 + 16, &0x700_0000u64.to_le_bytes());
        patch(&img, l2 + 24, &first.to_le_bytes());
        set_need_check(&img);
    }
    std::fs::copy(v.join("img.qed"), v.join("pristine.qed")).unwrap();
    std::fs::copy(q.join("img.qed"), q.join("pristine.qed")).unwrap();
    for mode in ["leaks", "all"] {
        for out in ["human", "json"] {
            for d in [v, q] {
                std::fs::copy(d.join("pristine.qed"), d.join("img.qed")).unwrap();
            }
            let o = format!("--output={out}");
            both_same(v, q, &["check", "-r", mode, &o, "img.qed"], 2, mode);
        }
    }
    // What is left (the cluster named twice) still refuses every change.
    let (code, _, err) = run_in(&vimg_bin(), v, &["resize", "img.qed", "20M"]);
    assert_eq!(code, 1, "{err}");
}

/// An image whose tables point past the end of the file is refused by every operation
/// but `check -r` (which clears such entries as QEMU does, see
/// `check_repair_corrupt_like_qemu`), naming the entry and the offset, and left as it was.
#[test]
fn hostile_tables_refused_untouched() {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    setup(d, true);
    let img = d.join("img.qed");
    // L1 entry 1 (the second L2 table) moved past the end of the file.
    let l1 = u64::from_le_bytes(read_bytes::<8>(&img, 0x28));
    let far = (size_of(&img) + 0x10_0000).to_le_bytes();
    let mut cases: Vec<(Vec<u8>, u64)> = vec![(far.to_vec(), l1 + 8)];
    // An L2 entry (the first data cluster) past the end of the file.
    let l2 = u64::from_le_bytes(read_bytes::<8>(&img, l1));
    cases.push((far.to_vec(), l2 + 8));
    // Truncated: the second L2 table cut off.
    let pristine = d.join("pristine.qed");
    std::fs::copy(&img, &pristine).unwrap();
    for (i, (bytes, at)) in cases.iter().enumerate() {
        std::fs::copy(&pristine, &img).unwrap();
        patch(&img, *at, bytes);
        hostile_case(d, &img, &format!("case {i}"), &["past the end of the file"]);
    }
    std::fs::copy(&pristine, &img).unwrap();
    let l2b = u64::from_le_bytes(read_bytes::<8>(&img, l1 + 8));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(l2b + 100)
        .unwrap();
    hostile_case(d, &img, "truncated L2", &["past the end of the file"]);
}

fn hostile_case(d: &Path, img: &Path, what: &str, needles: &[&str]) {
    let before = sha256_file(img);
    for args in [
        &["resize", "-f", "qed", "img.qed", "20M"][..],
        &[
            "rebase", "-u", "-f", "qed", "-b", "new.raw", "-F", "raw", "img.qed",
        ],
        &[
            "rebase",
            "-f",
            "qed",
            "-b",
            "new.qcow2",
            "-F",
            "qcow2",
            "img.qed",
        ],
        &["commit", "-f", "qcow2", "top.qcow2"],
    ] {
        let (code, out, err) = run_in(&vimg_bin(), d, args);
        assert_ne!(code, 0, "{what} {args:?}: accepted\n{out}{err}");
        let text = format!("{out}{err}");
        assert!(
            needles.iter().all(|n| text.contains(n)) && text.contains("0x"),
            "{what} {args:?}: {text}"
        );
        assert_eq!(sha256_file(img), before, "{what} {args:?}: image written");
    }
}

// ---- kill at every point ----

/// `qemu-img check` finds no corruption (leaks allowed: QED never reuses space); for a
/// qed image, `vimg check -r all` then clears the need-check flag a kill left.
fn no_corruption(img: &Path, fmt: &str, what: &str) {
    let out = run_cmd("qemu-img", &["check", "-f", fmt, s(img)]);
    let c = out.status.code().unwrap_or(-1);
    assert!(
        c == 0 || c == 3,
        "{what}: qemu-img check {} exit {c}: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if fmt == "qed" {
        let out = vimg_raw(&["check", "-r", "all", "-f", "qed", s(img)]);
        let c = out.status.code().unwrap_or(-1);
        assert!(c == 0 || c == 3, "{what}: vimg check -r all exit {c}");
        assert_eq!(features(img) & NEED_CHECK, 0, "{what}: need-check left");
    }
}

/// SIGKILL before each write of `args` (run in a copy of `setup(backed)`): every image
/// checks without corruption; `judged` images hold old or new content per cluster
/// (`exact`: always the old content), the others are unchanged; the finished run gives
/// qemu-img's content.
fn kill_case(backed: bool, args: &[&str], judged: &[(&str, &str, bool)], others: &[(&str, &str)]) {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (pristine, done, work) = (t.path().join("p"), t.path().join("d"), t.path().join("w"));
    for d in [&pristine, &done] {
        std::fs::create_dir(d).unwrap();
        setup(d, backed);
    }
    let (code, _, err) = run_in(&qemu_bin(), &done, args);
    assert_eq!(code, 0, "qemu-img {args:?}: {err}");
    let files = [
        "img.qed",
        "top.qcow2",
        "top.qed",
        "base.qcow2",
        "new.qcow2",
        "new.raw",
    ];
    let mut kills = 0;
    for n in 0.. {
        assert!(n < 10_000, "no end in sight");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir(&work).unwrap();
        for f in files {
            std::fs::copy(pristine.join(f), work.join(f)).unwrap();
        }
        let killed = run_killed_in(Some(&work), args, n);
        let what = format!("{args:?} killed before point {n}");
        for (f, fmt, exact) in judged {
            no_corruption(&work.join(f), fmt, &what);
            let got = guest(&work.join(f), fmt);
            let old = guest(&pristine.join(f), fmt);
            let new = guest(&done.join(f), fmt);
            if *exact {
                assert!(got == old, "{what}: {f} changed");
            } else {
                assert_old_or_new(&got, &old, &new, 4096, &format!("{what}: {f}"));
            }
            if !killed {
                assert!(got == new, "{what}: {f} differs from qemu-img's");
            }
        }
        for (f, fmt) in others {
            no_corruption(&work.join(f), fmt, &what);
            assert!(
                guest(&work.join(f), fmt) == guest(&pristine.join(f), fmt),
                "{what}: {f} changed"
            );
        }
        if !killed {
            break;
        }
        kills += 1;
    }
    assert!(kills >= 2, "only {kills} kill points");
}

#[test]
fn resize_killed_at_every_point() {
    kill_case(
        false,
        &["resize", "-f", "qed", "img.qed", "12M"],
        &[("img.qed", "qed", false)],
        &[],
    );
}

#[test]
fn rebase_unsafe_killed_at_every_point() {
    kill_case(
        true,
        &[
            "rebase", "-u", "-f", "qed", "-b", "new.raw", "-F", "raw", "img.qed",
        ],
        &[("img.qed", "qed", false)],
        &[],
    );
}

#[test]
fn rebase_safe_killed_at_every_point() {
    kill_case(
        true,
        &[
            "rebase",
            "-f",
            "qed",
            "-b",
            "new.qcow2",
            "-F",
            "qcow2",
            "img.qed",
        ],
        &[("img.qed", "qed", true)],
        &[("new.qcow2", "qcow2")],
    );
}

#[test]
fn commit_into_qed_killed_at_every_point() {
    // img.qed has no backing file: the need-check flag is set during the writes.
    kill_case(
        false,
        &["commit", "-q", "top.qcow2"],
        &[("img.qed", "qed", false), ("top.qcow2", "qcow2", true)],
        &[],
    );
}

#[test]
fn commit_into_backed_qed_killed_at_every_point() {
    // img.qed has a backing file: no need-check flag, a flush before each table update.
    kill_case(
        true,
        &["commit", "-q", "top.qcow2"],
        &[("img.qed", "qed", false), ("top.qcow2", "qcow2", true)],
        &[("base.qcow2", "qcow2")],
    );
}

#[test]
fn commit_from_qed_killed_at_every_point() {
    kill_case(
        false,
        &["commit", "-q", "-f", "qed", "top.qed"],
        &[("base.qcow2", "qcow2", false), ("top.qed", "qed", true)],
        &[],
    );
}

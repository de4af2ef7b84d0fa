//! `commit` (issue 15): vimg's result against qemu-img's on a copy (every image of the
//! chain reads the same, `qemu-img check` clean), into qcow2 (compressed clusters, an
//! internal snapshot, a smaller base that grows, `-b` deeper in the chain, `-d`) and raw
//! bases; qemu-img's messages; and a SIGKILL at every write point leaving a chain whose top
//! reads as before, whose base holds old or new content per cluster, with no corruption.

mod common;

use std::path::Path;

use common::kill::*;
use common::*;

fn io(dir: &Path, img: &str, cmds: &[&str]) {
    qemu_io("qcow2", &dir.join(img), cmds);
}

/// base.qcow2 (1 MiB) <- mid.qcow2 (2 MiB; compressed clusters; with `snapshot`, an
/// internal snapshot) <- top.qcow2 (3 MiB; data, zeros, partial clusters).
fn setup(dir: &Path, compat: &str, snapshot: bool) {
    let o = format!("compat={compat}");
    qemu_create(&dir.join("base.qcow2"), "qcow2", &o, "1M");
    io(dir, "base.qcow2", &["write -P 5 0 1M"]);
    qcow2_overlay(&dir.join("mid.qcow2"), "base.qcow2", &o, Some("2M"));
    io(
        dir,
        "mid.qcow2",
        &[
            "write -c -P 7 0 64k",
            "write -c -P 8 192k 64k",
            "write -P 7 256k 200k",
            "write -z 900k 300k",
        ],
    );
    if snapshot {
        qemu_in(dir, &["snapshot", "-c", "s1", "mid.qcow2"]);
    }
    qcow2_overlay(&dir.join("top.qcow2"), "mid.qcow2", &o, Some("3M"));
    io(
        dir,
        "top.qcow2",
        &[
            "write -P 1 64k 64k",
            "write -P 2 1500k 100k",
            "write -P 3 200k 1k",
            "write -P 4 300k 4k",
            "write -z 10k 6k",
        ],
    );
    if compat == "1.1" {
        io(dir, "top.qcow2", &["write -z 1900k 128k"]);
    }
}

fn run_both(v: &Path, q: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(vimg_bin())
        .args(args)
        .current_dir(v)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = qemu_in(q, args);
    let got = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(got, want, "stdout of {args:?}");
    got
}

fn same_chain(v: &Path, q: &Path, what: &str) {
    for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        let (a, b) = (v.join(f), q.join(f));
        assert_eq!(
            guest(&a, "qcow2"),
            guest(&b, "qcow2"),
            "{what}: {f} differs"
        );
        assert_eq!(
            json(&qemu_img(&["info", "--output=json", s(&a)]))["virtual-size"],
            json(&qemu_img(&["info", "--output=json", s(&b)]))["virtual-size"],
            "{what}: {f} size"
        );
        run_ok("qemu-img", &["check", s(&a)]);
    }
}

fn case(compat: &str, snapshot: bool, args: &[&str]) {
    if !qemu_available(&test_name()) {
        return;
    }
    let (tv, tq) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (v, q) = (tv.path(), tq.path());
    setup(v, compat, snapshot);
    setup(q, compat, snapshot);
    let before = guest(&v.join("top.qcow2"), "qcow2");
    run_both(v, q, args);
    same_chain(v, q, &format!("{args:?}"));
    assert_eq!(guest(&v.join("top.qcow2"), "qcow2"), before, "top changed");
    if snapshot {
        for d in [v, q] {
            qemu_img(&[
                "convert",
                "-l",
                "s1",
                "-O",
                "raw",
                s(&d.join("mid.qcow2")),
                s(&d.join("s.raw")),
            ]);
        }
        assert_same_file(&v.join("s.raw"), &q.join("s.raw"));
    }
}

#[test]
fn into_direct_backing_like_qemu() {
    case("1.1", false, &["commit", "top.qcow2"]);
}

#[test]
fn into_snapshotted_backing_like_qemu() {
    case("1.1", true, &["commit", "-q", "top.qcow2"]);
}

#[test]
fn compat_0_10_like_qemu() {
    case("0.10", false, &["commit", "top.qcow2"]);
}

#[test]
fn drop_and_deeper_base_like_qemu() {
    case("1.1", false, &["commit", "-d", "top.qcow2"]);
    case("1.1", false, &["commit", "-b", "base.qcow2", "top.qcow2"]);
}

#[test]
fn into_raw_backing_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let (tv, tq) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [tv.path(), tq.path()] {
        std::fs::write(d.join("b.raw"), pattern(1 << 20, 3)).unwrap();
        qemu_in(
            d,
            &[
                "create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "t.qcow2", "2M",
            ],
        );
        qemu_io(
            "qcow2",
            &d.join("t.qcow2"),
            &[
                "write -P 3 1M 64k",
                "write -P 4 1000 3000",
                "write -z 512k 64k",
            ],
        );
    }
    let (v, q) = (tv.path(), tq.path());
    run_both(v, q, &["commit", "t.qcow2"]);
    assert_same_file(&v.join("b.raw"), &q.join("b.raw"));
    assert_eq!(
        guest(&v.join("t.qcow2"), "qcow2"),
        guest(&q.join("t.qcow2"), "qcow2")
    );
    run_ok("qemu-img", &["check", s(&v.join("t.qcow2"))]);
}

#[test]
fn messages_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    setup(d, "1.1", false);
    let fails = |args: &[&str]| -> (i32, String) {
        let out = std::process::Command::new(vimg_bin())
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        let q = std::process::Command::new("qemu-img")
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), q.status.code(), "{args:?}");
        let strip = |b: &[u8]| {
            String::from_utf8_lossy(b)
                .lines()
                .filter(|l| !l.starts_with("WARNING") && !l.starts_with("    "))
                .map(|l| l.split_once(": ").map_or(l, |x| x.1).to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&out.stderr), strip(&q.stderr), "{args:?}");
        (out.status.code().unwrap_or(-1), String::new())
    };
    assert_eq!(fails(&["commit", "-b", "nosuch", "top.qcow2"]).0, 1);
    assert_eq!(fails(&["commit", "base.qcow2"]).0, 1);
}

/// SIGKILL before each write of `commit`: no corruption in any image of the chain, the top
/// reads as before, the base (mid) holds its old or its new content in every cluster;
/// leaks go with `check -r leaks`.
fn kill_case(snapshot: bool, args: &[&str]) {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let pristine = t.path().join("pristine");
    let done = t.path().join("done");
    for d in [&pristine, &done] {
        std::fs::create_dir(d).unwrap();
        setup(d, "1.1", snapshot);
    }
    qemu_in(&done, args);
    let top_old = guest(&pristine.join("top.qcow2"), "qcow2");
    let mid_old = guest(&pristine.join("mid.qcow2"), "qcow2");
    let mid_new = guest(&done.join("mid.qcow2"), "qcow2");
    let work = t.path().join("work");
    let mut kills = 0;
    for n in 0.. {
        assert!(n < 10_000, "no end in sight");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir(&work).unwrap();
        for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
            std::fs::copy(pristine.join(f), work.join(f)).unwrap();
        }
        let mut a: Vec<String> = args.iter().map(|x| x.to_string()).collect();
        let last = a.len() - 1;
        a[last] = s(&work.join(&a[last])).to_string();
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let killed = run_killed(&refs, n);
        let what = format!("{args:?} killed before point {n}");
        for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
            check_then_repair(&work.join(f), "qcow2", &what);
        }
        assert_eq!(
            guest(&work.join("top.qcow2"), "qcow2"),
            top_old,
            "{what}: top changed"
        );
        let mid = guest(&work.join("mid.qcow2"), "qcow2");
        assert_old_or_new(&mid, &mid_old, &mid_new, 65536, &what);
        if !killed {
            assert!(
                mid == mid_new,
                "{what}: finished run differs from qemu-img's"
            );
            same_chain(&work, &done, &what);
            break;
        }
        kills += 1;
    }
    assert!(kills > 5, "only {kills} kill points");
}

#[test]
fn killed_at_every_point() {
    kill_case(false, &["commit", "-q", "top.qcow2"]);
}

#[test]
fn killed_at_every_point_with_snapshot_in_base() {
    kill_case(true, &["commit", "-q", "top.qcow2"]);
}

/// A shorter image in the middle of the chain: the top reads zeros past its end, and so must
/// the base after `commit -b` (qemu-img writes them too). Growing a base over a longer
/// backing file of its own is refused before anything is written.
#[test]
fn shorter_intermediate_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let (tv, tq) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [tv.path(), tq.path()] {
        qemu_in(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "3M"]);
        io(d, "base.qcow2", &["write -P 5 0 3M"]);
        qcow2_overlay(&d.join("mid.qcow2"), "base.qcow2", "", Some("1M"));
        qcow2_overlay(&d.join("top.qcow2"), "mid.qcow2", "", Some("3M"));
        io(d, "top.qcow2", &["write -P 1 64k 64k", "write -P 2 2M 4k"]);
    }
    let (v, q) = (tv.path(), tq.path());
    let sum = sha256_file(&v.join("mid.qcow2"));
    let out = std::process::Command::new(vimg_bin())
        .args(["commit", "top.qcow2"])
        .current_dir(v)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(sha256_file(&v.join("mid.qcow2")), sum, "mid changed");
    run_both(v, q, &["commit", "-b", "base.qcow2", "top.qcow2"]);
    same_chain(v, q, "commit -b base.qcow2");
}

/// SIGKILL before each write of a commit into a raw base: the top reads as before, the raw
/// base holds its old or its new content in every cluster, the top has no corruption.
#[test]
fn killed_at_every_point_into_raw() {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let pristine = t.path().join("pristine");
    let done = t.path().join("done");
    for d in [&pristine, &done] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("b.raw"), pattern(1 << 20, 3)).unwrap();
        qemu_in(
            d,
            &[
                "create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "t.qcow2", "2M",
            ],
        );
        qemu_io(
            "qcow2",
            &d.join("t.qcow2"),
            &[
                "write -P 3 1M 64k",
                "write -P 4 1000 3000",
                "write -z 512k 64k",
                "write -P 6 1600k 200k",
            ],
        );
    }
    qemu_in(&done, &["commit", "-q", "t.qcow2"]);
    let top_old = guest(&pristine.join("t.qcow2"), "qcow2");
    let base_old = std::fs::read(pristine.join("b.raw")).unwrap();
    let base_new = std::fs::read(done.join("b.raw")).unwrap();
    let work = t.path().join("work");
    let mut kills = 0;
    for n in 0.. {
        assert!(n < 10_000, "no end in sight");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir(&work).unwrap();
        for f in ["b.raw", "t.qcow2"] {
            std::fs::copy(pristine.join(f), work.join(f)).unwrap();
        }
        let top = work.join("t.qcow2");
        let killed = run_killed(&["commit", "-q", s(&top)], n);
        let what = format!("commit into raw killed before point {n}");
        check_then_repair(&top, "qcow2", &what);
        assert_eq!(guest(&top, "qcow2"), top_old, "{what}: top changed");
        let base = std::fs::read(work.join("b.raw")).unwrap();
        assert_old_or_new(&base, &base_old, &base_new, 512, &what);
        if !killed {
            assert!(
                base == base_new,
                "{what}: finished base differs from qemu-img's"
            );
            break;
        }
        kills += 1;
    }
    assert!(kills > 3, "only {kills} kill points");
}

//! `snapshot -c/-d/-a` on qcow2 (issue 15), against qemu-img as the oracle, and killed
//! (SIGKILL through the test-only crash hook) at its first eight write, flush and truncation
//! points and every third one after.
//!
//! After every kill: `qemu-img check` exits 0 (create, delete and apply each switch in one
//! header write: no errors, not even leaks), `check -r all` leaves it clean, and
//! the whole image state (the snapshot list, the active content, every snapshot's content)
//! is the old one or the new one. The operation
//! finished is compared with qemu-img doing the same on a copy.

mod common;

use std::path::{Path, PathBuf};

use common::kill::*;
use common::*;

/// The snapshot list (id, name, virtual size), the active content, each snapshot's content.
#[derive(Debug, PartialEq, Eq)]
struct State {
    list: Vec<(String, String, u64)>,
    active: Vec<u8>,
    snaps: Vec<Vec<u8>>,
}

fn raw_of(img: &Path, dir: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = dir.join("state.raw");
    let _ = std::fs::remove_file(&out);
    let l = snapshot.map(|id| format!("snapshot.id={id}"));
    let mut args = vec!["convert", "-f", "qcow2", "-O", "raw"];
    if let Some(l) = &l {
        args.extend(["-l", l.as_str()]);
    }
    args.extend([s(img), s(&out)]);
    qemu_img(&args);
    std::fs::read(&out).expect("read raw")
}

fn state(img: &Path, dir: &Path) -> State {
    let v = json(&qemu_img(&["info", "-f", "qcow2", "--output=json", s(img)]));
    let list: Vec<(String, String, u64)> = v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    (
                        x["id"].as_str().expect("id").to_string(),
                        x["name"].as_str().expect("name").to_string(),
                        x["vm-state-size"].as_u64().expect("vm-state-size"),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let snaps = list
        .iter()
        .map(|(id, _, _)| raw_of(img, dir, Some(id)))
        .collect();
    State {
        active: raw_of(img, dir, None),
        list,
        snaps,
    }
}

fn with_img(args: &[&str], img: &Path) -> Vec<String> {
    args.iter()
        .map(|a| if *a == "{}" { s(img) } else { a }.to_string())
        .collect()
}

fn run(prog: &str, args: &[&str], img: &Path) {
    let a = with_img(args, img);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    if prog == "vimg" {
        vimg(&refs);
    } else {
        run_ok(prog, &refs);
    }
}

fn base(dir: &Path) -> PathBuf {
    let img = dir.join("pristine.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 1 0 1M",
            "write -c -P 7 2M 128k",
            "write -z 4M 64k",
        ],
    );
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    qemu_io(
        "qcow2",
        &img,
        &["write -P 2 512k 256k", "write -P 3 6M 64k"],
    );
    qemu_img(&["snapshot", "-c", "s2", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 4 0 64k"]);
    img
}

/// 512-byte clusters: many L2 tables and refcount blocks; no snapshot yet.
fn small512(dir: &Path) -> PathBuf {
    let img = dir.join("pristine.qcow2");
    qemu_create(&img, "qcow2", "cluster_size=512", "1M");
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 1 0 100k",
            "write -c -P 5 200k 4k",
            "write -P 2 900k 124k",
        ],
    );
    img
}

/// The image grew after its snapshot: applying it gives the old size back.
fn grown_after_snapshot(dir: &Path) -> PathBuf {
    let img = base(dir);
    qemu_img(&["resize", "-q", s(&img), "40M"]);
    qemu_io("qcow2", &img, &["write -P 8 30M 64k"]);
    img
}

/// Extended L2, 64-bit refcounts, a persistent bitmap and a snapshot: the new refcount
/// structure must count the bitmap's tables and keep its header extension.
fn extended_bitmap(dir: &Path) -> PathBuf {
    let img = dir.join("pristine.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,refcount_bits=64,cluster_size=128k",
        s(&img),
        "8M",
    ]);
    qemu_img(&["bitmap", "--add", s(&img), "bm"]);
    qemu_io("qcow2", &img, &["write -P 1 0 1M", "write -c -P 7 2M 256k"]);
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 2 64k 8k"]);
    img
}

fn small512_snapped(dir: &Path) -> PathBuf {
    let img = small512(dir);
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 9 50k 100k"]);
    img
}

struct Case {
    name: &'static str,
    setup: fn(&Path) -> PathBuf,
    /// The same arguments for vimg and qemu-img, `{}` for the image.
    args: &'static [&'static str],
    /// Leaks allowed after a kill (none of the snapshot actions has any: all false).
    leaks: bool,
}

fn run_case(c: &Case) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pristine = (c.setup)(d);
    let old = state(&pristine, d);
    // qemu-img's result and vimg's, uninterrupted.
    let q = d.join("qemu.qcow2");
    std::fs::copy(&pristine, &q).expect("copy");
    run("qemu-img", c.args, &q);
    let new = state(&q, d);
    assert_ne!(old, new, "{}: the operation changes nothing", c.name);
    let work = d.join("work.qcow2");
    let mut kills = 0u64;
    let mut leaky = 0u64;
    // Every point of the first eight, then every third one (the file's time budget; each
    // point of the QEMU-layout step is killed in `qcow2_snapshot_layout.rs`).
    let mut next = 0u64;
    loop {
        let n = next;
        next += if n < 8 { 1 } else { 3 };
        assert!(n < 10_000, "{}: no end in sight", c.name);
        std::fs::copy(&pristine, &work).expect("copy");
        let a = with_img(c.args, &work);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let killed = run_killed(&refs, n);
        let what = format!("{} killed before point {n}", c.name);
        // No copied-flag window any more: an error of any kind fails the test.
        let verdict = qemu_check(&work, false, &what);
        let st = state(&work, d);
        assert!(
            st == old || st == new,
            "{what}: neither the old nor the new state"
        );
        if verdict == Verdict::Leaks {
            assert!(c.leaks, "{what}: leaks");
            leaky += 1;
        }
        // `-r all`, not `-r leaks`: a leaked reference to a cluster the active tables use
        // (refcount 2, one reference) needs its copied flag set once the refcount is 1.
        let out = vimg_raw(&["check", "-r", "all", s(&work)]);
        assert_eq!(out.status.code(), Some(0), "{what}: vimg check -r all");
        assert_eq!(qemu_check(&work, false, &what), Verdict::Clean, "{what}");
        assert!(
            state(&work, d) == st,
            "{what}: the repair changed the image"
        );
        if !killed {
            assert!(
                st == new,
                "{}: vimg's result differs from qemu-img's",
                c.name
            );
            break;
        }
        kills += 1;
        if st == old {
            // Run again after the crash: the expected result.
            run("vimg", c.args, &work);
            assert!(state(&work, d) == new, "{what}: rerun");
            assert_eq!(qemu_check(&work, false, &what), Verdict::Clean);
        }
    }
    eprintln!(
        "{}: {kills} kill points, {leaky} with leaks, none with errors",
        c.name
    );
    assert!(kills > 3, "{}: the hook fired {kills} times", c.name);
}

#[test]
fn kill_snapshot_create() {
    if !qemu_available("kill_snapshot_create") {
        return;
    }
    run_case(&Case {
        name: "snapshot -c on an image with snapshots",
        setup: base,
        args: &["snapshot", "-c", "s3", "{}"],
        leaks: false,
    });
    run_case(&Case {
        name: "snapshot -c, extended L2, 64-bit refcounts, a bitmap",
        setup: extended_bitmap,
        args: &["snapshot", "-c", "s2", "{}"],
        leaks: false,
    });
    run_case(&Case {
        name: "snapshot -c, 512-byte clusters, first snapshot",
        setup: small512,
        args: &["snapshot", "-c", "first", "{}"],
        leaks: false,
    });
}

#[test]
fn kill_snapshot_delete() {
    if !qemu_available("kill_snapshot_delete") {
        return;
    }
    run_case(&Case {
        name: "snapshot -d (the older of two)",
        setup: base,
        args: &["snapshot", "-d", "s1", "{}"],
        leaks: false,
    });
    run_case(&Case {
        name: "snapshot -d, extended L2, 64-bit refcounts, a bitmap",
        setup: extended_bitmap,
        args: &["snapshot", "-d", "s1", "{}"],
        leaks: false,
    });
    run_case(&Case {
        name: "snapshot -d, 512-byte clusters, the only snapshot",
        setup: small512_snapped,
        args: &["snapshot", "-d", "s1", "{}"],
        leaks: false,
    });
}

#[test]
fn kill_snapshot_apply() {
    if !qemu_available("kill_snapshot_apply") {
        return;
    }
    run_case(&Case {
        name: "snapshot -a s1",
        setup: base,
        args: &["snapshot", "-a", "s1", "{}"],
        leaks: false,
    });
    run_case(&Case {
        name: "snapshot -a s2 after a resize (the size goes back)",
        setup: grown_after_snapshot,
        args: &["snapshot", "-a", "s2", "{}"],
        leaks: false,
    });
    run_case(&Case {
        name: "snapshot -a 1, 512-byte clusters",
        setup: small512_snapped,
        args: &["snapshot", "-a", "1", "{}"],
        leaks: false,
    });
}

/// The same sequence of snapshot commands (and guest writes between them, by qemu-io) on
/// two copies, one changed by vimg and one by qemu-img: the same snapshot list, the same
/// content at every snapshot and in the active image, `qemu-img check` clean, and
/// `convert -l` by vimg bit-identical to qemu-img's on vimg's image. Extended L2, 64-bit
/// refcounts, compat=0.10 and 512-byte clusters too.
#[test]
fn snapshot_sequence_like_qemu() {
    if !qemu_available("snapshot_sequence_like_qemu") {
        return;
    }
    for opts in [
        "cluster_size=65536",
        "compat=0.10",
        "extended_l2=on,cluster_size=16384",
        "refcount_bits=64",
        "cluster_size=512",
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let make = |name: &str| {
            let img = d.join(name);
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, s(&img), "3M"]);
            qemu_io(
                "qcow2",
                &img,
                &[
                    "write -P 1 0 300k",
                    "write -c -P 6 1M 64k",
                    "write -z 2M 64k",
                ],
            );
            img
        };
        let v = make("v.qcow2");
        let q = make("q.qcow2");
        type Step = (&'static [&'static str], &'static [&'static str]);
        let steps: &[Step] = &[
            (&["snapshot", "-c", "one", "{}"], &["write -P 2 64k 64k"]),
            (&["snapshot", "-c", "two", "{}"], &["write -P 3 0 8k"]),
            // A duplicate name is allowed, as in qemu-img.
            (&["snapshot", "-c", "one", "{}"], &["write -P 4 2M 4k"]),
            (&["snapshot", "-a", "2", "{}"], &["write -P 5 128k 4k"]),
            (&["snapshot", "-d", "one", "{}"], &[]),
            (&["snapshot", "-a", "one", "{}"], &["write -P 7 0 4k"]),
            (&["snapshot", "-c", "", "{}"], &[]),
            (&["snapshot", "-d", "two", "{}"], &[]),
        ];
        for (args, writes) in steps {
            run("vimg", args, &v);
            run("qemu-img", args, &q);
            if !writes.is_empty() {
                qemu_io("qcow2", &v, writes);
                qemu_io("qcow2", &q, writes);
            }
            let what = format!("{opts}: after {args:?}");
            assert_eq!(qemu_check(&v, false, &what), Verdict::Clean, "{what}");
            assert!(
                state(&v, d) == state(&q, d),
                "{what}: differs from qemu-img"
            );
        }
        // The listing of vimg's image, by vimg and by qemu-img.
        assert_eq!(
            vimg(&["snapshot", "-l", s(&v)]),
            qemu_img(&["snapshot", "-l", s(&v)]),
            "{opts}"
        );
        // convert -l from vimg's snapshots, by vimg and by qemu-img.
        let list = state(&v, d).list;
        for (id, name, _) in &list {
            let a = d.join("a.raw");
            let b = d.join("b.raw");
            let l = format!("snapshot.id={id}");
            vimg(&["convert", "-l", &l, "-O", "raw", s(&v), s(&a)]);
            qemu_img(&["convert", "-l", &l, "-O", "raw", s(&v), s(&b)]);
            assert_same_file(&a, &b);
            if !name.is_empty() {
                vimg(&["convert", "-l", name, "-O", "qcow2", s(&v), s(&a)]);
                qemu_img(&["convert", "-l", name, "-O", "qcow2", s(&v), s(&b)]);
                assert_same_file(&a, &b);
            }
        }
    }
}

/// Errors: the words after the program name and the exit code are qemu-img's, and the
/// image is left as it was.
#[test]
fn snapshot_errors_like_qemu() {
    if !qemu_available("snapshot_errors_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = d.join("e.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    let raw = d.join("r.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "1M"]);
    let before = std::fs::read(&img).expect("read");
    let tail = |o: &std::process::Output| {
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        let line = e.lines().last().unwrap_or("").to_string();
        line.split_once(": ")
            .map(|x| x.1.to_string())
            .unwrap_or(line)
    };
    for args in [
        &["snapshot", "-a", "nope", "{}"][..],
        &["snapshot", "-d", "nope", "{}"],
        // -d looks names up, not IDs.
        &["snapshot", "-d", "1", "{}"],
        &["snapshot", "-c", "x", "-a", "s1", "{}"],
    ] {
        let a = with_img(args, &img);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let vo = vimg_raw(&refs);
        let qo = run_cmd("qemu-img", &refs);
        assert_eq!(vo.status.code(), qo.status.code(), "{args:?}");
        assert_eq!(
            tail(&vo).replace("'vimg ", "'qemu-img "),
            tail(&qo),
            "{args:?}"
        );
        assert_eq!(std::fs::read(&img).expect("read"), before, "{args:?}");
    }
    for args in [
        &["snapshot", "-f", "raw", "-c", "x", "{}"][..],
        &["snapshot", "-f", "raw", "-a", "x", "{}"],
        &["snapshot", "-f", "raw", "-d", "x", "{}"],
    ] {
        let a = with_img(args, &raw);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let vo = vimg_raw(&refs);
        let qo = run_cmd("qemu-img", &refs);
        assert_eq!(vo.status.code(), qo.status.code(), "{args:?}");
        assert_eq!(tail(&vo), tail(&qo), "{args:?}");
    }
    // refcount_bits=1 cannot hold a second reference: refused, nothing written (qemu-img
    // refuses too, with leaks left behind).
    let one = d.join("one.qcow2");
    qemu_create(&one, "qcow2", "refcount_bits=1", "1M");
    qemu_io("qcow2", &one, &["write -P 1 0 64k"]);
    let before = std::fs::read(&one).expect("read");
    let vo = vimg_raw(&["snapshot", "-c", "x", s(&one)]);
    assert_eq!(vo.status.code(), Some(1));
    assert!(tail(&vo).starts_with("Could not create snapshot 'x': "));
    assert_eq!(std::fs::read(&one).expect("read"), before);
}

/// An image `check` finds corrupt (a used cluster's refcount 0) is refused by every
/// snapshot action and by `bitmap`, before anything is written.
#[test]
fn corrupt_image_refused_unchanged() {
    if !qemu_available("corrupt_image_refused_unchanged") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = d.join("c.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 1 0 64k"]);
    // The data cluster just written is the last one; its refcount (16 bits) goes to 0.
    let len = std::fs::metadata(&img).expect("stat").len();
    let last = len / 65536 - 1;
    let reftable = rd64be(&img, 48);
    let block = rd64be(&img, reftable);
    patch(&img, block + 2 * last, &[0, 0]);
    let out = run_cmd("qemu-img", &["check", s(&img)]);
    assert_eq!(out.status.code(), Some(2), "the image is corrupt");
    let before = std::fs::read(&img).expect("read");
    for args in [
        &["snapshot", "-c", "x", "{}"][..],
        &["snapshot", "-a", "s1", "{}"],
        &["snapshot", "-d", "s1", "{}"],
        &["bitmap", "--add", "{}", "b"],
    ] {
        let a = with_img(args, &img);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = vimg_raw(&refs);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("corruptions"),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read(&img).expect("read"), before, "{args:?}");
    }
}

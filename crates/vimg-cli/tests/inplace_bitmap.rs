//! `bitmap` on qcow2 persistent bitmaps (issue 15), against qemu-img as the oracle, and
//! killed (SIGKILL through the test-only crash hook) at every write, flush and truncation
//! point: after every kill `qemu-img check` finds no corruption (leaks allowed, and
//! `vimg check -r leaks` makes it clean), and the bitmaps (names, granularities, flags,
//! bits) and the guest content are the old ones or the new ones.
//!
//! The bits are compared through `qemu-img convert --bitmaps`: the same bitmaps give the
//! same converted file.

mod common;

use std::path::{Path, PathBuf};

use common::kill::*;
use common::*;

#[derive(Debug, PartialEq, Eq)]
struct State {
    bitmaps: serde_json::Value,
    /// `qemu-img convert --bitmaps -O qcow2` of the image: bits and guest content.
    converted: String,
}

fn state(img: &Path, dir: &Path) -> State {
    let v = json(&qemu_img(&["info", "-f", "qcow2", "--output=json", s(img)]));
    let out = dir.join("state.qcow2");
    let _ = std::fs::remove_file(&out);
    qemu_img(&[
        "convert",
        "--bitmaps",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        s(img),
        s(&out),
    ]);
    State {
        bitmaps: v["format-specific"]["data"]["bitmaps"].clone(),
        converted: sha256_file(&out),
    }
}

/// `{}`: the image; `{src}`: `src.qcow2` beside it.
fn with_img(args: &[&str], img: &Path) -> Vec<String> {
    let src = img.with_file_name("src.qcow2");
    args.iter()
        .map(|a| match *a {
            "{}" => s(img).to_string(),
            "{src}" => s(&src).to_string(),
            a => a.to_string(),
        })
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

/// Three bitmaps with bits set by guest writes (bm1 enabled at 64k, bm2 disabled at 8k,
/// bm3 enabled at 1M), 512-byte or 64 KiB clusters.
fn with_bitmaps(dir: &Path, cluster: &str) -> PathBuf {
    let img = dir.join("pristine.qcow2");
    qemu_create(&img, "qcow2", &format!("cluster_size={cluster}"), "4M");
    qemu_img(&["bitmap", "--add", s(&img), "bm1"]);
    qemu_img(&["bitmap", "--add", "-g", "8k", "--disable", s(&img), "bm2"]);
    qemu_img(&["bitmap", "--add", "-g", "1M", s(&img), "bm3"]);
    qemu_io(
        "qcow2",
        &img,
        &["write -P 1 0 64k", "write -P 2 1M 8k", "write -P 3 3M 4k"],
    );
    img
}

fn big_clusters(dir: &Path) -> PathBuf {
    with_bitmaps(dir, "65536")
}

fn small_clusters(dir: &Path) -> PathBuf {
    with_bitmaps(dir, "512")
}

/// [`big_clusters`], and `src.qcow2` beside it with a 512-byte-granularity bitmap `s`.
fn with_source(dir: &Path) -> PathBuf {
    let src = dir.join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&src), "4M"]);
    qemu_img(&["bitmap", "--add", "-g", "512", s(&src), "s"]);
    qemu_io(
        "qcow2",
        &src,
        &["write 0 4k", "write 2M 1k", "write 3M 70k"],
    );
    big_clusters(dir)
}

fn no_bitmaps(dir: &Path) -> PathBuf {
    let img = dir.join("pristine.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    qemu_io("qcow2", &img, &["write -P 1 0 64k"]);
    img
}

/// `mids`: qemu-img commands giving the states between the actions of a command with
/// several (each action is one change, as in qemu-img).
fn run_case(name: &str, setup: fn(&Path) -> PathBuf, args: &[&str], mids: &[&[&str]]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pristine = setup(d);
    let old = state(&pristine, d);
    let mut between = Vec::new();
    for m in mids {
        let q = d.join("mid.qcow2");
        std::fs::copy(&pristine, &q).expect("copy");
        run("qemu-img", m, &q);
        between.push(state(&q, d));
    }
    let q = d.join("qemu.qcow2");
    std::fs::copy(&pristine, &q).expect("copy");
    run("qemu-img", args, &q);
    let new = state(&q, d);
    assert_ne!(old, new, "{name}: the operation changes nothing");
    let work = d.join("work.qcow2");
    let mut kills = 0u64;
    for n in 0.. {
        assert!(n < 10_000, "{name}: no end in sight");
        std::fs::copy(&pristine, &work).expect("copy");
        let a = with_img(args, &work);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let killed = run_killed(&refs, n);
        let what = format!("{name} killed before point {n}");
        qemu_check(&work, false, &what);
        let st = state(&work, d);
        assert!(
            st == old || st == new || between.contains(&st),
            "{what}: neither old nor new: {st:?}"
        );
        let out = vimg_raw(&["check", "-r", "leaks", s(&work)]);
        assert_eq!(out.status.code(), Some(0), "{what}: vimg check -r leaks");
        assert_eq!(qemu_check(&work, false, &what), Verdict::Clean, "{what}");
        if !killed {
            assert!(st == new, "{name}: vimg's result differs from qemu-img's");
            break;
        }
        kills += 1;
        if st == old {
            run("vimg", args, &work);
            assert!(state(&work, d) == new, "{what}: rerun");
        }
    }
    eprintln!("{name}: {kills} kill points");
    assert!(kills > 3, "{name}: the hook fired {kills} times");
}

#[test]
fn kill_bitmap_add() {
    if !qemu_available("kill_bitmap_add") {
        return;
    }
    run_case(
        "bitmap --add (the first one)",
        no_bitmaps,
        &["bitmap", "--add", "{}", "new"],
        &[],
    );
    run_case(
        "bitmap --add -g 4k --disable, 512-byte clusters",
        small_clusters,
        &["bitmap", "--add", "-g", "4k", "--disable", "{}", "new"],
        &[&["bitmap", "--add", "-g", "4k", "{}", "new"]],
    );
}

#[test]
fn kill_bitmap_remove() {
    if !qemu_available("kill_bitmap_remove") {
        return;
    }
    run_case(
        "bitmap --remove",
        big_clusters,
        &["bitmap", "--remove", "{}", "bm1"],
        &[],
    );
    run_case(
        "bitmap --remove, 512-byte clusters",
        small_clusters,
        &["bitmap", "--remove", "{}", "bm2"],
        &[],
    );
}

#[test]
fn kill_bitmap_clear_merge_enable() {
    if !qemu_available("kill_bitmap_clear_merge_enable") {
        return;
    }
    run_case(
        "bitmap --clear",
        small_clusters,
        &["bitmap", "--clear", "{}", "bm1"],
        &[],
    );
    run_case(
        "bitmap --merge bm1 --merge bm3 --enable",
        big_clusters,
        &[
            "bitmap", "--merge", "bm1", "--merge", "bm3", "--enable", "{}", "bm2",
        ],
        &[
            &["bitmap", "--merge", "bm1", "{}", "bm2"],
            &["bitmap", "--merge", "bm1", "--merge", "bm3", "{}", "bm2"],
        ],
    );
    run_case(
        "bitmap --merge s -b src.qcow2 -F qcow2",
        with_source,
        &[
            "bitmap", "--merge", "s", "-b", "{src}", "-F", "qcow2", "{}", "bm2",
        ],
        &[],
    );
    run_case(
        "bitmap --disable",
        big_clusters,
        &["bitmap", "--disable", "{}", "bm3"],
        &[],
    );
}

/// The last bitmap removed: the extension and the autoclear bit go, as with qemu-img;
/// then bitmaps on an image with a backing file, and `rebase -u` keeps them.
#[test]
fn bitmap_sequence_like_qemu() {
    if !qemu_available("bitmap_sequence_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    for prog in ["vimg", "qemu-img"] {
        let img = d.join(format!("{prog}.qcow2"));
        qcow2_overlay(&img, "base.qcow2", "", None);
        let steps: &[&[&str]] = &[
            &["bitmap", "--add", "{}", "a"],
            &["bitmap", "--remove", "{}", "a"],
            &["bitmap", "--add", "-g", "512", "{}", "b"],
            &["bitmap", "--add", "-g", "2G", "{}", "c"],
            &["bitmap", "--disable", "{}", "b"],
            &["bitmap", "--remove", "--add", "{}", "c"],
            &["rebase", "-u", "-b", "", "{}"],
        ];
        for st in steps {
            run(prog, st, &img);
            assert_eq!(qemu_check(&img, false, prog), Verdict::Clean);
        }
    }
    let v = d.join("vimg.qcow2");
    let q = d.join("qemu-img.qcow2");
    assert_eq!(state(&v, d), state(&q, d));
    let header = |p: &Path| {
        let b = std::fs::read(p).expect("read");
        (b[88..96].to_vec(), rd64be(p, 8))
    };
    assert_eq!(header(&v), header(&q), "autoclear bits, backing offset");
    // Everything removed: no extension, no autoclear bit.
    for (prog, img) in [("vimg", &v), ("qemu-img", &q)] {
        run(prog, &["bitmap", "--remove", "{}", "b"], img);
        run(prog, &["bitmap", "--remove", "{}", "c"], img);
    }
    assert_eq!(state(&v, d), state(&q, d));
    assert_eq!(header(&v), header(&q));
    assert_eq!(qemu_check(&v, false, "vimg"), Verdict::Clean);
}

/// Errors in qemu-img's words and exit codes, nothing written.
#[test]
fn bitmap_errors_like_qemu() {
    if !qemu_available("bitmap_errors_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = d.join("e.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    qemu_img(&["bitmap", "--add", s(&img), "x"]);
    // src.qcow2 (-b): a bitmap `big` over another virtual size.
    let src = d.join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&src), "2M"]);
    qemu_img(&["bitmap", "--add", s(&src), "big"]);
    let v2 = d.join("v2.qcow2");
    qemu_create(&v2, "qcow2", "compat=0.10", "1M");
    let tail = |o: &std::process::Output| {
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        let line = e.lines().last().unwrap_or("").to_string();
        line.split_once(": ")
            .map(|x| x.1.to_string())
            .unwrap_or(line)
    };
    for (args, file) in [
        (&["bitmap", "--add", "{}", "x"][..], &img),
        (&["bitmap", "--remove", "{}", "nope"], &img),
        (&["bitmap", "--clear", "{}", "nope"], &img),
        (&["bitmap", "--enable", "{}", "nope"], &img),
        (&["bitmap", "--merge", "nope", "{}", "x"], &img),
        (&["bitmap", "--add", "-g", "1000", "{}", "y"], &img),
        (&["bitmap", "--add", "-g", "256", "{}", "y"], &img),
        (&["bitmap", "--add", "-g", "4G", "{}", "y"], &img),
        (&["bitmap", "{}", "x"], &img),
        (&["bitmap", "-g", "64k", "--remove", "{}", "x"], &img),
        (&["bitmap", "-b", "o", "--add", "{}", "x"], &img),
        (&["bitmap", "-F", "qcow2", "--add", "{}", "x"], &img),
        (
            &["bitmap", "--merge", "nope", "-b", "{src}", "{}", "x"],
            &img,
        ),
        (
            &[
                "bitmap", "--merge", "s", "-b", "{src}", "-F", "raw", "{}", "x",
            ],
            &img,
        ),
        (
            &["bitmap", "--merge", "big", "-b", "{src}", "{}", "x"],
            &img,
        ),
    ] {
        let before = std::fs::read(file).expect("read");
        let a = with_img(args, file);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let vo = vimg_raw(&refs);
        assert_eq!(std::fs::read(file).expect("read"), before, "{args:?}");
        // qemu-img rewrites the directory even when it refuses: on a copy.
        let copy = d.join("copy.qcow2");
        std::fs::copy(file, &copy).expect("copy");
        let a = with_img(args, &copy);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let qo = run_cmd("qemu-img", &refs);
        assert_eq!(vo.status.code(), qo.status.code(), "{args:?}");
        assert_eq!(tail(&vo), tail(&qo), "{args:?}");
    }
    // compat=0.10 cannot hold bitmaps: refused, nothing written.
    let before = std::fs::read(&v2).expect("read");
    let vo = vimg_raw(&["bitmap", "--add", s(&v2), "y"]);
    assert_eq!(vo.status.code(), Some(1));
    assert!(tail(&vo).contains("Cannot store dirty bitmaps in qcow2 v2 files"));
    assert_eq!(std::fs::read(&v2).expect("read"), before);
}

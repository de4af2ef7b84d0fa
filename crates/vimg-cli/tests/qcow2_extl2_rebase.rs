//! iotest 271's last qcow2 forms, against qemu-img:
//! - safe `rebase` (and `rebase -c`) of images with extended L2 entries: the same file as
//!   qemu-img's, byte for byte past the header cluster (subcluster layout, bitmaps,
//!   compressed entries, length), and the same backing file in the header;
//! - `resize --preallocation=metadata|falloc|full` over a backing file longer than the old
//!   size: the same file as qemu-img's, byte for byte (the new area reading zeros);
//! - SIGKILL at sampled points of both leaves images `qemu-img check` finds free of
//!   corruption with the guest content unchanged (rebase) or old-or-new (resize);
//! - what stays refused is refused before anything is written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::kill::{check_then_repair, guest, run_killed_in};
use common::*;

/// `qemu-io -f qcow2 -c CMD...` on `img`.
fn io(img: &Path, cmds: &[&str]) {
    qemu_io("qcow2", img, cmds);
}

/// `qemu-img create` of a qcow2 with `opts` in `dir`, over `backing` (relative) if any.
fn mk(dir: &Path, name: &str, opts: &str, backing: Option<&str>, size: &str) -> PathBuf {
    let p = dir.join(name);
    match backing {
        Some(b) => qcow2_overlay(&p, b, opts, Some(size)),
        None => qemu_create(&p, "qcow2", opts, size),
    }
    p
}

/// Runs `prog args` in `dir`; returns the output.
fn run_in(dir: &Path, prog: &Path, args: &[&str]) -> std::process::Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run")
}

/// `qemu-img map --output=json` of `img`, with its folder's name removed.
fn map(img: &Path) -> String {
    let dir = img.parent().expect("parent").display().to_string();
    qemu_img(&["map", "--output=json", s(img)]).replace(&dir, "DIR")
}

/// The rebase scenarios: name, setup (in a folder, returns the image to rebase), the
/// rebase arguments before the image name.
type Setup = fn(&Path) -> PathBuf;

/// iotest 271 "Preservation of unallocated holes after rebase".
fn holes(d: &Path) -> PathBuf {
    let o = "cluster_size=1M,extended_l2=on";
    mk(d, "base.qcow2", o, None, "1M");
    let mid = mk(d, "mid.qcow2", o, Some("base.qcow2"), "1M");
    let top = mk(d, "top.qcow2", o, Some("mid.qcow2"), "1M");
    io(&mid, &["write -P 0x11 32k 32k", "write -P 0x22 960k 32k"]);
    top
}

/// iotest 271 "Rebase with compression for images with subclusters".
fn compressed(d: &Path) -> PathBuf {
    let o = "cluster_size=1M,extended_l2=on";
    let base = mk(d, "base.qcow2", o, None, "3M");
    let mid = mk(d, "mid.qcow2", o, Some("base.qcow2"), "3M");
    let top = mk(d, "top.qcow2", o, Some("mid.qcow2"), "3M");
    io(&base, &["write -P 0x11 1M 1M"]);
    io(&mid, &["write -P 0x22 992k 32k", "write -P 0x33 2048k 32k"]);
    top
}

/// 64 KiB clusters (2 KiB subclusters): old-chain writes at unaligned offsets across
/// subclusters, clusters and L2 tables' worth of clusters; the top holds some subclusters
/// itself (data and zeros) in clusters the rebase also fills, so it writes in place there.
fn mixed(d: &Path) -> PathBuf {
    let o = "extended_l2=on";
    let base = mk(d, "base.qcow2", o, None, "4M");
    let mid = mk(d, "mid.qcow2", o, Some("base.qcow2"), "4M");
    let top = mk(d, "top.qcow2", o, Some("mid.qcow2"), "4M");
    io(&base, &["write -P 0x41 0 256k", "write -P 0x42 3M 100k"]);
    io(
        &mid,
        &[
            "write -P 0x51 1000 3000",
            "write -P 0x52 60k 10k",
            "write -P 0x53 130k 200k",
            "write -z 500k 8k",
            "write -P 0x54 1M 1M",
            "write -P 0x41 3M 50k",
        ],
    );
    io(
        &top,
        &[
            "write -P 0x61 4k 2k",
            "write -z 66k 2k",
            "write -P 0x62 1040k 6k",
            "write -P 0x63 3900k 4k",
        ],
    );
    top
}

/// The old backing file is shorter than the new one: past its end the top reads zeros,
/// which the rebase keeps with zero bits where the new backing file holds data.
fn old_shorter(d: &Path) -> PathBuf {
    let base = mk(d, "base.qcow2", "", None, "4M");
    io(&base, &["write -P 0x71 0 4M"]);
    let mid = mk(d, "mid.qcow2", "", None, "1M");
    io(&mid, &["write -P 0x72 100k 20k"]);
    let top = mk(d, "top.qcow2", "extended_l2=on", Some("mid.qcow2"), "4M");
    io(&top, &["write -P 0x73 2M 3k", "write -P 0x74 1M 64k"]);
    top
}

/// A virtual size inside a cluster and inside a subcluster, rebased onto a longer backing
/// file past the old one's end (the last cluster zeroed up to the disk's end).
fn unaligned(d: &Path) -> PathBuf {
    let base = mk(d, "base.qcow2", "", None, "2M");
    io(&base, &["write -P 0x81 0 2M"]);
    let mid = mk(d, "mid.qcow2", "", None, "700k");
    io(&mid, &["write -P 0x82 0 300k"]);
    let top = mk(
        d,
        "top.qcow2",
        "extended_l2=on,cluster_size=128k",
        Some("mid.qcow2"),
        "1025536",
    );
    io(&top, &["write -P 0x83 600k 3k"]);
    top
}

/// `rebase -c` of a standard qcow2: the compressed bytes end the file as in qemu-img's.
fn compressed_standard(d: &Path) -> PathBuf {
    let base = mk(d, "base.qcow2", "", None, "2M");
    io(&base, &["write -P 0x91 0 512k"]);
    let mid = mk(d, "mid.qcow2", "", Some("base.qcow2"), "2M");
    io(&mid, &["write -P 0x92 64k 64k", "write -P 0x93 1M 8k"]);
    mk(d, "top.qcow2", "", Some("mid.qcow2"), "2M")
}

const CASES: &[(&str, Setup, &[&str])] = &[
    (
        "271 holes",
        holes,
        &["rebase", "-b", "base.qcow2", "-F", "qcow2"],
    ),
    (
        "271 compressed",
        compressed,
        &["rebase", "-c", "-b", "base.qcow2", "-F", "qcow2"],
    ),
    (
        "mixed",
        mixed,
        &["rebase", "-b", "base.qcow2", "-F", "qcow2"],
    ),
    ("mixed, flattened", mixed, &["rebase", "-b", ""]),
    (
        "old backing shorter",
        old_shorter,
        &["rebase", "-b", "base.qcow2", "-F", "qcow2"],
    ),
    (
        "unaligned size",
        unaligned,
        &["rebase", "-b", "base.qcow2", "-F", "qcow2"],
    ),
    (
        "compressed, standard entries",
        compressed_standard,
        &["rebase", "-c", "-b", "base.qcow2", "-F", "qcow2"],
    ),
];

/// Runs `args` on the top image of `setup` with qemu-img in one folder and vimg in
/// another; returns (qemu's image, vimg's image, guest content before).
fn both(setup: Setup, args: &[&str], q: &Path, v: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let qt = setup(q);
    let vt = setup(v);
    let before = guest(&vt, "qcow2");
    let mut a: Vec<&str> = args.to_vec();
    a.push("top.qcow2");
    let out = run_in(q, Path::new("qemu-img"), &a);
    assert!(out.status.success(), "qemu-img {a:?}: {}", said(&out));
    let out = run_in(v, &vimg_bin(), &a);
    assert!(out.status.success(), "vimg {a:?}: {}", said(&out));
    (qt, vt, before)
}

#[test]
fn rebase_with_extended_l2_matches_qemu_img_past_the_header() {
    if !qemu_available("rebase_with_extended_l2_matches_qemu_img_past_the_header") {
        return;
    }
    for &(name, setup, args) in CASES {
        let (dq, dv) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (qt, vt, before) = both(setup, args, dq.path(), dv.path());
        assert_eq!(qemu_check_output(&vt, "qcow2").0, 0, "{name}: check");
        assert_eq!(guest(&vt, "qcow2"), before, "{name}: guest content changed");
        assert_eq!(map(&vt), map(&qt), "{name}: map");
        assert_same_past_header(&qt, &vt, name);
        let info = |p: &Path| {
            let v = json(&qemu_img(&["info", "--output=json", s(p)]));
            (
                v["backing-filename"].clone(),
                v["backing-filename-format"].clone(),
            )
        };
        assert_eq!(info(&vt), info(&qt), "{name}: backing file");
    }
}

/// The two files are the same past their header cluster and as long. The header cluster
/// differs on purpose: a header rewrite that would not fit one sector leaves out QEMU's
/// optional feature-name table (one sector is written atomically; update.rs).
fn assert_same_past_header(q: &Path, v: &Path, what: &str) {
    let (a, b) = (std::fs::read(q).unwrap(), std::fs::read(v).unwrap());
    assert_eq!(a.len(), b.len(), "{what}: file length");
    let cs = 1usize << u32::from_be_bytes(a[20..24].try_into().unwrap());
    if let Some(i) = (cs..a.len()).find(|&i| a[i] != b[i]) {
        panic!("{what}: files differ at {i:#x} (cluster size {cs:#x})");
    }
}

/// The new area of each grown image: (extended_l2, old size, new size).
const GROWS: &[(&str, &str, &str)] = &[
    ("on", "503k", "1013k"),
    ("on", "512k", "1M"),
    ("on", "500k", "3M"),
    ("on", "1000k", "1001k"),
    ("off", "503k", "1013k"),
    ("off", "512k", "3M"),
];

/// The 1 MiB raw backing file of iotest 271's resize cases (all 0xff) in `d`.
fn ff_base(d: &Path) {
    let base = d.join("base");
    qemu_create(&base, "raw", "", "1M");
    qemu_io("raw", &base, &["write -P 0xff 0 1M"]);
}

/// A qcow2 image of `size` with `ext` extended L2 entries over `base` (raw), with data.
fn grow_img(d: &Path, ext: &str, size: &str) -> PathBuf {
    let p = d.join("t.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("extended_l2={ext}"),
        "-b",
        "base",
        "-F",
        "raw",
        s(&p),
        size,
    ]);
    io(&p, &["write -P 0x12 8k 2k", "write -P 0x13 300k 70k"]);
    p
}

#[test]
fn resize_preallocation_over_a_longer_backing_file_like_qemu_img() {
    if !qemu_available("resize_preallocation_over_a_longer_backing_file_like_qemu_img") {
        return;
    }
    for &(ext, old, new) in GROWS {
        for mode in ["metadata", "falloc", "full"] {
            let what = format!("extended_l2={ext} {old} -> {new} {mode}");
            let (dq, dv) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            ff_base(dq.path());
            ff_base(dv.path());
            let q = grow_img(dq.path(), ext, old);
            let v = grow_img(dv.path(), ext, old);
            let pre = format!("--preallocation={mode}");
            qemu_img(&["resize", "-q", &pre, s(&q), new]);
            let out = vimg_raw(&["resize", &pre, s(&v), new]);
            assert!(out.status.success(), "{what}: {}", said(&out));
            assert_eq!(String::from_utf8_lossy(&out.stdout), "Image resized.\n");
            assert_eq!(qemu_check_output(&v, "qcow2").0, 0, "{what}: check");
            let out = run_cmd("qemu-img", &["compare", "-q", s(&q), s(&v)]);
            assert_eq!(out.status.code(), Some(0), "{what}: content");
            // The new area reads zeros, not the backing file.
            let g = guest(&v, "qcow2");
            let old_n = vimg::options::parse_size(old).unwrap() as usize;
            assert!(g[old_n..].iter().all(|&b| b == 0), "{what}: new area");
            assert_eq!(map(&v), map(&q), "{what}: map");
            assert_eq!(sha256_file(&v), sha256_file(&q), "{what}: file differs");
        }
    }
}

/// Kills vimg before sampled writes of `args` (run in `dir` on `work`, a copy of
/// `pristine`): every image left is free of corruption; `judge` sees the guest content.
fn kill_sampled(
    dir: &Path,
    pristine: &Path,
    work: &Path,
    args: &[&str],
    mut judge: impl FnMut(&str, &[u8]),
) -> u64 {
    let mut killed = 0;
    let mut n = 0u64;
    loop {
        std::fs::copy(pristine, work).unwrap();
        let was_killed = run_killed_in(Some(dir), args, n);
        let what = format!("{args:?} killed before write {n}");
        check_then_repair(work, "qcow2", &what);
        judge(&what, &guest(work, "qcow2"));
        if !was_killed {
            break;
        }
        killed += 1;
        assert!(n < 5000, "{what}: no end in sight");
        // Every point early on, then sampled.
        n += if n < 24 { 1 } else { 7 };
    }
    killed
}

#[test]
fn rebase_with_extended_l2_killed_keeps_the_guest_content() {
    if !qemu_available("rebase_with_extended_l2_killed_keeps_the_guest_content") {
        return;
    }
    for &(name, setup, args) in &[CASES[0], CASES[1], CASES[2], CASES[4]] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let top = setup(d);
        let pristine = d.join("pristine.qcow2");
        std::fs::copy(&top, &pristine).unwrap();
        let before = guest(&top, "qcow2");
        let mut a: Vec<&str> = args.to_vec();
        a.push("top.qcow2");
        let killed = kill_sampled(d, &pristine, &top, &a, |what, got| {
            assert!(
                got == before.as_slice(),
                "{name}: {what}: guest content changed"
            );
        });
        assert!(killed > 3, "{name}: only {killed} kill points");
    }
}

#[test]
fn resize_preallocation_over_backing_killed_reads_old_or_new() {
    if !qemu_available("resize_preallocation_over_backing_killed_reads_old_or_new") {
        return;
    }
    for (ext, mode) in [("on", "metadata"), ("on", "falloc"), ("off", "metadata")] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ff_base(d);
        let img = grow_img(d, ext, "503k");
        let pristine = d.join("pristine.qcow2");
        std::fs::copy(&img, &pristine).unwrap();
        let old = guest(&img, "qcow2");
        let pre = format!("--preallocation={mode}");
        let args = ["resize", pre.as_str(), "t.qcow2", "1013k"];
        let killed = kill_sampled(d, &pristine, &img, &args, |what, got| {
            let n = old.len();
            if got.len() == n {
                assert!(
                    got == old.as_slice(),
                    "{ext} {mode}: {what}: old size, other content"
                );
            } else {
                assert_eq!(&got[..n], old.as_slice(), "{ext} {mode}: {what}: old part");
                assert!(
                    got[n..].iter().all(|&b| b == 0),
                    "{ext} {mode}: {what}: new area"
                );
            }
        });
        assert!(killed > 3, "{ext} {mode}: only {killed} kill points");
    }
}

#[test]
fn what_stays_refused_is_refused_before_writing() {
    if !qemu_available("what_stays_refused_is_refused_before_writing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // rebase -c where a cluster is partly allocated in the top (qemu-img aborts there).
    let top = mixed(d);
    let sum = sha256_file(&top);
    let out = run_in(
        d,
        &vimg_bin(),
        &[
            "rebase",
            "-c",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(said(&out).contains("partly allocated"), "{}", said(&out));
    assert_eq!(sha256_file(&top), sum, "rebase -c: image changed");
    // Internal snapshots with extended L2 entries.
    let top = holes(&d.join("s").tap_mkdir());
    qemu_img(&["snapshot", "-c", "s1", s(&top)]);
    let sum = sha256_file(&top);
    let out = run_in(
        top.parent().unwrap(),
        &vimg_bin(),
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(said(&out).contains("internal snapshots"), "{}", said(&out));
    assert_eq!(sha256_file(&top), sum, "snapshots: image changed");
    // commit into a base with extended L2 entries stays refused.
    let c = d.join("c").tap_mkdir();
    let base = mk(&c, "base.qcow2", "extended_l2=on", None, "1M");
    let top = mk(&c, "top.qcow2", "", Some("base.qcow2"), "1M");
    io(&top, &["write -P 5 0 64k"]);
    let (sb, st) = (sha256_file(&base), sha256_file(&top));
    let out = vimg_raw(&["commit", s(&top)]);
    assert_ne!(out.status.code(), Some(0), "{}", said(&out));
    assert_eq!(
        (sha256_file(&base), sha256_file(&top)),
        (sb, st),
        "commit: changed"
    );
}

trait TapMkdir {
    fn tap_mkdir(self) -> PathBuf;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// `rebase -u` of an image with extended L2 entries (a header change only) gives
/// qemu-img's backing reference and leaves the L2 tables as they are.
#[test]
fn unsafe_rebase_with_extended_l2_like_qemu_img() {
    if !qemu_available("unsafe_rebase_with_extended_l2_like_qemu_img") {
        return;
    }
    let args: &[&str] = &["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2"];
    let (dq, dv) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (qt, vt, _) = both(mixed, args, dq.path(), dv.path());
    assert_eq!(qemu_check_output(&vt, "qcow2").0, 0, "check");
    assert_eq!(map(&vt), map(&qt), "map");
    assert_same_past_header(&qt, &vt, "rebase -u");
    assert_eq!(guest(&vt, "qcow2"), guest(&qt, "qcow2"), "guest content");
}

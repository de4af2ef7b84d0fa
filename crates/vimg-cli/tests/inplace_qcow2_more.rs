//! qcow2 in place, the forms the sixth stop added (issue 15, iotests 314 and 031), each
//! against qemu-img doing the same on a copy: `rebase -c` (the copied clusters written
//! compressed, byte-packed as QEMU packs them) and header rewrites that keep unknown header
//! extensions; a SIGKILL at every write point of each leaves an image qemu-img checks
//! clean (leaks repairable) that reads as before.

mod common;

use std::path::{Path, PathBuf};

use common::kill::*;
use common::*;

fn io(dir: &Path, img: &str, cmds: &[&str]) {
    qemu_io("qcow2", &dir.join(img), cmds);
}

/// base (compressible patterns, a compressed run, a partial cluster), mid over
/// base, top over mid with its own data; `size` the virtual size of all three.
fn chain(dir: &Path, size: &str) -> PathBuf {
    qemu_create(&dir.join("base.qcow2"), "qcow2", "", size);
    io(
        dir,
        "base.qcow2",
        &[
            "write -P 0xaa 0 256k",
            "write -c -P 0x11 512k 128k",
            "write -P 0x22 900k 3k",
        ],
    );
    qcow2_overlay(&dir.join("mid.qcow2"), "base.qcow2", "", Some(size));
    io(dir, "mid.qcow2", &["write -P 0xbb 1M 192k"]);
    qcow2_overlay(&dir.join("top.qcow2"), "mid.qcow2", "", Some(size));
    io(
        dir,
        "top.qcow2",
        &["write -P 0xcc 64k 64k", "write -c -P 0xdd 1536k 64k"],
    );
    dir.join("top.qcow2")
}

/// Writes pseudo-random (incompressible) data into `img` at `off` through qemu-io.
fn random_into(dir: &Path, img: &str, off: u64, len: usize) {
    let raw = dir.join("rnd.raw");
    std::fs::write(&raw, pattern(len, off)).unwrap();
    qemu_io(
        "qcow2",
        &dir.join(img),
        &[&format!("write -s {} {off} {len}", s(&raw))],
    );
    let _ = std::fs::remove_file(&raw);
}

/// `qemu-img check`'s output with the path filtered.
fn check_text(img: &Path) -> String {
    let (code, text) = qemu_check_output(img, "qcow2");
    assert_eq!(code, 0, "qemu-img check of {}:\n{text}", img.display());
    text
}

/// qemu-img's map, per 64 KiB cluster: (depth, present, data, compressed, host cluster).
/// The `zero` flag of data clusters is left out: it reports holes of the host file, which
/// the file system (unwritten extents) reports differently from one moment to the next.
fn map(img: &Path) -> Vec<(u64, bool, bool, bool, Option<u64>)> {
    let cs = 65536u64;
    let m = json(&qemu_img(&["map", "--output=json", "-f", "qcow2", s(img)]));
    let mut out = Vec::new();
    let mut last = None;
    for e in m.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let mut at = start;
        while at < start + len {
            if last == Some(at / cs) {
                at = (at / cs + 1) * cs;
                continue;
            }
            last = Some(at / cs);
            let off = e["offset"].as_u64().map(|o| (o + (at - start)) / cs);
            out.push((
                e["depth"].as_u64().unwrap(),
                e["present"].as_bool().unwrap(),
                e["data"].as_bool().unwrap(),
                e["compressed"].as_bool().unwrap(),
                off,
            ));
            at = (at / cs + 1) * cs;
        }
    }
    out
}

fn run_in(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(vimg_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// vimg and qemu-img run the same `rebase` command line on copies of the same chain:
/// same guest content, same check statistics (compressed share, image end), same map
/// (host offsets included).
fn rebase_like_qemu(size: &str, args: &[&str], random: bool) {
    if !qemu_available(&test_name()) {
        return;
    }
    let tv = tempfile::tempdir().unwrap();
    let tq = tempfile::tempdir().unwrap();
    let (v, q) = (tv.path(), tq.path());
    let top_v = chain(v, size);
    let top_q = chain(q, size);
    if random {
        random_into(v, "base.qcow2", 1792 << 10, 128 << 10);
        random_into(q, "base.qcow2", 1792 << 10, 128 << 10);
    }
    let before = guest(&top_v, "qcow2");
    let mut a: Vec<&str> = args.to_vec();
    a.push("top.qcow2");
    let out = run_in(v, &a);
    assert!(
        out.status.success(),
        "vimg {a:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    qemu_in(q, &a);
    assert_eq!(
        guest(&top_v, "qcow2"),
        before,
        "vimg changed the guest content"
    );
    assert_eq!(guest(&top_q, "qcow2"), before);
    if random {
        // QEMU compresses the clusters of one request in parallel and writes the ones
        // that do not shrink as they finish: their order in the file is its threads'.
        // vimg writes them in guest order; the same clusters, the same space.
        let stats = |t: String| -> Vec<String> {
            t.lines()
                .map(|l| {
                    l.split(", ")
                        .filter(|p| !p.ends_with("fragmented"))
                        .collect()
                })
                .collect()
        };
        assert_eq!(stats(check_text(&top_v)), stats(check_text(&top_q)));
        let strip = |m: Vec<(u64, bool, bool, bool, Option<u64>)>| -> Vec<_> {
            m.into_iter()
                .map(|e| (e.0, e.1, e.2, e.3, e.4.is_some()))
                .collect()
        };
        assert_eq!(strip(map(&top_v)), strip(map(&top_q)), "map");
        return;
    }
    assert_eq!(check_text(&top_v), check_text(&top_q), "check statistics");
    assert_eq!(map(&top_v), map(&top_q), "map");
    let iv = json(&qemu_img(&["info", "--output=json", s(&top_v)]));
    let iq = json(&qemu_img(&["info", "--output=json", s(&top_q)]));
    assert_eq!(iv["backing-filename"], iq["backing-filename"]);
}

#[test]
fn rebase_c_flattening_like_qemu() {
    rebase_like_qemu("2M", &["rebase", "-c", "-b", ""], false);
}

#[test]
fn rebase_c_with_incompressible_clusters_like_qemu() {
    rebase_like_qemu("2M", &["rebase", "-c", "-b", ""], true);
}

#[test]
fn rebase_c_removing_a_chain_member_like_qemu() {
    rebase_like_qemu(
        "2M",
        &["rebase", "-c", "-b", "base.qcow2", "-F", "qcow2"],
        false,
    );
}

#[test]
fn rebase_c_unaligned_size_like_qemu() {
    // The last cluster is partial: compressed zero-padded.
    rebase_like_qemu("1999k", &["rebase", "-c", "-b", ""], false);
}

#[test]
fn rebase_c_refusals_before_writing() {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let top = chain(t.path(), "2M");
    qemu_in(t.path(), &["snapshot", "-c", "s1", "top.qcow2"]);
    let before = std::fs::read(&top).unwrap();
    let out = run_in(t.path(), &["rebase", "-c", "-b", "", "top.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("internal snapshots"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&top).unwrap(), before, "nothing written");
    // raw: qemu-img's words.
    let raw = t.path().join("r.raw");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    let out = run_in(t.path(), &["rebase", "-c", "-f", "raw", "-b", "", "r.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("Compression not supported for this file format"));
}

#[test]
fn rebase_c_killed_at_every_point() {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let pristine = t.path().join("pristine");
    std::fs::create_dir(&pristine).unwrap();
    chain(&pristine, "2M");
    let old = guest(&pristine.join("top.qcow2"), "qcow2");
    let work = t.path().join("work");
    let mut kills = 0;
    for n in 0.. {
        assert!(n < 10_000, "no end in sight");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir(&work).unwrap();
        for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
            std::fs::copy(pristine.join(f), work.join(f)).unwrap();
        }
        let top = work.join("top.qcow2");
        let killed = run_killed_in(
            Some(&work),
            &[
                "rebase",
                "-c",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
            n,
        );
        let what = format!("rebase -c killed before point {n}");
        check_then_repair(&top, "qcow2", &what);
        assert_eq!(guest(&top, "qcow2"), old, "{what}: guest content changed");
        if !killed {
            break;
        }
        kills += 1;
    }
    assert!(kills > 5, "only {kills} kill points");
}

// ---- header rewrites with an unknown header extension (iotest 031) ----

/// A qemu-img-made image with an unknown header extension added after QEMU's own ones
/// (before the end marker), as iotest 031 adds one with qcow2.py.
fn with_unknown_ext(dir: &Path, compat: &str) -> PathBuf {
    let img = dir.join("u.qcow2");
    qemu_create(&img, "qcow2", &format!("compat={compat}"), "64M");
    let bytes = std::fs::read(&img).unwrap();
    let be32 = |o: usize| u32::from_be_bytes(bytes[o..o + 4].try_into().unwrap());
    let version = be32(4);
    let mut off = if version >= 3 { be32(100) as usize } else { 72 };
    // Walk to the end marker.
    loop {
        let magic = be32(off);
        let len = be32(off + 4) as usize;
        if magic == 0 {
            break;
        }
        off += 8 + len.div_ceil(8) * 8;
    }
    let data = b"This is a test header extension";
    let mut ext = Vec::new();
    ext.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    ext.extend_from_slice(&(data.len() as u32).to_be_bytes());
    ext.extend_from_slice(data);
    ext.resize(8 + data.len().div_ceil(8) * 8, 0);
    ext.extend_from_slice(&[0u8; 8]);
    patch(&img, off as u64, &ext);
    img
}

fn header_area(img: &Path) -> Vec<u8> {
    let mut b = std::fs::read(img).unwrap();
    b.truncate(4096);
    b
}

fn rebase_u_like_qemu(compat: &str, args: &[&str]) {
    if !qemu_available(&test_name()) {
        return;
    }
    let (tv, tq) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let v = with_unknown_ext(tv.path(), compat);
    let q = with_unknown_ext(tq.path(), compat);
    for d in [tv.path(), tq.path()] {
        qemu_create(&d.join("b.raw"), "raw", "", "64M");
    }
    let mut a: Vec<&str> = args.to_vec();
    a.push("u.qcow2");
    let out = run_in(tv.path(), &a);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    qemu_in(tq.path(), &a);
    assert_eq!(
        header_area(&v),
        header_area(&q),
        "{compat} {args:?}: header cluster"
    );
    if !args.contains(&"host_device") {
        check_text(&v);
    }
}

#[test]
fn rebase_u_keeps_unknown_extension_like_qemu() {
    for compat in ["0.10", "1.1"] {
        rebase_u_like_qemu(compat, &["rebase", "-u", "-b", ""]);
        rebase_u_like_qemu(
            compat,
            &[
                "rebase",
                "-u",
                "-b",
                "/some/backing/file/path",
                "-F",
                "host_device",
            ],
        );
        rebase_u_like_qemu(compat, &["rebase", "-u", "-b", "b.raw", "-F", "raw"]);
    }
}

#[test]
fn amend_keeps_unknown_extension_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let (tv, tq) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let v = with_unknown_ext(tv.path(), "1.1");
    let q = with_unknown_ext(tq.path(), "1.1");
    vimg(&["amend", "-o", "lazy_refcounts=on", s(&v)]);
    qemu_img(&["amend", "-o", "lazy_refcounts=on", s(&q)]);
    assert_eq!(header_area(&v), header_area(&q));
    check_text(&v);
}

#[test]
fn header_too_big_for_the_cluster_is_refused_before_writing() {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("s.qcow2");
    qemu_create(&img, "qcow2", "cluster_size=512,compat=0.10", "1M");
    // An unknown extension that fills the 512-byte header cluster to 8 bytes from its end.
    let mut ext = Vec::new();
    let len = 512 - 72 - 8 - 8 - 8;
    ext.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    ext.extend_from_slice(&(len as u32).to_be_bytes());
    ext.extend(std::iter::repeat_n(b'x', len));
    ext.extend_from_slice(&[0u8; 8]);
    patch(&img, 72, &ext);
    check_text(&img);
    let before = std::fs::read(&img).unwrap();
    let out = vimg_raw(&["rebase", "-u", "-b", "base.raw", "-F", "raw", s(&img)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), before);
    let q = run_cmd(
        "qemu-img",
        &["rebase", "-u", "-b", "base.raw", "-F", "raw", s(&img)],
    );
    assert_eq!(q.status.code(), Some(1), "qemu-img refuses it too");
}

#[test]
fn unknown_extension_rewrite_killed_at_every_point() {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let pristine = with_unknown_ext(t.path(), "1.1");
    let old = header_area(&pristine);
    qemu_create(&t.path().join("b.raw"), "raw", "", "64M");
    let mut kills = 0;
    for n in 0.. {
        assert!(n < 100, "no end in sight");
        let img = t.path().join("w.qcow2");
        std::fs::copy(&pristine, &img).unwrap();
        let killed = run_killed(&["rebase", "-u", "-b", "b.raw", "-F", "raw", s(&img)], n);
        check_text(&img);
        let h = header_area(&img);
        let info = json(&qemu_img(&["info", "--output=json", s(&img)]));
        if killed {
            kills += 1;
            assert!(
                h == old || info["backing-filename"] == "b.raw",
                "killed before point {n}: neither old nor new header"
            );
        } else {
            assert_eq!(info["backing-filename"], "b.raw");
            break;
        }
    }
    assert!(kills >= 1);
}

// ---- resize over a longer backing file from an unaligned size (iotest 292) ----

/// base 1M of 0x11, top over it with 0x22 everywhere, shrunk by qemu-img to 520k (inside
/// a cluster): the state iotest 292 grows from.
fn shrunk_top(dir: &Path) -> PathBuf {
    qemu_create(&dir.join("base.qcow2"), "qcow2", "", "1M");
    io(dir, "base.qcow2", &["write -P 0x11 0 1M"]);
    qcow2_overlay(&dir.join("top.qcow2"), "base.qcow2", "", None);
    io(dir, "top.qcow2", &["write -P 0x22 0 1M"]);
    qemu_in(dir, &["resize", "-q", "--shrink", "top.qcow2", "520k"]);
    dir.join("top.qcow2")
}

#[test]
fn resize_from_inside_a_cluster_over_longer_backing_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let (tv, tq) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let v = shrunk_top(tv.path());
    let q = shrunk_top(tq.path());
    vimg(&["resize", s(&v), "567k"]);
    qemu_img(&["resize", s(&q), "567k"]);
    assert_eq!(guest(&v, "qcow2"), guest(&q, "qcow2"));
    // Clean; the image end differs: vimg's size switch writes new tables past the end of
    // the file (update/shadow.rs), qemu-img changes its tables in place.
    check_text(&v);
    // The old last cluster is zeroed where it is: the same host offsets as qemu-img's.
    assert_eq!(map(&v), map(&q));
    let plain = |p: &Path| qemu_img(&["map", "-f", "qcow2", s(p)]).replace(s(p), "IMG");
    assert_eq!(plain(&v), plain(&q));
}

#[test]
fn resize_from_inside_a_cluster_killed_at_every_point() {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let pristine = t.path().join("pristine");
    std::fs::create_dir(&pristine).unwrap();
    shrunk_top(&pristine);
    let old = guest(&pristine.join("top.qcow2"), "qcow2");
    let mut new = old.clone();
    new.resize(567 << 10, 0);
    let work = t.path().join("work");
    let mut kills = 0;
    for n in 0.. {
        assert!(n < 10_000, "no end in sight");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir(&work).unwrap();
        for f in ["base.qcow2", "top.qcow2"] {
            std::fs::copy(pristine.join(f), work.join(f)).unwrap();
        }
        let top = work.join("top.qcow2");
        let killed = run_killed(&["resize", s(&top), "567k"], n);
        let what = format!("resize killed before point {n}");
        check_then_repair(&top, "qcow2", &what);
        let got = guest(&top, "qcow2");
        assert!(
            got == old || got == new,
            "{what}: neither the old nor the new image"
        );
        if !killed {
            assert_eq!(got, new);
            break;
        }
        kills += 1;
    }
    assert!(kills > 3, "only {kills} kill points");
}

// ---- commit empties the top image completely, as qemu-img's qcow2 driver does ----

/// base (4M, 1M of data) and top over it with data (and a zero cluster), `compat` given.
fn commit_chain(dir: &Path, compat: &str, size: &str) -> PathBuf {
    let o = format!("compat={compat}");
    qemu_create(&dir.join("base.qcow2"), "qcow2", &o, size);
    io(dir, "base.qcow2", &["write -P 1 0 1M"]);
    qcow2_overlay(&dir.join("top.qcow2"), "base.qcow2", &o, None);
    io(dir, "top.qcow2", &["write -P 2 512k 2M", "write -z 3M 64k"]);
    dir.join("top.qcow2")
}

fn commit_like_qemu(compat: &str, size: &str, identical: bool) {
    if !qemu_available(&test_name()) {
        return;
    }
    let (tv, tq) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let v = commit_chain(tv.path(), compat, size);
    let q = commit_chain(tq.path(), compat, size);
    // The guest content is compared where it fits in memory.
    let small = size_of(&tv.path().join("base.qcow2")) < (64 << 20) && size.ends_with('M');
    let before = small.then(|| guest(&v, "qcow2"));
    vimg(&["commit", s(&v)]);
    qemu_img(&["commit", s(&q)]);
    if let Some(before) = before {
        assert_eq!(guest(&v, "qcow2"), before);
        assert_eq!(guest(&tv.path().join("base.qcow2"), "qcow2"), before);
    }
    assert_eq!(check_text(&v), check_text(&q));
    assert_eq!(size_of(&v), size_of(&q), "file size");
    // The top image is the same file as qemu-img's (its map then reads the base, whose
    // layout is the commit's: qemu's commit job writes its chunks in parallel).
    if identical {
        assert_same_file(&v, &q);
    }
}

#[test]
fn commit_empties_a_v3_top_completely_like_qemu() {
    commit_like_qemu("1.1", "4M", true);
}

#[test]
fn commit_empties_a_big_v3_top_completely_like_qemu() {
    // An L1 table of 128 entries (64 GiB virtual).
    commit_like_qemu("1.1", "64G", true);
}

#[test]
fn commit_into_v3_top_with_a_snapshot_keeps_the_fallback() {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let top = commit_chain(t.path(), "1.1", "4M");
    qemu_in(t.path(), &["snapshot", "-c", "s1", "top.qcow2"]);
    let before = guest(&top, "qcow2");
    vimg(&["commit", s(&top)]);
    assert_eq!(guest(&top, "qcow2"), before);
    check_text(&top);
    let snaps = qemu_img(&["snapshot", "-l", s(&top)]);
    assert!(snaps.contains("s1"), "{snaps}");
}

#[test]
fn commit_empty_killed_at_every_point() {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let pristine = t.path().join("pristine");
    std::fs::create_dir(&pristine).unwrap();
    commit_chain(&pristine, "1.1", "4M");
    let old = guest(&pristine.join("top.qcow2"), "qcow2");
    let work = t.path().join("work");
    let mut kills = 0;
    for n in 0.. {
        assert!(n < 10_000, "no end in sight");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir(&work).unwrap();
        for f in ["base.qcow2", "top.qcow2"] {
            std::fs::copy(pristine.join(f), work.join(f)).unwrap();
        }
        let top = work.join("top.qcow2");
        let killed = run_killed(&["commit", s(&top)], n);
        let what = format!("commit killed before point {n}");
        check_then_repair(&work.join("base.qcow2"), "qcow2", &what);
        check_then_repair(&top, "qcow2", &what);
        assert_eq!(
            guest(&top, "qcow2"),
            old,
            "{what}: the top's guest content changed"
        );
        if !killed {
            assert_eq!(size_of(&top), 4 * 65536, "emptied completely");
            break;
        }
        kills += 1;
    }
    assert!(kills > 5, "only {kills} kill points");
}

/// iotest 271's last measure: past the largest L1 table, `measure` and `create` word the
/// refusal differently, each as qemu-img does.
#[test]
fn measure_too_large_in_qemu_words() {
    if !qemu_available(&test_name()) {
        return;
    }
    let args = [
        "measure",
        "-O",
        "qcow2",
        "-o",
        "extended_l2=on",
        "--size",
        "1025T",
    ];
    let v = vimg_raw(&args);
    let q = run_cmd("qemu-img", &args);
    assert_eq!(v.status.code(), q.status.code());
    let tail = |o: &std::process::Output| {
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        e.split_once(": ").map(|x| x.1.to_string()).unwrap_or(e)
    };
    assert_eq!(tail(&v), tail(&q));
    assert_eq!(
        tail(&v).trim(),
        "The image size is too large (try using a larger cluster size)"
    );
    // 1024T fits, as in qemu-img.
    let ok = [
        "measure",
        "-O",
        "qcow2",
        "-o",
        "extended_l2=on",
        "--size",
        "1024T",
    ];
    assert_eq!(vimg(&ok), qemu_img(&ok));
}

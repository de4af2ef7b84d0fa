//! The qcow2 in-place leftovers of issue 15, against qemu-img as the oracle and killed
//! (SIGKILL through the test-only crash hook) at every write, flush and truncation point:
//! `amend -o refcount_bits=N`, `amend -o compat=0.10` of images with zero clusters,
//! `amend -o data_file_raw`, `resize` over a longer backing file, and `check -r all` that
//! rebuilds the refcount structure (iotest 039's dirty image).
//!
//! Each of these is one shadow switch: after any kill `qemu-img check` exits 0 (not even
//! leaks), the guest content and the switched header fields are the old ones or the new.

mod common;

use std::path::{Path, PathBuf};

use common::kill::*;
use common::*;

fn info(img: &Path) -> serde_json::Value {
    json(&qemu_img(&["info", "-f", "qcow2", "--output=json", s(img)]))
}

fn refcount_bits(img: &Path) -> u64 {
    info(img)["format-specific"]["data"]["refcount-bits"]
        .as_u64()
        .expect("refcount-bits")
}

fn compat(img: &Path) -> String {
    info(img)["format-specific"]["data"]["compat"]
        .as_str()
        .expect("compat")
        .to_string()
}

fn sub(args: &[&str], img: &Path) -> Vec<String> {
    args.iter()
        .map(|a| if *a == "{}" { s(img) } else { a }.to_string())
        .collect()
}

/// Runs `args` ({} the image) by qemu-img on one copy and vimg on another; returns both.
fn both(d: &Path, pristine: &Path, args: &[&str]) -> (PathBuf, PathBuf) {
    let q = d.join("qemu.qcow2");
    let v = d.join("vimg.qcow2");
    std::fs::copy(pristine, &q).expect("copy");
    std::fs::copy(pristine, &v).expect("copy");
    let qa = sub(args, &q);
    run_ok(
        "qemu-img",
        &qa.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let va = sub(args, &v);
    vimg(&va.iter().map(String::as_str).collect::<Vec<_>>());
    (q, v)
}

/// Kills vimg at every point of `args` on copies of `pristine`; after each, `qemu-img
/// check` is clean, the guest content is `guest_ok`'s, and `judge` accepts the image.
fn kill_everywhere(
    d: &Path,
    pristine: &Path,
    args: &[&str],
    what: &str,
    judge: &dyn Fn(&Path, &str),
) -> u64 {
    let work = d.join("work.qcow2");
    let mut kills = 0;
    for n in common::kill::points() {
        assert!(n < 5_000, "{what}: no end in sight");
        std::fs::copy(pristine, &work).expect("copy");
        let a = sub(args, &work);
        let killed = run_killed(&a.iter().map(String::as_str).collect::<Vec<_>>(), n);
        let w = format!("{what} killed before point {n}");
        assert_eq!(qemu_check(&work, false, &w), Verdict::Clean, "{w}");
        judge(&work, &w);
        if !killed {
            break;
        }
        kills += 1;
    }
    assert!(kills > 3, "{what}: only {kills} kill points");
    kills
}

/// [`kill_everywhere`], where `qemu-img check` may also find leaks, which `vimg check -r
/// leaks` must then repair.
fn kill_everywhere_leaks_ok(
    d: &Path,
    pristine: &Path,
    args: &[&str],
    what: &str,
    judge: &dyn Fn(&Path, &str),
) -> u64 {
    let work = d.join("work.qcow2");
    let mut kills = 0;
    for n in common::kill::points() {
        assert!(n < 5_000, "{what}: no end in sight");
        std::fs::copy(pristine, &work).expect("copy");
        let a = sub(args, &work);
        let killed = run_killed(&a.iter().map(String::as_str).collect::<Vec<_>>(), n);
        let w = format!("{what} killed before point {n}");
        check_then_repair(&work, "qcow2", &w);
        judge(&work, &w);
        if !killed {
            break;
        }
        kills += 1;
    }
    assert!(kills > 3, "{what}: only {kills} kill points");
    kills
}

/// Data, zeros and (with `compressed`) compressed clusters sharing a host cluster (so
/// refcount 2: too much for refcount_bits=1).
fn data_image(d: &Path, opts: &str, compressed: bool) -> PathBuf {
    let img = d.join("pristine.qcow2");
    qemu_create(&img, "qcow2", opts, "8M");
    let c = if compressed {
        "write -c -P 7 2M 128k"
    } else {
        "write -P 7 2M 128k"
    };
    qemu_io(
        "qcow2",
        &img,
        &["write -P 1 0 1M", c, "write -z 4M 64k", "write -P 3 6M 64k"],
    );
    img
}

#[test]
fn refcount_bits_like_qemu_and_killed() {
    if !qemu_available("refcount_bits_like_qemu_and_killed") {
        return;
    }
    for (opts, bits, snap) in [
        ("cluster_size=65536", "1", false),
        ("cluster_size=512", "8", true),
        ("refcount_bits=1", "64", false),
        ("cluster_size=4096,refcount_bits=64", "16", true),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let pristine = data_image(d, opts, bits != "1");
        if snap {
            qemu_img(&["snapshot", "-c", "s1", s(&pristine)]);
            qemu_io("qcow2", &pristine, &["write -P 9 512k 64k"]);
        }
        let old_bits = refcount_bits(&pristine);
        let want: u64 = bits.parse().expect("bits");
        let opt = format!("refcount_bits={bits}");
        let args = ["amend", "-f", "qcow2", "-o", opt.as_str(), "{}"];
        let (q, v) = both(d, &pristine, &args);
        assert_eq!(refcount_bits(&q), want);
        assert_eq!(refcount_bits(&v), want, "{opts} -> {bits}");
        assert_eq!(qemu_check(&v, false, "vimg's"), Verdict::Clean);
        qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", s(&q), s(&v)]);
        let g = guest(&pristine, "qcow2");
        let what = format!("{opts}: amend -o {opt}");
        kill_everywhere(d, &pristine, &args, &what, &|img, w| {
            let b = refcount_bits(img);
            assert!(b == old_bits || b == want, "{w}: refcount bits {b}");
            assert!(guest(img, "qcow2") == g, "{w}: guest content changed");
        });
    }
}

/// qemu-img's refusals, word for word, and nothing written.
#[test]
fn refcount_bits_refusals_like_qemu() {
    if !qemu_available("refcount_bits_refusals_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pristine = data_image(d, "cluster_size=65536", true);
    for opt in [
        "refcount_bits=3",
        "refcount_bits=0",
        "refcount_bits=128",
        "refcount_bits=-1",
        "refcount_bits=abc",
        "refcount_bits=16k",
        "compat=0.10,refcount_bits=8",
        "refcount_bits=1",
        "data_file_raw=on",
    ] {
        // refcount_bits=1: the compressed clusters share a host cluster (refcount 2).
        let q = d.join("q.qcow2");
        let v = d.join("v.qcow2");
        std::fs::copy(&pristine, &q).expect("copy");
        std::fs::copy(&pristine, &v).expect("copy");
        let qo = run_cmd("qemu-img", &["amend", "-f", "qcow2", "-o", opt, s(&q)]);
        let vo = vimg_raw(&["amend", "-f", "qcow2", "-o", opt, s(&v)]);
        assert_eq!(qo.status.code(), Some(1), "{opt}: qemu-img");
        assert_eq!(vo.status.code(), Some(1), "{opt}: vimg");
        let msg = |o: &std::process::Output, p: &str| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .strip_prefix(p)
                .map(str::to_string)
                .unwrap_or_else(|| panic!("{opt}: {:?}", String::from_utf8_lossy(&o.stderr)))
        };
        assert_eq!(msg(&vo, "vimg: "), msg(&qo, "qemu-img: "), "{opt}");
        assert_same_file(&v, &pristine);
    }
    // Changing the width and downgrading in one amend: the width first, as qemu-img does.
    let img = d.join("narrow.qcow2");
    qemu_create(&img, "qcow2", "refcount_bits=1", "4M");
    qemu_io("qcow2", &img, &["write -P 5 0 512k"]);
    let out = vimg_raw(&["amend", "-f", "qcow2", "-o", "compat=0.10", s(&img)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("compat=0.10 requires refcount_bits=16"));
    let (q, v) = both(
        d,
        &img,
        &["amend", "-o", "compat=0.10,refcount_bits=16", "{}"],
    );
    assert_eq!(compat(&v), "0.10");
    assert_eq!(compat(&q), "0.10");
    assert_eq!(qemu_check(&v, false, "downgraded"), Verdict::Clean);
    qemu_img(&["compare", s(&q), s(&v)]);
}

/// Zero clusters expanded by the downgrade: without a backing file (allocated zeros become
/// data of zeros, unallocated ones stay unallocated) and with one (unallocated zeros
/// become allocated zeros, so the backing file does not show through).
#[test]
fn downgrade_expands_zero_clusters_like_qemu_and_killed() {
    if !qemu_available("downgrade_expands_zero_clusters_like_qemu_and_killed") {
        return;
    }
    for with_backing in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let pristine = d.join("pristine.qcow2");
        if with_backing {
            let b = d.join("backing.qcow2");
            qemu_create(&b, "qcow2", "", "4M");
            qemu_io("qcow2", &b, &["write -P 7 0 4M"]);
            qcow2_overlay(&pristine, s(&b), "", Some("4M"));
        } else {
            qemu_create(&pristine, "qcow2", "", "4M");
        }
        qemu_io(
            "qcow2",
            &pristine,
            &[
                "write -P 1 64k 64k",
                "write -z 0 64k",
                "write -z -u 1M 128k",
                "write -P 2 2M 64k",
                "write -z 2M 64k",
                "write -c -P 3 3M 64k",
            ],
        );
        let args = ["amend", "-o", "compat=0.10", "{}"];
        let (q, v) = both(d, &pristine, &args);
        assert_eq!(compat(&v), "0.10");
        assert_eq!(qemu_check(&v, false, "vimg's"), Verdict::Clean);
        qemu_img(&["compare", s(&q), s(&v)]);
        let g = guest(&pristine, "qcow2");
        assert!(guest(&v, "qcow2") == g);
        // The same allocation as qemu-img's: what is data and what reads from below.
        let map = |img: &Path| -> Vec<(u64, u64, bool, u64)> {
            json(&qemu_img(&["map", "--output=json", s(img)]))
                .as_array()
                .expect("map")
                .iter()
                .map(|e| {
                    (
                        e["start"].as_u64().expect("start"),
                        e["length"].as_u64().expect("length"),
                        e["data"].as_bool().expect("data"),
                        e["depth"].as_u64().expect("depth"),
                    )
                })
                .collect()
        };
        assert_eq!(map(&v), map(&q), "backing {with_backing}");
        let what = format!("downgrade with zero clusters (backing {with_backing})");
        // Without snapshots the zero clusters are expanded in place, as QEMU does it
        // (inplace_placement.rs): a kill between a fresh cluster's allocation and its L2
        // entry leaks it, which `check -r leaks` repairs.
        kill_everywhere_leaks_ok(d, &pristine, &args, &what, &|img, w| {
            let c = compat(img);
            assert!(c == "1.1" || c == "0.10", "{w}: compat {c}");
            assert!(guest(img, "qcow2") == g, "{w}: guest content changed");
        });
    }
}

#[test]
fn data_file_raw_like_qemu() {
    if !qemu_available("data_file_raw_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = d.join("img.qcow2");
    let data = d.join("img.raw");
    let opts = format!("data_file={},data_file_raw=on", s(&data));
    qemu_create(&img, "qcow2", &opts, "4M");
    qemu_io("qcow2", &img, &["write -P 4 0 1M"]);
    let q = d.join("q.qcow2");
    std::fs::copy(&img, &q).expect("copy");
    // On where it is on already: nothing changes.
    vimg(&["amend", "-o", "data_file_raw=on", s(&img)]);
    assert_same_file(&img, &q);
    qemu_img(&["amend", "-o", "data_file_raw=off", s(&q)]);
    vimg(&["amend", "-o", "data_file_raw=off", s(&img)]);
    assert_same_file(&img, &q);
    assert_eq!(qemu_check(&img, false, "raw off"), Verdict::Clean);
    assert_vimg_fails_with(
        &["amend", "-o", "data_file_raw=on", s(&img)],
        1,
        "vimg: data-file-raw cannot be set on existing images",
    );
    assert_same_file(&img, &q);
}

/// Growing over a longer backing file: the new area reads as zeros, never as the backing
/// file's data, at no moment.
#[test]
fn resize_over_longer_backing_like_qemu_and_killed() {
    if !qemu_available("resize_over_longer_backing_like_qemu_and_killed") {
        return;
    }
    for (cluster, size, to) in [
        ("65536", "1M", "8M"),
        ("512", "64k", "3M"),
        ("65536", "1M", "2G"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let b = d.join("backing.qcow2");
        qemu_create(&b, "qcow2", "", "4M");
        qemu_io("qcow2", &b, &["write -P 7 0 4M"]);
        let pristine = d.join("pristine.qcow2");
        let o = format!("cluster_size={cluster}");
        qcow2_overlay(&pristine, s(&b), &o, Some(size));
        qemu_io("qcow2", &pristine, &["write -P 3 0 16k"]);
        let args = ["resize", "{}", to];
        let (q, v) = both(d, &pristine, &args);
        assert_eq!(qemu_check(&v, false, "vimg's"), Verdict::Clean);
        qemu_img(&["compare", s(&q), s(&v)]);
        let old = guest(&pristine, "qcow2");
        let new = guest(&q, "qcow2");
        if to == "2G" {
            continue; // the kill loop reads the whole guest each time: the small cases do
        }
        let what = format!("resize {size} -> {to} over 4M backing (cluster {cluster})");
        // Without snapshots the new area is zero-flagged in place, as QEMU does it
        // (inplace_placement.rs): a kill between a new L2 table's allocation and its L1
        // entry leaks that table, which `check -r leaks` repairs. Hundreds of points with
        // 512-byte clusters: the first 30, then every 25th.
        let work = d.join("work.qcow2");
        let mut kills = 0;
        for n in (0..30).chain((30..5_000).step_by(25)) {
            std::fs::copy(&pristine, &work).expect("copy");
            let a = sub(&args, &work);
            let killed = run_killed(&a.iter().map(String::as_str).collect::<Vec<_>>(), n);
            let w = format!("{what} killed before point {n}");
            check_then_repair(&work, "qcow2", &w);
            let g = guest(&work, "qcow2");
            assert!(
                g == old || g == new,
                "{w}: neither the old guest nor the new"
            );
            if !killed {
                break;
            }
            kills += 1;
        }
        assert!(kills > 3, "{what}: only {kills} kill points");
    }
    // Version 2 has no zero clusters: qemu-img's refusal, nothing changed.
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let b = d.join("backing.qcow2");
    qemu_create(&b, "qcow2", "", "4M");
    let img = d.join("v2.qcow2");
    qcow2_overlay(&img, s(&b), "compat=0.10", Some("1M"));
    let copy = d.join("copy.qcow2");
    std::fs::copy(&img, &copy).expect("copy");
    assert_vimg_fails_with(
        &["resize", s(&img), "8M"],
        1,
        "vimg: Failed to zero out new clusters: Operation not supported",
    );
    assert_same_file(&img, &copy);
}

/// iotest 039: a lazy-refcounts image left dirty by a killed writer has a used cluster
/// with refcount 0; `check -r all` rebuilds the refcount structure and prints what
/// qemu-img prints.
#[test]
fn check_repair_rebuild_like_qemu_and_killed() {
    if !qemu_available("check_repair_rebuild_like_qemu_and_killed") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pristine = d.join("pristine.qcow2");
    qemu_create(&pristine, "qcow2", "lazy_refcounts=on", "64M");
    // qemu-io killed right after a write: the dirty bit stays, the refcount is not written.
    let _ = run_cmd(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 512",
            "-c",
            "sigraise 9",
            s(&pristine),
        ],
    );
    assert_eq!(
        run_cmd("qemu-img", &["check", s(&pristine)]).status.code(),
        Some(2)
    );
    let q = d.join("q.qcow2");
    let v = d.join("v.qcow2");
    std::fs::copy(&pristine, &q).expect("copy");
    std::fs::copy(&pristine, &v).expect("copy");
    let qo = run_cmd("qemu-img", &["check", "-r", "all", s(&q)]);
    let vo = vimg_raw(&["check", "-r", "all", s(&v)]);
    assert_eq!(vo.status.code(), qo.status.code());
    assert_eq!(
        String::from_utf8_lossy(&vo.stderr),
        String::from_utf8_lossy(&qo.stderr)
    );
    // The new refcount structure goes where qemu-img puts it (update/rebuild_dirty.rs):
    // the same image end offset, the same file.
    assert_eq!(
        String::from_utf8_lossy(&vo.stdout),
        String::from_utf8_lossy(&qo.stdout)
    );
    assert_same_file(&v, &q);
    assert_eq!(qemu_check(&v, false, "repaired"), Verdict::Clean);
    assert_eq!(info(&v)["dirty-flag"], serde_json::Value::Bool(false));
    qemu_img(&["compare", s(&q), s(&v)]);
    let g = guest(&q, "qcow2");
    let work = d.join("work.qcow2");
    let mut kills = 0;
    for n in 0.. {
        assert!(n < 5_000, "no end in sight");
        std::fs::copy(&pristine, &work).expect("copy");
        let out = std::process::Command::new(vimg_bin())
            .args(["check", "-r", "all", s(&work)])
            .env(HOOK, n.to_string())
            .output()
            .expect("run vimg");
        let killed = std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(9);
        let w = format!("check -r all killed before point {n}");
        // The old dirty image (untouched) or the repaired one.
        let c = run_cmd("qemu-img", &["check", s(&work)]).status.code();
        if c != Some(0) {
            assert!(killed, "{w}: finished, yet qemu-img check exit {c:?}");
            assert_eq!(c, Some(2), "{w}: qemu-img check");
            assert_eq!(
                info(&work)["dirty-flag"],
                serde_json::Value::Bool(true),
                "{w}"
            );
        }
        assert!(guest(&work, "qcow2") == g, "{w}: guest content");
        if !killed {
            assert_eq!(out.status.code(), Some(0), "{w}");
            break;
        }
        kills += 1;
    }
    assert!(kills > 3, "only {kills} kill points");
}

/// Shrinking an image with internal snapshots (qemu-img allows it for version 3): the
/// snapshots keep their content, the tables they share are never written.
#[test]
fn shrink_with_snapshots_like_qemu_and_killed() {
    if !qemu_available("shrink_with_snapshots_like_qemu_and_killed") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pristine = d.join("pristine.qcow2");
    qemu_create(&pristine, "qcow2", "cluster_size=4096", "8M");
    qemu_io(
        "qcow2",
        &pristine,
        &["write -P 1 0 1M", "write -P 2 5M 2M", "write -P 3 7M 64k"],
    );
    qemu_img(&["snapshot", "-c", "s1", s(&pristine)]);
    qemu_io(
        "qcow2",
        &pristine,
        &["write -P 4 5M 64k", "write -P 5 6M 4k"],
    );
    let args = ["resize", "--shrink", "{}", "5250k"];
    let (q, v) = both(d, &pristine, &args);
    assert_eq!(qemu_check(&v, false, "vimg's"), Verdict::Clean);
    qemu_img(&["compare", s(&q), s(&v)]);
    let snap = |img: &Path| {
        let out = d.join("snap.raw");
        let _ = std::fs::remove_file(&out);
        qemu_img(&[
            "convert",
            "-l",
            "snapshot.name=s1",
            "-O",
            "raw",
            s(img),
            s(&out),
        ]);
        std::fs::read(&out).expect("read")
    };
    // convert -l reads the snapshot at the image's current size: compared with
    // qemu-img's result, and (below) with the old or the new.
    let s1 = snap(&pristine);
    let s1_new = snap(&q);
    assert!(
        snap(&v) == s1_new,
        "the snapshot reads otherwise than after qemu-img"
    );
    // Applying the larger snapshot gives its size and content back, as with qemu-img.
    let (qa, va) = {
        let qa = d.join("qa.qcow2");
        std::fs::copy(&q, &qa).expect("copy");
        qemu_img(&["snapshot", "-a", "s1", s(&qa)]);
        vimg(&["snapshot", "-a", "s1", s(&v)]);
        (qa, v.clone())
    };
    assert_eq!(qemu_check(&va, false, "applied"), Verdict::Clean);
    qemu_img(&["compare", s(&qa), s(&va)]);
    let old = guest(&pristine, "qcow2");
    let new = guest(&q, "qcow2");
    kill_everywhere(d, &pristine, &args, "shrink with a snapshot", &|img, w| {
        let g = guest(img, "qcow2");
        assert!(
            g == old || g == new,
            "{w}: neither the old guest nor the new"
        );
        let sn = snap(img);
        assert!(sn == s1 || sn == s1_new, "{w}: the snapshot changed");
    });
}

/// `amend -o size=` (with an upgrade first, or a downgrade after), and amend of a dirty
/// image, which qemu-img repairs first, printing the repair.
#[test]
fn amend_size_and_dirty_like_qemu() {
    if !qemu_available("amend_size_and_dirty_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let v2 = d.join("v2.qcow2");
    qemu_create(&v2, "qcow2", "compat=0.10", "64M");
    qemu_io("qcow2", &v2, &["write -P 0x2a 42M 64k"]);
    let (q, v) = both(
        d,
        &v2,
        &[
            "amend",
            "-o",
            "compat=1.1,lazy_refcounts=on,size=128M",
            "{}",
        ],
    );
    assert_eq!(info(&v)["virtual-size"], info(&q)["virtual-size"]);
    assert_eq!(compat(&v), "1.1");
    assert_eq!(qemu_check(&v, false, "upgraded"), Verdict::Clean);
    qemu_img(&["compare", s(&q), s(&v)]);
    let v3 = d.join("v3.qcow2");
    std::fs::copy(&v, &v3).expect("copy");
    let (q, v) = both(d, &v3, &["amend", "-o", "compat=0.10,size=48M", "{}"]);
    assert_eq!(info(&v)["virtual-size"], info(&q)["virtual-size"]);
    assert_eq!(compat(&v), "0.10");
    qemu_img(&["compare", s(&q), s(&v)]);
    // Dirty: a killed writer with lazy refcounts.
    let dirty = d.join("dirty.qcow2");
    qemu_create(&dirty, "qcow2", "lazy_refcounts=on", "64M");
    let _ = run_cmd(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 512",
            "-c",
            "sigraise 9",
            s(&dirty),
        ],
    );
    let qd = d.join("qd.qcow2");
    let vd = d.join("vd.qcow2");
    std::fs::copy(&dirty, &qd).expect("copy");
    std::fs::copy(&dirty, &vd).expect("copy");
    let qo = run_cmd("qemu-img", &["amend", "-o", "lazy_refcounts=off", s(&qd)]);
    let vo = vimg_raw(&["amend", "-o", "lazy_refcounts=off", s(&vd)]);
    assert_eq!(vo.status.code(), qo.status.code());
    assert_eq!(
        String::from_utf8_lossy(&vo.stderr),
        String::from_utf8_lossy(&qo.stderr)
    );
    assert_eq!(qemu_check(&vd, false, "amended dirty"), Verdict::Clean);
    assert_eq!(info(&vd)["dirty-flag"], serde_json::Value::Bool(false));
    assert_eq!(
        info(&vd)["format-specific"]["data"]["lazy-refcounts"],
        serde_json::Value::Bool(false)
    );
    qemu_img(&["compare", s(&qd), s(&vd)]);
}

/// Guest writes into an image with persistent bitmaps (`commit` into a base that has
/// them): the enabled bitmaps get the written ranges as with qemu-img commit (compared
/// through `qemu-img convert --bitmaps` of both results, byte for byte); killed anywhere,
/// a bitmap not marked in use is the old one with the old base, or the new one.
#[test]
fn writes_set_bitmap_bits_like_qemu_and_killed() {
    if !qemu_available("writes_set_bitmap_bits_like_qemu_and_killed") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_create(&base, "qcow2", "", "8M");
    qemu_io("qcow2", &base, &["write -P 1 0 1M"]);
    qemu_img(&["bitmap", "--add", s(&base), "b1"]);
    qemu_img(&["bitmap", "--add", "-g", "512k", s(&base), "b2"]);
    qemu_img(&["bitmap", "--add", s(&base), "b3"]);
    qemu_img(&["bitmap", "--disable", s(&base), "b3"]);
    let make = |tag: &str| -> (PathBuf, PathBuf) {
        let b = d.join(format!("base-{tag}.qcow2"));
        let t = d.join(format!("top-{tag}.qcow2"));
        std::fs::copy(&base, &b).expect("copy");
        qcow2_overlay(&t, s(&b), "", None);
        qemu_io(
            "qcow2",
            &t,
            &["write -P 2 100k 3k", "write -P 3 3M 1M", "write -z 6M 64k"],
        );
        (b, t)
    };
    let exported = |b: &Path, name: &str| -> Vec<u8> {
        let out = d.join(name);
        let _ = std::fs::remove_file(&out);
        qemu_img(&["convert", "--bitmaps", "-O", "qcow2", s(b), s(&out)]);
        std::fs::read(&out).expect("read")
    };
    let (qb, qt) = make("q");
    qemu_img(&["commit", "-q", s(&qt)]);
    let (vb, vt) = make("v");
    vimg(&["commit", s(&vt)]);
    assert_eq!(qemu_check(&vb, false, "vimg's base"), Verdict::Clean);
    qemu_img(&["compare", s(&qb), s(&vb)]);
    let want = exported(&qb, "q.export");
    assert!(
        exported(&vb, "v.export") == want,
        "bitmaps differ from qemu-img's"
    );
    let orig = exported(&base, "o.export");
    assert!(orig != want, "the commit set no bit");
    let old_guest = guest(&base, "qcow2");
    let (pb, pt) = make("p");
    let work_b = d.join("base-w.qcow2");
    let mut kills = 0;
    for n in 0.. {
        assert!(n < 5_000, "no end in sight");
        std::fs::copy(&pb, &work_b).expect("copy");
        let work_t = d.join("top-w.qcow2");
        std::fs::copy(&pt, &work_t).expect("copy");
        qemu_img(&["rebase", "-u", "-b", s(&work_b), "-F", "qcow2", s(&work_t)]);
        let killed = run_killed(&["commit", s(&work_t)], n);
        let w = format!("commit into a base with bitmaps killed before point {n}");
        check_then_repair(&work_b, "qcow2", &w);
        let v = info(&work_b);
        let in_use = v["format-specific"]["data"]["bitmaps"]
            .as_array()
            .expect("bitmaps")
            .iter()
            .any(|b| {
                b["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x == "in-use"))
            });
        if !in_use {
            let e = exported(&work_b, "w.export");
            let g = guest(&work_b, "qcow2");
            assert!(
                (e == orig && g == old_guest) || e == want,
                "{w}: bitmaps not in use, yet neither old nor new"
            );
        }
        if !killed {
            assert!(!in_use, "{w}: finished with bitmaps in use");
            break;
        }
        kills += 1;
    }
    assert!(kills > 3, "only {kills} kill points");
}

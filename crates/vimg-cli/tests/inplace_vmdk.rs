//! Guest writes into existing VMDK images (issue 15), qemu-img 10.0.2 as the oracle:
//! `convert -n` into every subformat qemu-img writes into (monolithicSparse with and
//! without zeroed grains, twoGbMaxExtentSparse, monolithicFlat, twoGbMaxExtentFlat,
//! streamOptimized as qemu-img creates it), each done by qemu-img and by vimg on copies of
//! one target: the two read the same (`qemu-img compare`) and map the same, `qemu-img
//! check` finds vimg's clean, the CID changed and the parentCID did not. `commit` of a
//! qcow2 top into a vmdk base, likewise. What qemu-img gets wrong or cannot do is refused
//! before anything is written (the files unchanged): safe `rebase` of a vmdk top (qemu-img
//! copies, then fails "Operation not supported"), a stream-optimized image with a grain
//! (qemu-img fails half-way), one with its directory at the end (qemu-img loses the
//! writes), a descriptor whose CID line qemu-img's rewrite would mangle, RDONLY extents.
//! A run killed (SIGKILL) before any of its writes and flushes leaves every grain old or
//! new and an image `qemu-img check` accepts, also where a new grain table is appended.

mod common;

use std::path::{Path, PathBuf};

use common::kill::{assert_old_or_new, guest, run_killed};
use common::*;

const MIB: u64 = 1 << 20;
const GRAIN: usize = 64 << 10;

/// (subformat, zeroed_grain, old data written into the target).
const TARGETS: &[(&str, &str, bool)] = &[
    ("monolithicSparse", "off", true),
    ("monolithicSparse", "on", true),
    ("twoGbMaxExtentSparse", "off", true),
    ("twoGbMaxExtentSparse", "on", true),
    ("monolithicFlat", "off", true),
    ("twoGbMaxExtentFlat", "off", true),
    ("streamOptimized", "off", false),
    ("streamOptimized", "on", false),
];

/// A 6 MiB raw source: data over a grain boundary, a hole, zeros written over old data,
/// a partial grain, data in the last grain.
fn source(dir: &Path) -> PathBuf {
    let src = dir.join("src.raw");
    let a = pattern(MIB as usize + 4096, 3);
    let b = pattern(200 << 10, 4);
    write_sparse_raw(
        &src,
        6 * MIB,
        &[
            (0, &a[..]),
            (2 * MIB, &[0u8; 512 << 10][..]),
            (3 * MIB + 512, &b[..]),
            (6 * MIB - 8192, &a[..8192]),
        ],
    );
    src
}

/// Creates `dir/t.vmdk` (8 MiB) of `subformat`, with old data unless `old` is false.
fn target(dir: &Path, subformat: &str, zg: &str, old: bool) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let t = dir.join("t.vmdk");
    let o = format!("subformat={subformat},zeroed_grain={zg}");
    let o = if subformat.contains("Flat") {
        format!("subformat={subformat}")
    } else {
        o
    };
    qemu_img(&["create", "-q", "-f", "vmdk", "-o", &o, s(&t), "8M"]);
    if old {
        qemu_io(
            "vmdk",
            &t,
            &[
                "write -P 0xaa 0 3M",
                "write -P 0xbb 6M 1M",
                "write -P 0xcc 5M 64k",
            ],
        );
    }
    t
}

/// Copies every file of `from` into a new folder `to`.
fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Every file of `dir` with its digest, sorted.
fn digests(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                sha256_file(&e.path()),
            )
        })
        .collect();
    v.sort();
    v
}

fn check(img: &Path) -> (i32, String) {
    qemu_check_output(img, "vmdk")
}

fn cids(img: &Path) -> (u64, u64) {
    let j = json(&qemu_img(&["info", "--output=json", "-f", "vmdk", s(img)]));
    let d = &j["format-specific"]["data"];
    (
        d["cid"].as_u64().unwrap(),
        d["parent-cid"].as_u64().unwrap(),
    )
}

fn map(img: &Path) -> String {
    qemu_img(&["map", "--output=json", "-f", "vmdk", s(img)])
}

#[test]
fn convert_n_into_every_subformat_like_qemu_img() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    for &(sf, zg, old_data) in TARGETS {
        let what = format!("{sf} zeroed_grain={zg}");
        let p = d.join(format!("p-{sf}-{zg}"));
        let pt = target(&p, sf, zg, old_data);
        let old = guest(&pt, "vmdk");
        let (qd, vd) = (d.join("q"), d.join("v"));
        copy_dir(&p, &qd);
        copy_dir(&p, &vd);
        let (q, v) = (qd.join("t.vmdk"), vd.join("t.vmdk"));
        run_ok(
            "qemu-img",
            &["convert", "-n", "-f", "raw", "-O", "vmdk", s(&src), s(&q)],
        );
        vimg(&["convert", "-n", "-f", "raw", "-O", "vmdk", s(&src), s(&v)]);
        let out = run_cmd(
            "qemu-img",
            &["compare", "-f", "vmdk", "-F", "vmdk", s(&q), s(&v)],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{what}: qemu-img's and vimg's results differ:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let got = guest(&v, "vmdk");
        let mut want = std::fs::read(&src).unwrap();
        want.extend_from_slice(&old[want.len()..]);
        assert!(got == want, "{what}: guest content");
        // The same allocation as qemu-img's (zeroed grains, grains written, in order).
        assert_eq!(map(&v), map(&q), "{what}: qemu-img map");
        let (code, text) = check(&v);
        assert_eq!(code, 0, "{what}: qemu-img check:\n{text}");
        let out = vimg_raw(&["check", s(&v)]);
        assert_eq!(out.status.code(), Some(0), "{what}: vimg check");
        let (c0, p0) = cids(&pt);
        let (c1, p1) = cids(&v);
        assert_ne!(c0, c1, "{what}: the CID did not change");
        assert_eq!(p0, p1, "{what}: the parentCID changed");
        // Same files, same lengths as qemu-img leaves them (a descriptor file keeps its
        // length).
        // (streamOptimized: the compressed sizes differ, vimg's deflate level is not
        // qemu-img's.)
        for (name, _) in digests(&qd).into_iter().filter(|_| sf != "streamOptimized") {
            assert_eq!(
                size_of(&qd.join(&name)),
                size_of(&vd.join(&name)),
                "{what}: length of {name}"
            );
        }
    }
}

/// `convert -n` from a qcow2 source with 64 KiB clusters (the engine's zero and data
/// ranges cluster-aligned) into a stream-optimized target: every grain compressed once.
#[test]
fn convert_n_into_stream_optimized_from_qcow2() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("s.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&src), "4M"]);
    qemu_io(
        "qcow2",
        &src,
        &[
            "write -P 1 0 64k",
            "write -P 2 192k 100k",
            "write -z 1M 64k",
        ],
    );
    for zg in ["off", "on"] {
        let p = d.join(format!("p{zg}"));
        target(&p, "streamOptimized", zg, false);
        let v = p.join("t.vmdk");
        vimg(&["convert", "-n", "-O", "vmdk", s(&src), s(&v)]);
        let out = run_cmd("qemu-img", &["compare", "-F", "vmdk", s(&src), s(&v)]);
        assert_eq!(out.status.code(), Some(0), "zeroed_grain={zg}");
        assert_eq!(check(&v).0, 0);
    }
}

/// `commit` of a qcow2 top into a vmdk base (monolithicSparse and twoGbMaxExtentFlat):
/// vimg's base reads as qemu-img's does after the same commit on a copy, and checks clean.
#[test]
fn commit_qcow2_top_into_vmdk_base_like_qemu_img() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sf in ["monolithicSparse", "twoGbMaxExtentFlat", "streamOptimized"] {
        let p = d.join(format!("p-{sf}"));
        target(&p, sf, "off", sf != "streamOptimized");
        let top = p.join("top.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "t.vmdk",
            "-F",
            "vmdk",
            s(&top),
        ]);
        qemu_io(
            "qcow2",
            &top,
            &[
                "write -P 0x11 64k 128k",
                "write -P 0x22 4M 1M",
                "write -z 5M 64k",
            ],
        );
        let (qd, vd) = (d.join("q"), d.join("v"));
        copy_dir(&p, &qd);
        copy_dir(&p, &vd);
        let qc = run_cmd("qemu-img", &["commit", s(&qd.join("top.qcow2"))]);
        let vc = vimg_raw(&["commit", s(&vd.join("top.qcow2"))]);
        if sf == "streamOptimized" {
            // qemu-img commits grain by grain into the fresh stream; so does vimg.
            assert_eq!(qc.status.code(), vc.status.code(), "{sf}");
            if qc.status.code() != Some(0) {
                continue;
            }
        } else {
            assert_eq!(qc.status.code(), Some(0), "{sf}: qemu-img commit");
            assert_eq!(
                vc.status.code(),
                Some(0),
                "{sf}: vimg commit: {}",
                String::from_utf8_lossy(&vc.stderr)
            );
        }
        let (qb, vb) = (qd.join("t.vmdk"), vd.join("t.vmdk"));
        let out = run_cmd(
            "qemu-img",
            &["compare", "-f", "vmdk", "-F", "vmdk", s(&qb), s(&vb)],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{sf}: bases differ: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(check(&vb).0, 0, "{sf}: qemu-img check of the base");
        if sf != "streamOptimized" {
            assert_eq!(map(&vb), map(&qb), "{sf}: base map");
        }
        // The top still reads the same through the changed base (a qcow2 top does not
        // check the vmdk CID).
        let out = run_cmd(
            "qemu-img",
            &[
                "compare",
                s(&qd.join("top.qcow2")),
                s(&vd.join("top.qcow2")),
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{sf}: tops differ");
    }
}

/// Runs vimg expecting a refusal naming `want`, and checks nothing in `dir` changed.
fn refused_untouched(dir: &Path, args: &[&str], want: &str, what: &str) {
    let before = digests(dir);
    let out = vimg_raw(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {err}");
    assert!(err.contains(want), "{what}: {err}");
    assert_eq!(digests(dir), before, "{what}: files changed");
}

#[test]
fn what_qemu_img_gets_wrong_is_refused_untouched() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    write_sparse_raw(&src, 4 * MIB, &[(0, &pattern(GRAIN, 1)[..])]);

    // Safe rebase of a vmdk top: qemu-img copies, then cannot change the backing file.
    let r = d.join("rebase");
    std::fs::create_dir_all(&r).unwrap();
    for (name, fill) in [("b1.vmdk", Some("write -P 1 0 1M")), ("b2.vmdk", None)] {
        qemu_img(&["create", "-q", "-f", "vmdk", s(&r.join(name)), "4M"]);
        if let Some(c) = fill {
            qemu_io("vmdk", &r.join(name), &[c]);
        }
    }
    let top = r.join("top.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "b1.vmdk",
        "-F",
        "vmdk",
        s(&top),
    ]);
    qemu_io("vmdk", &top, &["write -P 3 2M 64k"]);
    refused_untouched(
        &r,
        &[
            "rebase",
            "-f",
            "vmdk",
            "-b",
            "b2.vmdk",
            "-F",
            "vmdk",
            s(&top),
        ],
        "Could not change the backing file to 'b2.vmdk': Operation not supported",
        "rebase",
    );
    let out = run_cmd(
        "qemu-img",
        &[
            "rebase",
            "-f",
            "vmdk",
            "-b",
            "b2.vmdk",
            "-F",
            "vmdk",
            s(&top),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("Could not change the backing file to 'b2.vmdk': Operation not supported"));

    // A stream-optimized image holding a grain.
    let st = d.join("stream");
    let t = target(&st, "streamOptimized", "off", false);
    run_ok("qemu-img", &["convert", "-n", "-O", "vmdk", s(&src), s(&t)]);
    refused_untouched(
        &st,
        &["convert", "-n", "-f", "raw", "-O", "vmdk", s(&src), s(&t)],
        "Could not write to allocated cluster for streamOptimized",
        "stream with grains",
    );

    // vimg's own stream-optimized images: directory at the end (footer).
    let fo = d.join("footer");
    std::fs::create_dir_all(&fo).unwrap();
    let t = fo.join("t.vmdk");
    vimg(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&t),
        "4M",
    ]);
    refused_untouched(
        &fo,
        &["convert", "-n", "-f", "raw", "-O", "vmdk", s(&src), s(&t)],
        "grain directory at the end",
        "footer stream",
    );

    // A descriptor whose parentCID line comes first: QEMU's CID rewrite would mangle it.
    let pc = d.join("pcid");
    let t = target(&pc, "monolithicFlat", "off", false);
    let text = std::fs::read_to_string(&t).unwrap();
    let swapped = text
        .replacen("CID=", "XCID=", 1)
        .replacen("parentCID=ffffffff\n", "", 1);
    let cid_line = text
        .lines()
        .find(|l| l.starts_with("CID="))
        .unwrap()
        .to_string();
    let swapped = swapped.replacen(
        &format!("X{cid_line}\n"),
        &format!("parentCID=ffffffff\n{cid_line}\n"),
        1,
    );
    std::fs::write(&t, swapped).unwrap();
    vimg(&["info", s(&t)]);
    refused_untouched(
        &pc,
        &["convert", "-n", "-f", "raw", "-O", "vmdk", s(&src), s(&t)],
        "CID",
        "parentCID first",
    );

    // An RDONLY extent (qemu skips it: the disk it sees is smaller).
    let ro = d.join("rdonly");
    let t = target(&ro, "twoGbMaxExtentFlat", "off", false);
    let text = std::fs::read_to_string(&t).unwrap();
    std::fs::write(&t, text.replacen("RW ", "RDONLY ", 1)).unwrap();
    refused_untouched(
        &ro,
        &["convert", "-n", "-f", "raw", "-O", "vmdk", s(&src), s(&t)],
        "RDONLY",
        "RDONLY extent",
    );

    // Two flat extents on one file (a write to one would change the other).
    let al = d.join("alias");
    let t = target(&al, "monolithicFlat", "off", false);
    let text = std::fs::read_to_string(&t).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("RW "))
        .unwrap()
        .to_string();
    std::fs::write(&t, text.replacen(&line, &format!("{line}\n{line}"), 1)).unwrap();
    vimg(&["info", s(&t)]);
    refused_untouched(
        &al,
        &["convert", "-n", "-f", "raw", "-O", "vmdk", s(&src), s(&t)],
        "are one file",
        "aliased extents",
    );

    // A grain table entry past the end of the file: the reader refuses it.
    let bad = d.join("bad");
    let t = target(&bad, "monolithicSparse", "off", true);
    let gd = u64::from_le_bytes(read_bytes::<8>(&t, 0x38));
    let gt = u32::from_le_bytes(read_bytes::<4>(&t, gd * 512));
    patch(&t, u64::from(gt) * 512, &0x7fff_0000u32.to_le_bytes());
    let before = digests(&bad);
    let out = vimg_raw(&["convert", "-n", "-f", "raw", "-O", "vmdk", s(&src), s(&t)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(digests(&bad), before, "hostile table: files changed");

    // A hostile capacity: a grain directory larger than the file, refused in bounded
    // memory and time.
    let big = d.join("big");
    let t = target(&big, "monolithicSparse", "off", false);
    patch(&t, 0x0c, &(1u64 << 40).to_le_bytes());
    let before = digests(&big);
    let run = run_limited(
        &["convert", "-n", "-f", "raw", "-O", "vmdk", s(&src), s(&t)],
        2 << 30,
    );
    assert_eq!(run.code, Some(1), "hostile capacity");
    assert_eq!(digests(&big), before, "hostile capacity: files changed");
}

/// SIGKILL before every write, flush and truncation of `convert -n` into a
/// monolithicSparse image with zeroed grains whose second grain table is missing from
/// both directories (vimg appends one): every grain old or new, `qemu-img check` clean,
/// the image opens in vimg, and a later `convert -n` completes it.
#[test]
fn killed_convert_n_into_vmdk() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    let a = pattern(200 << 10, 7);
    let b = pattern(3 * GRAIN, 8);
    write_sparse_raw(
        &src,
        40 * MIB,
        &[
            (4096, &a[..]),
            (MIB, &[0u8; 128 << 10][..]),
            (33 * MIB + 512, &b[..]),
        ],
    );
    for (sf, zg) in [("monolithicSparse", "on"), ("twoGbMaxExtentSparse", "on")] {
        let p = d.join(format!("p-{sf}-{zg}"));
        std::fs::create_dir_all(&p).unwrap();
        let t = p.join("t.vmdk");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={sf},zeroed_grain={zg}"),
            s(&t),
            "48M",
        ]);
        qemu_io("vmdk", &t, &["write -P 0xaa 0 2M", "write -P 0xbb 40M 1M"]);
        if sf == "monolithicSparse" {
            // Drop grain table 1 (32..48 MiB) from both directories: not in use.
            let gd = u64::from_le_bytes(read_bytes::<8>(&t, 0x38));
            let rgd = u64::from_le_bytes(read_bytes::<8>(&t, 0x30));
            patch(&t, rgd * 512 + 4, &[0u8; 4]);
            patch(&t, gd * 512 + 4, &[0u8; 4]);
            // Grain 40M lived there: it is unallocated now.
        }
        let old = guest(&t, "vmdk");
        let mut new = std::fs::read(&src).unwrap();
        new.extend_from_slice(&old[new.len()..]);
        let k = d.join("k");
        let args_for = |k: &Path| -> Vec<String> {
            [
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "vmdk",
                s(&src),
                s(&k.join("t.vmdk")),
            ]
            .iter()
            .map(|x| x.to_string())
            .collect()
        };
        let args = args_for(&k);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut kills = 0;
        for n in 1.. {
            copy_dir(&p, &k);
            let killed = run_killed(&args, n);
            let what = format!("{sf} zeroed_grain={zg}: killed before write {n}");
            let kt = k.join("t.vmdk");
            let (code, text) = check(&kt);
            assert_eq!(code, 0, "{what}: qemu-img check:\n{text}");
            let got = guest(&kt, "vmdk");
            // Allocated grains are overwritten in place, write by write (sector-aligned,
            // as qemu-img does); a grain the target did not have is written whole before
            // its table entry: old (zeros) or new as one.
            assert_old_or_new(&got, &old, &new, 512, &what);
            for (i, o) in old.chunks(GRAIN).enumerate() {
                if o.iter().all(|b| *b == 0) {
                    let r = i * GRAIN..((i + 1) * GRAIN).min(got.len());
                    assert_old_or_new(&got[r.clone()], o, &new[r], GRAIN, &what);
                }
            }
            vimg(&["info", s(&kt)]);
            if !killed {
                assert!(got == new, "{what}: the finished run's content");
                break;
            }
            kills += 1;
            // The image takes the operation again after the kill.
            vimg(&args);
            assert!(guest(&kt, "vmdk") == new, "{what}: rerun after the kill");
            assert_eq!(check(&kt).0, 0, "{what}: check after the rerun");
        }
        assert!(kills >= 5, "{sf}: only {kills} kill points");
    }
}

//! `convert --bitmaps` (issue 14): persistent bitmaps copied qcow2 -> qcow2 as qemu-img
//! copies them: the same `info` listing (names, granularity, flags, order), the same guest
//! content, `qemu-img check` clean, and the same bits. The bits are compared through
//! qemu-img itself: each copied bitmap is merged (`qemu-img bitmap --merge -b`) into a
//! fresh image made the same way for vimg's output and qemu-img's, and the two files must
//! be byte-identical (and differ from one where nothing was merged, so the bits are there).

mod common;

use std::path::Path;

use common::*;

/// A qcow2 source with three bitmaps: `b0` (64 KiB granularity) and `b1` (128 KiB) dirtied
/// by writes, `b2` dirtied and then disabled.
fn source(path: &Path) {
    qemu_img(&["create", "-q", "-f", "qcow2", s(path), "8M"]);
    qemu_img(&["bitmap", "--add", s(path), "b0"]);
    qemu_io("qcow2", path, &["write -P 0x11 1M 64k"]);
    qemu_img(&["bitmap", "--add", "-g", "128k", s(path), "b1"]);
    qemu_img(&["bitmap", "--add", s(path), "b2"]);
    qemu_io(
        "qcow2",
        path,
        &["write -P 0x22 3M 192k", "write -P 0x33 7M 4k"],
    );
    qemu_img(&["bitmap", "--disable", s(path), "b2"]);
}

fn bitmaps_of(img: &Path) -> serde_json::Value {
    let v = json(&qemu_img(&["info", "--output=json", s(img)]));
    v["format-specific"]["data"]["bitmaps"].clone()
}

/// The bits of bitmap `name` (granularity `g`) of `img`, as a file made by qemu-img.
fn bits_file(img: &Path, name: &str, g: &str, out: &Path) -> String {
    let _ = std::fs::remove_file(out);
    qemu_img(&["create", "-q", "-f", "qcow2", s(out), "8M"]);
    qemu_img(&["bitmap", "--add", "-g", g, s(out), "m"]);
    qemu_img(&[
        "bitmap",
        "--merge",
        name,
        "-b",
        s(img),
        "-F",
        "qcow2",
        s(out),
        "m",
    ]);
    sha256_file(out)
}

#[test]
fn bitmaps_copied_like_qemu_img() {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (src, v, q) = (d.join("s.qcow2"), d.join("v.qcow2"), d.join("q.qcow2"));
    source(&src);
    vimg(&["convert", "--bitmaps", "-O", "qcow2", s(&src), s(&v)]);
    qemu_img(&["convert", "--bitmaps", "-O", "qcow2", s(&src), s(&q)]);
    let listed = bitmaps_of(&v);
    assert_eq!(listed, bitmaps_of(&q));
    assert_eq!(listed, bitmaps_of(&src));
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed}");
    run_ok("qemu-img", &["check", s(&v)]);
    run_ok("qemu-img", &["compare", s(&v), s(&q)]);
    run_ok("qemu-img", &["compare", s(&v), s(&src)]);
    let empty = d.join("empty.qcow2");
    for (name, g) in [("b0", "64k"), ("b1", "128k"), ("b2", "64k")] {
        let a = bits_file(&v, name, g, &d.join("bv.qcow2"));
        let b = bits_file(&q, name, g, &d.join("bq.qcow2"));
        assert_eq!(a, b, "bitmap {name}: vimg's bits differ from qemu-img's");
        let _ = std::fs::remove_file(&empty);
        qemu_img(&["create", "-q", "-f", "qcow2", s(&empty), "8M"]);
        qemu_img(&["bitmap", "--add", "-g", g, s(&empty), "m"]);
        assert_ne!(a, sha256_file(&empty), "bitmap {name} has no bits set");
    }
    // Without --bitmaps, none are copied (both tools).
    let (v2, q2) = (d.join("v2.qcow2"), d.join("q2.qcow2"));
    vimg(&["convert", "-O", "qcow2", s(&src), s(&v2)]);
    qemu_img(&["convert", "-O", "qcow2", s(&src), s(&q2)]);
    assert_eq!(bitmaps_of(&v2), bitmaps_of(&q2));
}

/// An inconsistent bitmap (left in use by a killed writer): refused with qemu-img's words
/// and exit code, nothing written; `--skip-broken-bitmaps` skips it with qemu-img's warning.
#[test]
fn inconsistent_bitmaps_refused_or_skipped_like_qemu_img() {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let src = d.join("s.qcow2");
    source(&src);
    qemu_img(&["bitmap", "--add", s(&src), "broken"]);
    // qemu-io marks the enabled bitmaps in use at its read-write open; killed, it leaves them so.
    let _ = run_cmd(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write 0 64k",
            "-c",
            "sigraise 9",
            s(&src),
        ],
    );
    assert!(bitmaps_of(&src).to_string().contains("in-use"));
    let (v, q) = (d.join("v.qcow2"), d.join("q.qcow2"));
    let vo = vimg_raw(&["convert", "--bitmaps", "-O", "qcow2", s(&src), s(&v)]);
    let qo = run_cmd(
        "qemu-img",
        &["convert", "--bitmaps", "-O", "qcow2", s(&src), s(&q)],
    );
    assert_eq!(vo.status.code(), qo.status.code());
    let strip = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .map(|l| l.split_once(": ").map_or(l, |x| x.1).to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&vo.stderr), strip(&qo.stderr));
    assert!(!v.exists() && !q.exists());
    let args = |o: &Path| {
        vec![
            "convert".to_string(),
            "--bitmaps".into(),
            "--skip-broken-bitmaps".into(),
            "-O".into(),
            "qcow2".into(),
            s(&src).into(),
            s(o).into(),
        ]
    };
    let va: Vec<String> = args(&v);
    let qa: Vec<String> = args(&q);
    let vo = vimg_raw(&va.iter().map(String::as_str).collect::<Vec<_>>());
    let qo = run_cmd(
        "qemu-img",
        &qa.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(vo.status.code(), Some(0));
    assert_eq!(qo.status.code(), Some(0));
    assert_eq!(strip(&vo.stderr), strip(&qo.stderr));
    assert_eq!(bitmaps_of(&v), bitmaps_of(&q));
    run_ok("qemu-img", &["check", s(&v)]);
}

/// qemu-img's refusals, words and exit codes: an output format without bitmaps, a v2
/// qcow2 output, a source format without them, several sources, `--skip-broken-bitmaps`
/// alone. vimg writes nothing.
#[test]
fn bitmaps_refusals_like_qemu_img() {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let src = d.join("s.qcow2");
    source(&src);
    let raw = d.join("r.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "1M"]);
    let out = d.join("out.img");
    let cases: Vec<Vec<&str>> = vec![
        vec!["convert", "--bitmaps", "-O", "raw", s(&src), s(&out)],
        vec![
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            s(&src),
            s(&out),
        ],
        vec!["convert", "--bitmaps", "-O", "qcow2", s(&raw), s(&out)],
        vec![
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            s(&src),
            s(&src),
            s(&out),
        ],
        vec![
            "convert",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            s(&src),
            s(&out),
        ],
    ];
    for c in cases {
        let vo = vimg_raw(&c);
        assert!(!out.exists(), "{c:?}: vimg wrote an output");
        // qemu-img checks the output format's bitmap support after creating the output,
        // and leaves it behind; vimg writes nothing.
        let qo = run_cmd("qemu-img", &c);
        let _ = std::fs::remove_file(&out);
        assert_eq!(vo.status.code(), qo.status.code(), "{c:?}");
        let last = |b: &[u8]| {
            String::from_utf8_lossy(b)
                .lines()
                .last()
                .map(|l| l.split_once(": ").map_or(l, |x| x.1).to_string())
        };
        assert_eq!(last(&vo.stderr), last(&qo.stderr), "{c:?}");
    }
}

/// All or nothing: vimg killed before each write the bitmap copy makes leaves the
/// destination as it was (the bitmaps go into the temporary file before the rename).
#[test]
fn killed_bitmap_copy_leaves_destination() {
    if !qemu_available(&test_name()) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let src = d.join("s.qcow2");
    source(&src);
    let dst = d.join("dst.qcow2");
    let args = ["convert", "--bitmaps", "-O", "qcow2", s(&src), s(&dst)];
    let mut kills = 0;
    for n in 1.. {
        std::fs::write(&dst, b"old destination").unwrap();
        let killed = common::kill::run_killed(&args, n);
        if !killed {
            run_ok("qemu-img", &["check", s(&dst)]);
            assert_eq!(bitmaps_of(&dst), bitmaps_of(&src));
            break;
        }
        assert_eq!(
            std::fs::read(&dst).unwrap(),
            b"old destination",
            "killed at {n}"
        );
        kills += 1;
    }
    assert!(kills >= 3, "only {kills} kill points");
}

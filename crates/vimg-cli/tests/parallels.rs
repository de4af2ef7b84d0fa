//! Parallels (ploop) against qemu-img both ways: images qemu-img makes and qemu-io fills
//! read byte-identically; images vimg writes are the bytes qemu-img writes, read back
//! identically and check clean; the corpus samples give their digests; hostile BATs are
//! refused before anything is written.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

const MIB: u64 = 1 << 20;

/// A parallels image made by qemu-img with `opts`, patterns written by qemu-io.
fn qemu_parallels(dir: &Path, name: &str, size: &str, opts: &str) -> PathBuf {
    let img = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "parallels"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&img), size]);
    qemu_img(&args);
    qemu_io(
        "parallels",
        &img,
        &[
            "write -P 0xaa 0 64k",
            "write -P 0xbb 3M 1k",
            "write -P 0xcc 5000k 300k",
            "write -z 3M 512",
        ],
    );
    img
}

#[test]
fn reads_qemu_made_images_like_qemu() {
    if !qemu_available("reads_qemu_made_images_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, opts) in [
        "",
        "cluster_size=64k",
        "cluster_size=1000",
        "cluster_size=4M",
    ]
    .iter()
    .enumerate()
    {
        let img = qemu_parallels(dir.path(), &format!("q{i}.img"), "10M", opts);
        assert_reads_like_qemu(&img, "parallels", dir.path());
        // map agrees with qemu-img's.
        let q = qemu_img(&["map", "--output=json", "-f", "parallels", s(&img)]);
        let v = vimg(&["map", "--output=json", s(&img)]);
        assert_eq!(json(&v), json(&q), "map of {opts:?}");
    }
}

#[test]
fn writes_what_qemu_writes() {
    if !qemu_available("writes_what_qemu_writes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("src.raw");
    mixed_raw(&raw, 24 * MIB + 4096);
    for opts in ["", "cluster_size=64k", "cluster_size=1000"] {
        let (q, v) = (d.join("q.img"), d.join("v.img"));
        let mut qa = vec!["convert", "-f", "raw", "-O", "parallels"];
        let mut va = qa.clone();
        if !opts.is_empty() {
            qa.extend(["-o", opts]);
            va.extend(["-o", opts]);
        }
        qa.extend([s(&raw), s(&q)]);
        va.extend(["-m", "4", s(&raw), s(&v)]);
        qemu_img(&qa);
        vimg(&va);
        assert_same_file(&q, &v);
        assert_qemu_accepts(&v, "parallels", &raw, "raw");
        let out = run_cmd("qemu-img", &["check", "-f", "parallels", s(&v)]);
        assert!(out.status.success(), "qemu-img check {opts:?}");
        // vimg's own check agrees.
        vimg(&["check", s(&v)]);
        let _ = (fs::remove_file(&q), fs::remove_file(&v));
    }
}

#[test]
fn create_is_qemu_img_create() {
    if !qemu_available("create_is_qemu_img_create") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (size, opts) in [
        ("10M", ""),
        ("1000", ""),
        ("3G", "cluster_size=64k"),
        ("7M", "cluster_size=1000"),
    ] {
        let (q, v) = (d.join("q.img"), d.join("v.img"));
        let mut qa = vec!["create", "-f", "parallels"];
        if !opts.is_empty() {
            qa.extend(["-o", opts]);
        }
        let mut va = qa.clone();
        qa.extend([s(&q), size]);
        va.extend([s(&v), size]);
        let qo = qemu_img(&qa);
        let vo = vimg(&va);
        assert_eq!(vo.replace("v.img", "q.img"), qo);
        assert_same_file(&q, &v);
    }
    assert_eq!(
        vimg(&["create", "-f", "parallels", "-o", "help"]),
        qemu_img(&["create", "-f", "parallels", "-o", "help"])
    );
    for (size, opts) in [
        ("10M", "cluster_size=0"),
        ("10M", "cluster_size=4G"),
        ("5P", ""),
    ] {
        let v = d.join("bad.img");
        let mut va = vec!["create", "-f", "parallels"];
        if !opts.is_empty() {
            va.extend(["-o", opts]);
        }
        va.extend([s(&v), size]);
        assert_vimg_fails(&va);
        assert!(!v.exists());
    }
}

#[test]
fn corpus_samples_give_their_digests() {
    let Some(corpus) = corpus_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<Row> = corpus_rows(&corpus, &[""])
        .into_iter()
        .filter(|r| r.format == "parallels")
        .collect();
    assert!(
        rows.len() >= 3,
        "expected parallels-v1, -v2 and -with-bitmap"
    );
    for row in rows {
        let img = corpus_file(&corpus, &row, dir.path());
        let want = corpus_digest(&corpus, &row.file).unwrap();
        let image = open_image(&img, None).unwrap();
        assert_eq!(image.format(), vimg::Format::Parallels);
        assert_eq!(Some(image.virtual_size()), row.virtual_size);
        assert_eq!(image_digest(&image), want, "{}", row.file);
        if let Some(sha) = &row.sha256 {
            if image.virtual_size() <= 64 * MIB {
                assert_eq!(
                    &vimg_raw_sha256(&img, None, dir.path()),
                    sha,
                    "{}",
                    row.file
                );
            }
        }
        let info = json(&vimg(&["info", "--output=json", s(&img)]));
        assert_eq!(info["format"], "parallels");
        if row.file.contains("bitmap") {
            let bitmaps = &info["format-specific"]["data"]["dirty-bitmaps"];
            assert_eq!(bitmaps.as_array().map(Vec::len), Some(1), "{info}");
            // qemu-img check reports the extension and bitmap clusters as leaked; so
            // does vimg.
            let r = vimg_raw(&["check", s(&img)]);
            assert_eq!(r.status.code(), Some(3));
        } else {
            vimg(&["check", s(&img)]);
        }
        let _ = fs::remove_file(&img);
    }
}

#[test]
fn image_service_calls_it_ploop() {
    if !qemu_available("image_service_calls_it_ploop") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.hds");
    qemu_img(&["create", "-q", "-f", "parallels", s(&img), "4M"]);
    let v = json(&vimg(&["info", "--output=json", s(&img)]));
    assert_eq!(v["image-service"]["disk_format"], "ploop", "{v}");
}

fn bat_entry(img: &Path, i: usize, v: u32) {
    let mut d = fs::read(img).unwrap();
    d[64 + 4 * i..68 + 4 * i].copy_from_slice(&v.to_le_bytes());
    fs::write(img, d).unwrap();
}

#[test]
fn hostile_bats_are_refused_before_writing() {
    if !qemu_available("hostile_bats_are_refused_before_writing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = qemu_parallels(d, "base.img", "10M", "cluster_size=64k");
    // Entries are in clusters of 64 KiB; the data area starts at cluster 1.
    let cases: [(&str, usize, u32); 4] = [
        ("past-eof", 40, 10_000),
        ("overlap", 41, 1),
        ("inside-header", 42, 0x0),
        ("huge", 43, u32::MAX),
    ];
    for (name, i, v) in cases {
        let img = d.join(format!("{name}.img"));
        fs::copy(&base, &img).unwrap();
        if name == "inside-header" {
            // A WithoutFreeSpace image counts sectors: sector 1 lies in the BAT.
            let mut b = fs::read(&img).unwrap();
            b[..16].copy_from_slice(b"WithoutFreeSpace");
            fs::write(&img, b).unwrap();
            bat_entry(&img, i, 1);
        } else {
            bat_entry(&img, i, v);
        }
        let out = d.join("out.raw");
        let err = assert_vimg_fails(&["convert", "-O", "raw", s(&img), s(&out)]);
        assert!(err.contains("Parallels"), "{name}: {err}");
        assert!(!out.exists(), "{name}: output left behind");
        // check reports the refusal as a corruption (exit 2), as qemu-img check does for
        // what it finds corrupt.
        let r = vimg_raw(&["check", s(&img)]);
        assert_eq!(r.status.code(), Some(2), "{name}");
    }
    // A BAT longer than the file.
    let img = d.join("long-bat.img");
    let mut b = fs::read(&base).unwrap();
    b[0x20..0x24].copy_from_slice(&0x0100_0000u32.to_le_bytes());
    fs::write(&img, b).unwrap();
    assert_vimg_fails(&["info", s(&img)]);
}

#[test]
fn unclean_image_reads_and_checks_like_qemu() {
    if !qemu_available("unclean_image_reads_and_checks_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_parallels(dir.path(), "u.img", "10M", "");
    let mut b = fs::read(&img).unwrap();
    b[0x2c..0x30].copy_from_slice(&0x746f_6e59u32.to_le_bytes());
    fs::write(&img, b).unwrap();
    assert_reads_like_qemu(&img, "parallels", dir.path());
    let q = run_cmd("qemu-img", &["check", s(&img)]);
    let v = vimg_raw(&["check", s(&img)]);
    assert_eq!(v.status.code(), q.status.code());
    assert!(
        String::from_utf8_lossy(&v.stderr).contains("image was not closed correctly")
            || String::from_utf8_lossy(&v.stdout).contains("image was not closed correctly")
    );
}

#[test]
fn measure_and_compare_cover_parallels() {
    if !qemu_available("measure_and_compare_cover_parallels") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = qemu_parallels(d, "m.img", "10M", "");
    let q = qemu_img(&["measure", "--output=json", "-O", "qcow2", s(&img)]);
    let v = vimg(&["measure", "--output=json", "-O", "qcow2", s(&img)]);
    assert_eq!(json(&v), json(&q));
    // With a dirty bitmap (the corpus sample): measure counts it as qemu-img does.
    if let Some(corpus) = corpus_dir() {
        let row = corpus_rows(&corpus, &[""])
            .into_iter()
            .find(|r| r.file.contains("parallels-with-bitmap"));
        if let Some(row) = row {
            let b = corpus_file(&corpus, &row, d);
            let q = qemu_img(&["measure", "--output=json", "-O", "qcow2", s(&b)]);
            let v = vimg(&["measure", "--output=json", "-O", "qcow2", s(&b)]);
            assert_eq!(json(&v), json(&q));
        }
    }
    let raw = d.join("m.raw");
    qemu_img(&["convert", "-O", "raw", s(&img), s(&raw)]);
    let out = vimg_raw(&["compare", s(&img), s(&raw)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-img cannot measure a parallels target; vimg says so in the same words.
    let q = run_cmd("qemu-img", &["measure", "-O", "parallels", "--size", "1M"]);
    let v = vimg_raw(&["measure", "-O", "parallels", "--size", "1M"]);
    assert_eq!(v.status.code(), q.status.code());
    assert!(String::from_utf8_lossy(&v.stderr).contains("does not support size measurement"));
}

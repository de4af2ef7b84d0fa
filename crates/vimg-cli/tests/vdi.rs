//! VDI against qemu-img both ways, qemu-img check, the corpus, hostile images and truncated
//! fixtures.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;
use vimg::formats::vdi::header::Header;
use vimg::ErrorKind;

const MIB: u64 = 1 << 20;

fn info_of(tool: &str, img: &Path) -> serde_json::Value {
    let args = ["info", "--output=json", s(img)];
    json(&if tool == "qemu" {
        qemu_img(&args)
    } else {
        vimg(&args)
    })
}

/// The first 512 bytes of `img` (the header block).
fn head(img: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut b = vec![0u8; 512];
    fs::File::open(img).unwrap().read_exact(&mut b).unwrap();
    b
}

fn patch(img: &Path, f: impl Fn(&mut Header)) {
    let mut d = fs::read(img).unwrap();
    let mut h = Header::parse(&d).unwrap();
    f(&mut h);
    h.write_to(&mut d);
    fs::write(img, d).unwrap();
}

fn entry(img: &Path, i: usize) -> u32 {
    let d = fs::read(img).unwrap();
    let at = Header::parse(&d).unwrap().offset_bmap as usize + 4 * i;
    u32::from_le_bytes(d[at..at + 4].try_into().unwrap())
}

fn set_entry(img: &Path, i: usize, v: u32) {
    let mut d = fs::read(img).unwrap();
    let at = Header::parse(&d).unwrap().offset_bmap as usize + 4 * i;
    d[at..at + 4].copy_from_slice(&v.to_le_bytes());
    fs::write(img, d).unwrap();
}

fn qemu_vdi(raw: &Path, dst: &Path, opts: &str) {
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", "vdi"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(raw), s(dst)]);
    qemu_img(&args);
}

#[test]
fn qemu_written_vdis_read_like_qemu() {
    if !qemu_available("qemu_written_vdis_read_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 24 * MIB + 4096);
    for opts in ["", "static=on"] {
        let img = dir.path().join("q.vdi");
        let _ = fs::remove_file(&img);
        qemu_vdi(&src, &img, opts);
        assert_reads_like_qemu(&img, "vdi", dir.path());
        let q = info_of("qemu", &img);
        let v = info_of("vimg", &img);
        for key in ["format", "virtual-size", "cluster-size", "format-specific"] {
            assert_eq!(q[key], v[key], "{opts}: {key}");
        }
    }
}

#[test]
fn vimg_written_vdis_are_accepted_by_qemu() {
    if !qemu_available("vimg_written_vdis_are_accepted_by_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 40 * MIB + 512);
    for opts in ["", "static=on"] {
        let img = dir.path().join("v.vdi");
        let _ = fs::remove_file(&img);
        let mut args = vec!["convert", "-f", "raw", "-O", "vdi"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&src), s(&img)]);
        vimg(&args);
        // info, compare and `qemu-img check` (clean).
        assert_qemu_accepts(&img, "vdi", &src, "raw");
        assert_eq!(info_of("qemu", &img)["virtual-size"], 40 * MIB + 512);
        assert_reads_like_qemu(&img, "vdi", dir.path());
        // Layout and size as qemu-img writes them.
        let q = dir.path().join("q.vdi");
        let _ = fs::remove_file(&q);
        qemu_vdi(&src, &q, opts);
        assert_eq!(
            fs::metadata(&q).unwrap().len(),
            fs::metadata(&img).unwrap().len(),
            "{opts}"
        );
    }
}

#[test]
fn empty_images_match_qemu() {
    if !qemu_available("empty_images_match_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for size in ["1", "1000", "1M", "1000M", "2T"] {
        for opts in ["", "static=on"] {
            if opts == "static=on" && size.ends_with('T') {
                continue;
            }
            let mut lens = Vec::new();
            for who in ["qemu", "vimg"] {
                let img = dir.path().join(format!("{who}.vdi"));
                let _ = fs::remove_file(&img);
                let mut args = vec!["create", "-q", "-f", "vdi"];
                if !opts.is_empty() {
                    args.extend(["-o", opts]);
                }
                args.extend([s(&img), size]);
                if who == "qemu" {
                    qemu_img(&args);
                } else {
                    vimg(&args);
                }
                let q = info_of("qemu", &img);
                let v = info_of("vimg", &img);
                assert_eq!(q["virtual-size"], v["virtual-size"], "{who} {size} {opts}");
                let out = run_cmd("qemu-img", &["check", s(&img)]);
                assert!(out.status.success(), "{who} {size} {opts}");
                lens.push(fs::metadata(&img).unwrap().len());
                let h = Header::parse(&head(&img)).unwrap();
                assert_eq!(h.uuid_link, [0; 16]);
                assert_ne!(h.uuid_image, [0; 16]);
            }
            assert_eq!(lens[0], lens[1], "{size} {opts}");
        }
    }
}

#[test]
fn option_help_matches_qemu() {
    if !qemu_available("option_help_matches_qemu") {
        return;
    }
    // With a target name both list the protocol's options too.
    let q = qemu_img(&["create", "-f", "vdi", "-o", "help", "x"]);
    let v = vimg(&["create", "-f", "vdi", "-o", "help", "x"]);
    let q: Vec<&str> = q.lines().take_while(|l| !l.is_empty()).collect();
    let v: Vec<&str> = v.lines().take_while(|l| !l.is_empty()).collect();
    assert_eq!(q, v);
}

#[test]
fn check_matches_qemu() {
    if !qemu_available("check_matches_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 16 * MIB);
    let img = dir.path().join("c.vdi");
    qemu_vdi(&src, &img, "");
    let r = open_image(&img, None).unwrap().reader().check().unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0));
    let v = serde_json::to_value(&r).unwrap();
    let q = json(&String::from_utf8_lossy(
        &run_cmd("qemu-img", &["check", "--output=json", s(&img)]).stdout,
    ));
    for key in [
        "check-errors",
        "corruptions",
        "leaks",
        "total-clusters",
        "image-end-offset",
    ] {
        assert_eq!(v.get(key), q.get(key), "{key}");
    }
    // A wrong allocated-blocks count: qemu-img check exits 2 with the same message.
    patch(&img, |h| h.blocks_allocated += 1);
    let out = run_cmd("qemu-img", &["check", s(&img)]);
    assert_eq!(out.status.code(), Some(2));
    let qmsg = String::from_utf8_lossy(&out.stderr).into_owned();
    let r = open_image(&img, None).unwrap().reader().check().unwrap();
    assert_eq!(r.corruptions, 1);
    assert!(qmsg.contains(&r.messages[0]), "{qmsg} vs {:?}", r.messages);
}

#[test]
fn corpus_vdis_give_the_expected_answer() {
    let Some(corpus) = corpus_dir() else { return };
    if !can_run("xz") || !can_run("gzip") {
        skipped_line(format_args!(
            "SKIPPED corpus_vdis_give_the_expected_answer: xz/gzip missing"
        ));
        return;
    }
    let rows = corpus_rows(&corpus, &[".vdi"]);
    assert!(rows.len() >= 2, "found only {} vdi rows", rows.len());
    for row in rows {
        let dir = tempfile::tempdir().unwrap();
        let img = corpus_file(&corpus, &row, dir.path());
        let name = row.file.as_str();
        if row.answer.starts_with("ERROR") {
            // The VirtualBox differencing snapshot: unsupported, clearly.
            let err =
                assert_vimg_fails(&["convert", "-O", "raw", s(&img), s(&dir.path().join("o"))]);
            assert!(err.contains("differencing"), "{name}: {err}");
            let e = open_image(&img, None).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{name}");
            // Its parent (a companion, not a row) reads as the 1 GiB of zeros the manifest
            // says the flattened snapshot holds.
            let parent = dir.path().join("image-default.vdi");
            if parent.exists() {
                let p = open_image(&parent, None).unwrap();
                assert_eq!(p.virtual_size(), 1 << 30);
                assert!(!p.map_flat(0, 1 << 30).unwrap().0.kind.has_data());
            }
            continue;
        }
        let image = open_image(&img, None).unwrap();
        assert_eq!(image.format(), vimg::Format::Vdi);
        assert_eq!(Some(image.virtual_size()), row.virtual_size, "{name}");
        assert_eq!(image_digest(&image), corpus_digest(&corpus, name).unwrap());
        let sha = row.sha256.clone().unwrap();
        assert_eq!(vimg_raw_sha256(&img, None, dir.path()), sha, "{name}");
        assert_eq!(
            vimg_raw_sha256(&img, Some("vdi"), dir.path()),
            sha,
            "{name}"
        );
    }
}

fn hostile_base(dir: &Path) -> PathBuf {
    let src = dir.join("src.raw");
    mixed_raw(&src, 8 * MIB);
    let img = dir.join("base.vdi");
    qemu_vdi(&src, &img, "");
    img
}

#[test]
fn hostile_vdis_fail_cleanly() {
    if !qemu_available("hostile_vdis_fail_cleanly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = hostile_base(dir.path());
    let first = entry(&base, 0);
    assert_eq!(first, 0);
    type Patch = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, ErrorKind, Patch)> = vec![
        (
            "entry-out-of-range",
            ErrorKind::Corrupt,
            Box::new(|p| set_entry(p, 1, 8)),
        ),
        (
            "entry-huge",
            ErrorKind::Corrupt,
            Box::new(|p| set_entry(p, 1, 0xffff_fff0)),
        ),
        (
            "entry-duplicate",
            ErrorKind::Corrupt,
            Box::new(|p| set_entry(p, 7, 0)),
        ),
        (
            "entry-past-eof",
            ErrorKind::Corrupt,
            Box::new(|p| {
                let d = fs::read(p).unwrap();
                fs::write(p, &d[..d.len() - 4096]).unwrap();
            }),
        ),
        (
            "bmap-past-eof",
            ErrorKind::Corrupt,
            Box::new(|p| patch(p, |h| h.offset_bmap = 0x7fff_fe00)),
        ),
        (
            "bmap-in-header",
            ErrorKind::Invalid,
            Box::new(|p| patch(p, |h| h.offset_bmap = 0)),
        ),
        (
            "data-in-bmap",
            ErrorKind::Invalid,
            Box::new(|p| patch(p, |h| h.offset_data = 0x200)),
        ),
        (
            "block-size-2m",
            ErrorKind::Unsupported,
            Box::new(|p| patch(p, |h| h.block_size = 2 << 20)),
        ),
        (
            "block-size-0",
            ErrorKind::Unsupported,
            Box::new(|p| patch(p, |h| h.block_size = 0)),
        ),
        (
            "blocks-too-few",
            ErrorKind::Invalid,
            Box::new(|p| patch(p, |h| h.blocks_in_image = 1)),
        ),
        (
            "blocks-huge",
            ErrorKind::Unsupported,
            Box::new(|p| patch(p, |h| h.blocks_in_image = u32::MAX)),
        ),
        (
            "disk-size-huge-in-tiny-file",
            ErrorKind::Invalid,
            Box::new(|p| patch(p, |h| h.disk_size = 1 << 45)),
        ),
        (
            "disk-size-max",
            ErrorKind::Unsupported,
            Box::new(|p| patch(p, |h| h.disk_size = u64::MAX)),
        ),
        (
            "version-1.0",
            ErrorKind::Unsupported,
            Box::new(|p| patch(p, |h| h.version = 0x0001_0000)),
        ),
        (
            "signature",
            ErrorKind::Invalid,
            Box::new(|p| patch(p, |h| h.signature ^= 1)),
        ),
        (
            "type-diff",
            ErrorKind::Unsupported,
            Box::new(|p| patch(p, |h| h.image_type = 4)),
        ),
        (
            "link-uuid",
            ErrorKind::Unsupported,
            Box::new(|p| patch(p, |h| h.uuid_link = [7; 16])),
        ),
        (
            "sector-size",
            ErrorKind::Unsupported,
            Box::new(|p| patch(p, |h| h.sector_size = 4096)),
        ),
        (
            "empty-file",
            ErrorKind::Invalid,
            Box::new(|p| fs::write(p, b"").unwrap()),
        ),
    ];
    for (name, kind, f) in cases {
        let img = dir.path().join(format!("{name}.vdi"));
        fs::copy(&base, &img).unwrap();
        f(&img);
        let t = Instant::now();
        let e = open_image(&img, Some("vdi")).unwrap_err();
        assert_eq!(e.kind(), kind, "{name}: {e}");
        let out = dir.path().join("out.raw");
        assert_vimg_fails(&["convert", "-f", "vdi", "-O", "raw", s(&img), s(&out)]);
        assert!(!out.exists());
        assert!(t.elapsed().as_secs() < 5, "{name}");
    }
}

#[test]
fn truncated_fixtures_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let want = small_raw_sha256();
    for name in ["small.vdi", "small-static.vdi"] {
        let img = fixture(name, dir.path());
        assert_eq!(vimg_raw_sha256(&img, None, dir.path()), want, "{name}");
        let len = fs::metadata(&img).unwrap().len();
        let points = [
            0,
            1,
            0x40,
            0x1ff,
            0x200,
            0x300,
            len / 4,
            len / 2,
            3 * len / 4,
            len - 1,
        ];
        assert_cuts_fail_or_read(&img, "vdi", &points, Some(&want));
    }
}

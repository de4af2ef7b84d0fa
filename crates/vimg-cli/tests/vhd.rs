//! VHD (qemu's vpc) against qemu-img both ways, vhdiinfo, the fixed-footer probe, the Azure
//! recipe, qemu's creator-based size rule, the corpus, hostile images and truncated
//! fixtures.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;
use vimg::formats::vhd::header::{DynHeader, Footer, FOOTER_COOKIE};
use vimg::ErrorKind;

const MIB: u64 = 1 << 20;

fn qemu_info(img: &Path, fmt: Option<&str>) -> serde_json::Value {
    let mut args = vec!["info", "--output=json"];
    if let Some(f) = fmt {
        args.extend(["-f", f]);
    }
    args.push(s(img));
    json(&qemu_img(&args))
}

fn vimg_info(img: &Path, fmt: Option<&str>) -> serde_json::Value {
    let mut args = vec!["info", "--output=json"];
    if let Some(f) = fmt {
        args.extend(["-f", f]);
    }
    args.push(s(img));
    json(&vimg(&args))
}

/// Rewrites every footer of `img` (the copy at 0 if present, the one at the end) through
/// `f`, with the checksum recomputed.
fn patch_footers(img: &Path, f: impl Fn(&mut Footer)) {
    let mut d = fs::read(img).unwrap();
    let tail = d.len() - 512;
    for at in [0, tail] {
        if d[at..at + 8] != FOOTER_COOKIE {
            continue;
        }
        let mut footer = Footer::parse(&d[at..at + 512]).unwrap();
        f(&mut footer);
        footer.seal();
        footer.write_to(&mut d[at..at + 512]);
    }
    fs::write(img, d).unwrap();
}

/// Rewrites the dynamic header of `img` through `f`, checksum recomputed.
fn patch_header(img: &Path, f: impl Fn(&mut DynHeader)) {
    let mut d = fs::read(img).unwrap();
    let at = Footer::parse(&d[..512]).unwrap().data_offset as usize;
    let mut h = DynHeader::parse(&d[at..at + 1024]).unwrap();
    f(&mut h);
    h.seal();
    h.write_to(&mut d[at..at + 1024]);
    fs::write(img, d).unwrap();
}

fn bat_offset(img: &Path) -> usize {
    let d = fs::read(img).unwrap();
    let at = Footer::parse(&d[..512]).unwrap().data_offset as usize;
    DynHeader::parse(&d[at..at + 1024]).unwrap().table_offset as usize
}

fn bat_entry(img: &Path, i: usize) -> u32 {
    let d = fs::read(img).unwrap();
    let at = bat_offset(img) + 4 * i;
    u32::from_be_bytes(d[at..at + 4].try_into().unwrap())
}

fn set_bat_entry(img: &Path, i: usize, v: u32) {
    let mut d = fs::read(img).unwrap();
    let at = bat_offset(img) + 4 * i;
    d[at..at + 4].copy_from_slice(&v.to_be_bytes());
    fs::write(img, d).unwrap();
}

/// A dynamic VHD made by qemu-img from `raw` with `opts`.
fn qemu_vhd(raw: &Path, dst: &Path, opts: &str) {
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", "vpc"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(raw), s(dst)]);
    qemu_img(&args);
}

const OPTION_SETS: [&str; 4] = [
    "",
    "force_size=on",
    "subformat=fixed",
    "subformat=fixed,force_size=on",
];

#[test]
fn qemu_written_vhds_read_like_qemu() {
    if !qemu_available("qemu_written_vhds_read_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 24 * MIB + 4096);
    for opts in OPTION_SETS {
        let img = dir.path().join("q.vhd");
        let _ = fs::remove_file(&img);
        qemu_vhd(&src, &img, opts);
        assert_reads_like_qemu(&img, "vpc", dir.path());
        let q = qemu_info(&img, Some("vpc"));
        let v = vimg_info(&img, None);
        assert_eq!(v["format"], "vpc", "{opts}");
        for key in ["virtual-size", "cluster-size", "format-specific"] {
            assert_eq!(q[key], v[key], "{opts}: {key}");
        }
    }
}

#[test]
fn empty_images_of_odd_sizes_match_qemu() {
    if !qemu_available("empty_images_of_odd_sizes_match_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for size in ["1", "1000", "1M", "100M", "1000M", "127G", "200G", "2040G"] {
        for opts in [
            "",
            "force_size=on",
            "subformat=fixed",
            "subformat=fixed,force_size=on",
        ] {
            if opts.contains("fixed") && size.ends_with('G') {
                continue;
            }
            for who in ["qemu", "vimg"] {
                let img = dir.path().join(format!("{who}.vhd"));
                let _ = fs::remove_file(&img);
                let mut args = vec!["create", "-q", "-f", "vpc"];
                if !opts.is_empty() {
                    args.extend(["-o", opts]);
                }
                args.extend([s(&img), size]);
                if who == "qemu" {
                    qemu_img(&args);
                } else {
                    vimg(&args);
                }
                let q = qemu_info(&img, Some("vpc"));
                let v = vimg_info(&img, None);
                assert_eq!(q["virtual-size"], v["virtual-size"], "{who} {size} {opts}");
                assert_eq!(v["format"], "vpc", "{who} {size} {opts}");
            }
            let a = fs::metadata(dir.path().join("qemu.vhd")).unwrap().len();
            let b = fs::metadata(dir.path().join("vimg.vhd")).unwrap().len();
            assert_eq!(a, b, "file length for {size} {opts}");
        }
    }
}

#[test]
fn creator_size_rules_match_qemu() {
    if !qemu_available("creator_size_rules_match_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A 10 MiB disk rounds up to a CHS geometry a little bigger; current_size is then set
    // to exactly 10 MiB, so the two rules give different sizes. Data straddles 10 MiB.
    let src = dir.path().join("src.raw");
    let tail = pattern(64 << 10, 3);
    write_sparse_raw(
        &src,
        10 * MIB + (64 << 10),
        &[(10 * MIB - (32 << 10), &tail)],
    );
    let creators: [&[u8; 4]; 12] = [
        b"win ",
        b"vpc ",
        b"vpc\0",
        b"d2v ",
        b"d2v\0",
        b"qem2",
        b"qemu",
        b"CTXS",
        b"tap\0",
        b"wa\0\0",
        b"vbox",
        b"\0\0\0\0",
    ];
    for subformat in ["dynamic", "fixed"] {
        let base = dir.path().join(format!("base-{subformat}.vhd"));
        qemu_vhd(&src, &base, &format!("subformat={subformat}"));
        for creator in creators {
            for max_geometry in [false, true] {
                let img = dir.path().join("c.vhd");
                fs::copy(&base, &img).unwrap();
                patch_footers(&img, |f| {
                    f.creator_app = *creator;
                    f.current_size = 10 * MIB;
                    if max_geometry {
                        (f.cylinders, f.heads, f.sectors_per_track) = (65535, 16, 255);
                    }
                });
                let what = format!("{subformat} {creator:?} max={max_geometry}");
                let q = qemu_info(&img, Some("vpc"));
                let v = vimg_info(&img, Some("vpc"));
                assert_eq!(q["virtual-size"], v["virtual-size"], "{what}");
                // Content through -f vpc, identical to qemu's.
                let qo = dir.path().join("q.raw");
                let vo = dir.path().join("v.raw");
                qemu_img(&["convert", "-f", "vpc", "-O", "raw", s(&img), s(&qo)]);
                vimg(&["convert", "-f", "vpc", "-O", "raw", s(&img), s(&vo)]);
                assert_same_file(&qo, &vo);
            }
        }
    }
}

#[test]
fn fixed_vhd_is_probed_by_its_footer() {
    if !qemu_available("fixed_vhd_is_probed_by_its_footer") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 8 * MIB);
    let img = dir.path().join("fixed.vhd");
    qemu_vhd(&src, &img, "subformat=fixed,force_size=on");
    // qemu-img probes it as raw (and would carry the footer as 512 stray bytes).
    assert_eq!(qemu_info(&img, None)["format"], "raw");
    assert_eq!(vimg_info(&img, None)["format"], "vpc");
    let human = vimg(&["info", s(&img)]);
    assert!(human.contains("file format: vpc"), "{human}");
    let out = dir.path().join("out.raw");
    vimg(&["convert", "-O", "raw", s(&img), s(&out)]);
    assert_same_file(&src, &out);
    // -f raw takes the bytes as raw, footer included, as the user said.
    let out2 = dir.path().join("out2.raw");
    vimg(&["convert", "-f", "raw", "-O", "raw", s(&img), s(&out2)]);
    assert_eq!(fs::metadata(&out2).unwrap().len(), 8 * MIB + 512);
}

#[test]
fn polyglot_fixed_vhd_is_ambiguous() {
    if !qemu_available("polyglot_fixed_vhd_is_ambiguous") {
        return;
    }
    // A fixed VHD whose data starts with a real qcow2 header parses as both: refused
    // without -f.
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("h.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&q), "1M"]);
    let head = fs::read(&q).unwrap()[..512].to_vec();
    let src = dir.path().join("src.raw");
    write_sparse_raw(&src, 4 * MIB, &[(0, &head)]);
    let img = dir.path().join("poly.vhd");
    vimg(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed,force_size=on",
        s(&src),
        s(&img),
    ]);
    let err = assert_vimg_fails(&["info", s(&img)]);
    assert!(err.contains("ambiguous"), "{err}");
    assert_eq!(vimg_info(&img, Some("vpc"))["format"], "vpc");
}

#[test]
fn azure_recipe_keeps_the_exact_size() {
    if !qemu_available("azure_recipe_keeps_the_exact_size") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.raw");
    // 65 MiB: MiB-aligned, not a whole CHS geometry.
    mixed_raw(&src, 65 * MIB);
    let out = dir.path().join("out.vhd");
    vimg(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed,force_size=on",
        s(&src),
        s(&out),
    ]);
    let d = fs::read(&out).unwrap();
    assert_eq!(d.len() as u64, 65 * MIB + 512);
    let footer = Footer::parse(&d[d.len() - 512..]).unwrap();
    assert!(footer.checksum_ok());
    assert_eq!(footer.current_size, 65 * MIB);
    assert_eq!(footer.disk_type, 2);
    assert_eq!(&footer.creator_app, b"qem2");
    assert_eq!(qemu_info(&out, Some("vpc"))["virtual-size"], 65 * MIB);
    assert_eq!(vimg_info(&out, None)["virtual-size"], 65 * MIB);
    qemu_img(&["compare", "-f", "vpc", "-F", "raw", s(&out), s(&src)]);
    if tool_available("azure_recipe_keeps_the_exact_size", "vhdiinfo") {
        let info = run_ok("vhdiinfo", &[s(&out)]);
        assert!(info.contains(&format!("({} bytes)", 65 * MIB)), "{info}");
        assert!(info.contains("Fixed"), "{info}");
    }
    // Without force_size the size is rounded up to a CHS geometry: not what Azure wants.
    let out2 = dir.path().join("chs.vhd");
    vimg(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed",
        s(&src),
        s(&out2),
    ]);
    let v = vimg_info(&out2, None)["virtual-size"].as_u64().unwrap();
    assert!(v > 65 * MIB && !v.is_multiple_of(MIB), "{v}");
}

/// Checks that qemu-img and vhdiinfo accept a VHD vimg wrote, with `reference`'s content.
fn assert_accepted(img: &Path, reference: &Path, test: &str) {
    let q = qemu_info(img, Some("vpc"));
    let v = vimg_info(img, None);
    assert_eq!(v["format"], "vpc");
    assert_eq!(q["virtual-size"], v["virtual-size"]);
    if q["cluster-size"].is_null() {
        // Fixed: qemu-img probes raw, so compare through -f vpc.
        qemu_img(&["compare", "-f", "vpc", "-F", "raw", s(img), s(reference)]);
    } else {
        assert_qemu_accepts(img, "vpc", reference, "raw");
    }
    if tool_available(test, "vhdiinfo") {
        let info = run_ok("vhdiinfo", &[s(img)]);
        let size = v["virtual-size"].as_u64().unwrap();
        assert!(info.contains(&format!("({size} bytes)")), "{info}");
    }
}

#[test]
fn vimg_written_vhds_are_accepted_by_qemu_and_vhdiinfo() {
    if !qemu_available("vimg_written_vhds_are_accepted_by_qemu_and_vhdiinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 40 * MIB + 512);
    for opts in OPTION_SETS {
        let img = dir.path().join("v.vhd");
        let _ = fs::remove_file(&img);
        let mut args = vec!["convert", "-f", "raw", "-O", "vpc"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&src), s(&img)]);
        vimg(&args);
        assert_accepted(
            &img,
            &src,
            "vimg_written_vhds_are_accepted_by_qemu_and_vhdiinfo",
        );
        // And vimg reads back what it wrote, as qemu does.
        assert_reads_like_qemu(&img, "vpc", dir.path());
        // Empty images too.
        let empty = dir.path().join("e.vhd");
        let empty_raw = dir.path().join("e.raw");
        let _ = fs::remove_file(&empty);
        let mut args = vec!["create", "-q", "-f", "vpc"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&empty), "5M"]);
        vimg(&args);
        let size = vimg_info(&empty, None)["virtual-size"].as_u64().unwrap();
        write_sparse_raw(&empty_raw, size, &[]);
        assert_accepted(
            &empty,
            &empty_raw,
            "vimg_written_vhds_are_accepted_by_qemu_and_vhdiinfo",
        );
    }
}

#[test]
fn option_help_matches_qemu() {
    if !qemu_available("option_help_matches_qemu") {
        return;
    }
    // With a file name both list the protocol's options too.
    let q = qemu_img(&["create", "-f", "vpc", "-o", "help", "x"]);
    let v = vimg(&["create", "-f", "vpc", "-o", "help", "x"]);
    let q: Vec<&str> = q.lines().take_while(|l| !l.is_empty()).collect();
    let v: Vec<&str> = v.lines().take_while(|l| !l.is_empty()).collect();
    assert_eq!(q, v);
}

#[test]
fn round_trip_raw_vdi_vhd_raw() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 20 * MIB);
    let vdi = dir.path().join("a.vdi");
    let vhd = dir.path().join("b.vhd");
    let out = dir.path().join("c.raw");
    vimg(&["convert", "-O", "vdi", s(&src), s(&vdi)]);
    vimg(&[
        "convert",
        "-O",
        "vpc",
        "-o",
        "force_size=on",
        s(&vdi),
        s(&vhd),
    ]);
    vimg(&["convert", "-O", "raw", s(&vhd), s(&out)]);
    assert_same_file(&src, &out);
}

#[test]
fn check_and_measure() {
    if !qemu_available("check_and_measure") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 40 * MIB);
    let q = dir.path().join("q.vhd");
    qemu_vhd(&src, &q, "");
    // qemu-img cannot check vpc; vimg reports the allocation and finds nothing wrong.
    let out = run_cmd("qemu-img", &["check", s(&q)]);
    assert_eq!(out.status.code(), Some(63));
    let img = open_image(&q, None).unwrap();
    let r = img.reader().check().unwrap();
    assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0));
    let allocated = (0..r.total_clusters.unwrap() as usize)
        .filter(|i| bat_entry(&q, *i) != u32::MAX)
        .count() as u64;
    assert_eq!(r.allocated_clusters, Some(allocated));
    assert_eq!(r.image_end_offset, Some(fs::metadata(&q).unwrap().len()));
    // The two footer copies disagreeing is reported.
    let mut d = fs::read(&q).unwrap();
    let mut f = Footer::parse(&d[..512]).unwrap();
    f.timestamp ^= 1;
    f.seal();
    f.write_to(&mut d[..512]);
    fs::write(&q, d).unwrap();
    let r = open_image(&q, None).unwrap().reader().check().unwrap();
    assert_eq!(r.corruptions, 1);

    // measure: required covers what vimg then writes, within a block; fully-allocated is
    // exactly what a conversion that writes everything (-S 0) produces.
    let srcimg = open_image(&src, Some("raw")).unwrap();
    let data = vimg::engine::ImageData::new(&srcimg);
    for opts in OPTION_SETS {
        let mut o = vimg::CreateOptions::new();
        o.parse_into(opts).unwrap();
        let m = vimg::Format::Vpc
            .driver()
            .measure(srcimg.virtual_size(), &o, Some(&data))
            .unwrap();
        let out = dir.path().join("m.vhd");
        let _ = fs::remove_file(&out);
        let mut args = vec!["convert", "-O", "vpc"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&src), s(&out)]);
        vimg(&args);
        let actual = fs::metadata(&out).unwrap().len();
        assert!(m.required >= actual, "{opts}: {} < {actual}", m.required);
        assert!(
            m.required - actual <= 4 * (2 * MIB + 512),
            "{opts}: {} vs {actual}",
            m.required
        );
        let _ = fs::remove_file(&out);
        args.insert(1, "-S");
        args.insert(2, "0");
        vimg(&args);
        // Everything the source covers is allocated; without force_size the disk is a
        // little bigger than the source (CHS rounding), and that tail stays unallocated.
        let full = fs::metadata(&out).unwrap().len();
        assert!(m.fully_allocated >= full, "{opts}");
        assert!(m.fully_allocated - full <= 2 * MIB + 512, "{opts}");
    }
}

fn vpc_rows(corpus: &Path) -> Vec<Row> {
    corpus_rows(corpus, &[".vhd", "afl5.img"])
}

#[test]
fn corpus_vhds_give_the_expected_answer() {
    let Some(corpus) = corpus_dir() else { return };
    if !can_run("bzip2") || !can_run("xz") || !can_run("gzip") {
        skipped_line(format_args!(
            "SKIPPED corpus_vhds_give_the_expected_answer: bzip2/xz/gzip missing"
        ));
        return;
    }
    let rows = vpc_rows(&corpus);
    assert!(rows.len() >= 11, "found only {} vpc rows", rows.len());
    for row in rows {
        let dir = tempfile::tempdir().unwrap();
        let img = corpus_file(&corpus, &row, dir.path());
        let name = row.file.as_str();
        let t = Instant::now();
        if name.ends_with("fat-differential.vhd.xz") {
            // qemu ignores the missing parent; vimg must say it is missing.
            let err =
                assert_vimg_fails(&["convert", "-O", "raw", s(&img), s(&dir.path().join("o"))]);
            assert!(
                err.contains("fat-parent.vhd") && err.contains("No such file"),
                "{err}"
            );
            let e = open_image(&img, None).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io, "{e}");
            let info = vimg_info(&img, None);
            assert_eq!(info["backing-filename"], "./fat-parent.vhd");
            assert_eq!(info["virtual-size"], row.virtual_size.unwrap());
            continue;
        }
        if row.answer.starts_with("ERROR") {
            let err =
                assert_vimg_fails(&["convert", "-O", "raw", s(&img), s(&dir.path().join("o"))]);
            if row.answer.contains("checksum") {
                assert!(err.contains("checksum"), "{name}: {err}");
            }
            let e = open_image(&img, Some("vpc")).unwrap_err();
            assert!(
                matches!(e.kind(), ErrorKind::Invalid | ErrorKind::Corrupt),
                "{name}: {e}"
            );
            continue;
        }
        let image = open_image(&img, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(image.format(), vimg::Format::Vpc, "{name}");
        assert_eq!(Some(image.virtual_size()), row.virtual_size, "{name}");
        let digest = corpus_digest(&corpus, name).unwrap();
        assert_eq!(image_digest(&image), digest, "{name}");
        if image.virtual_size() <= 16 * MIB {
            // Small enough for the full raw conversion, with and without -f.
            let sha = row.sha256.clone().unwrap();
            assert_eq!(vimg_raw_sha256(&img, None, dir.path()), sha, "{name}");
            assert_eq!(
                vimg_raw_sha256(&img, Some("vpc"), dir.path()),
                sha,
                "{name}"
            );
        }
        assert!(t.elapsed().as_secs() < 30, "{name} took {:?}", t.elapsed());
    }
}

#[test]
fn virtual_pc_images_are_sized_by_chs_as_qemu_does() {
    // libvhdi says 136365211648 (current_size); Virtual PC's guest, and qemu, see the CHS
    // size. vimg follows qemu (see the vhd module docs).
    let Some(corpus) = corpus_dir() else { return };
    if !can_run("bzip2") {
        return;
    }
    let row = vpc_rows(&corpus)
        .into_iter()
        .find(|r| r.file.ends_with("virtualpc-dynamic.vhd.bz2"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = corpus_file(&corpus, &row, dir.path());
    assert_eq!(vimg_info(&img, None)["virtual-size"], 136363130880u64);
}

/// Builds a differencing VHD in `dir` from a qemu-made dynamic one: some data of its own
/// (block 0, first MiB), and `locators` (code, data).
fn make_differencing(dir: &Path, name: &str, locators: &[(&[u8; 4], Vec<u8>)]) -> PathBuf {
    let img = dir.join(name);
    qemu_create(&img, "vpc", "force_size=on", "4M");
    qemu_io("vpc", &img, &["write -P 0x11 0 1M"]);
    let mut d = fs::read(&img).unwrap();
    let footer = d.split_off(d.len() - 512);
    let mut entries = Vec::new();
    for (code, data) in locators {
        let at = d.len() as u64;
        d.extend_from_slice(data);
        d.resize(d.len().div_ceil(512) * 512 + 512, 0);
        entries.push((**code, data.len() as u32, at));
    }
    d.extend_from_slice(&footer);
    fs::write(&img, d).unwrap();
    patch_footers(&img, |f| f.disk_type = 4);
    patch_header(&img, |h| {
        for (i, (code, len, at)) in entries.iter().enumerate() {
            h.locators[i].platform_code = *code;
            h.locators[i].data_space = 512;
            h.locators[i].data_length = *len;
            h.locators[i].data_offset = *at;
        }
    });
    img
}

/// A parent locator to write: platform code and data.
type Locator<'a> = (&'a [u8; 4], Vec<u8>);

#[test]
fn parent_locator_escapes_are_refused() {
    if !qemu_available("parent_locator_escapes_are_refused") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let secret = root.path().join("secret");
    let imgs = root.path().join("img");
    fs::create_dir(&secret).unwrap();
    fs::create_dir(&imgs).unwrap();
    // The parent the attacker wants to read: a fixed VHD full of 0x5a.
    let parent = secret.join("parent.vhd");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed,force_size=on",
        s(&parent),
        "4M",
    ]);
    qemu_io("vpc", &parent, &["write -P 0x5a 0 4M"]);
    std::os::unix::fs::symlink(&parent, imgs.join("link.vhd")).unwrap();
    let abs = parent.display().to_string();
    let cases: Vec<(&str, Vec<Locator>)> = vec![
        (
            "w2ru-dotdot",
            vec![(b"W2ru", utf16le("../secret/parent.vhd"))],
        ),
        (
            "w2ru-backslash",
            vec![(b"W2ru", utf16le("..\\secret\\parent.vhd"))],
        ),
        ("w2ku-absolute", vec![(b"W2ku", utf16le(&abs))]),
        ("w2ku-passwd", vec![(b"W2ku", utf16le("/etc/passwd"))]),
        (
            "macx-passwd",
            vec![(b"MacX", b"file:///etc/passwd".to_vec())],
        ),
        ("symlink", vec![(b"W2ru", utf16le(".\\link.vhd"))]),
        (
            "both",
            vec![
                (b"W2ru", utf16le("..\\secret\\parent.vhd")),
                (b"W2ku", utf16le(&abs)),
            ],
        ),
    ];
    for (name, locs) in cases {
        let child = make_differencing(&imgs, &format!("{name}.vhd"), &locs);
        let t = Instant::now();
        let e = open_image(&child, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{name}: {e}");
        let out = imgs.join("out.raw");
        let err = assert_vimg_fails(&["convert", "-O", "raw", s(&child), s(&out)]);
        assert!(err.contains("parent locator"), "{name}: {err}");
        // Nothing of the parent reached an output: there is no output at all.
        assert!(!out.exists(), "{name}");
        assert!(
            fs::read_dir(&imgs).unwrap().all(|e| {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                n.ends_with(".vhd")
            }),
            "{name}: temporaries left"
        );
        // info still shows what the image names, without opening it.
        let info = vimg_info(&child, None);
        assert!(!info["vimg-external-references"]
            .as_array()
            .unwrap()
            .is_empty());
        assert!(t.elapsed().as_secs() < 5);
    }
    // The setup is real: trusting the image reads the parent's bytes.
    let child = imgs.join("w2ku-absolute.vhd");
    let out = imgs.join("trusted.raw");
    vimg(&[
        "convert",
        "--allow-external",
        "-O",
        "raw",
        s(&child),
        s(&out),
    ]);
    // The child's block 0 (2 MiB: qemu sets every bitmap bit) is its own; the rest is
    // the parent's.
    let d = fs::read(&out).unwrap();
    assert!(d[..MIB as usize].iter().all(|b| *b == 0x11));
    assert!(d[MIB as usize..2 * MIB as usize].iter().all(|b| *b == 0));
    assert!(d[2 * MIB as usize..].iter().all(|b| *b == 0x5a));
}

#[test]
fn parent_next_to_the_image_is_read() {
    if !qemu_available("parent_next_to_the_image_is_read") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("base.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", s(&parent), "4M"]);
    qemu_io("vpc", &parent, &["write -P 0x22 0 4M"]);
    let child = make_differencing(
        dir.path(),
        "child.vhd",
        &[
            (b"W2ku", utf16le("C:\\vms\\base.vhd")),
            (b"W2ru", utf16le(".\\base.vhd")),
        ],
    );
    let out = dir.path().join("out.raw");
    vimg(&["convert", "-O", "raw", s(&child), s(&out)]);
    // The child's block 0 (2 MiB: qemu sets every bitmap bit) is its own; the rest is
    // the parent's.
    let d = fs::read(&out).unwrap();
    assert!(d[..MIB as usize].iter().all(|b| *b == 0x11));
    assert!(d[MIB as usize..2 * MIB as usize].iter().all(|b| *b == 0));
    assert!(d[2 * MIB as usize..].iter().all(|b| *b == 0x22));
    let info = vimg_info(&child, None);
    assert_eq!(info["backing-filename"], "./base.vhd");
    assert_eq!(info["backing-filename-format"], "vpc");
    // qemu reads the same file ignoring the parent: zeros after the child's data.
    let q = dir.path().join("q.raw");
    qemu_img(&["convert", "-f", "vpc", "-O", "raw", s(&child), s(&q)]);
    assert!(fs::read(&q).unwrap()[MIB as usize..]
        .iter()
        .all(|b| *b == 0));
}

/// A qemu-made dynamic VHD with 3 allocated blocks, for patching.
fn hostile_base(dir: &Path) -> PathBuf {
    let src = dir.join("src.raw");
    mixed_raw(&src, 8 * MIB);
    let img = dir.join("base.vhd");
    qemu_vhd(&src, &img, "force_size=on");
    img
}

#[test]
fn hostile_vhds_fail_cleanly() {
    if !qemu_available("hostile_vhds_fail_cleanly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = hostile_base(dir.path());
    let allocated = bat_entry(&base, 0);
    assert_ne!(allocated, u32::MAX);
    type Patch = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, ErrorKind, Patch)> = vec![
        (
            "bat-past-eof",
            ErrorKind::Corrupt,
            Box::new(|p| set_bat_entry(p, 1, 0x0fff_ffff)),
        ),
        (
            "bat-into-header",
            ErrorKind::Corrupt,
            Box::new(|p| set_bat_entry(p, 1, 1)),
        ),
        (
            "bat-into-bat",
            ErrorKind::Corrupt,
            Box::new(|p| set_bat_entry(p, 1, 3)),
        ),
        (
            "bat-two-at-one-block",
            ErrorKind::Corrupt,
            Box::new(move |p| set_bat_entry(p, 2, allocated)),
        ),
        (
            "max-table-entries-huge",
            ErrorKind::Corrupt,
            Box::new(|p| patch_header(p, |h| h.max_table_entries = 1_073_741_825)),
        ),
        (
            "max-table-entries-small",
            ErrorKind::Invalid,
            Box::new(|p| patch_header(p, |h| h.max_table_entries = 1)),
        ),
        (
            "block-size-3m",
            ErrorKind::Invalid,
            Box::new(|p| patch_header(p, |h| h.block_size = 3 << 20)),
        ),
        (
            "block-size-0",
            ErrorKind::Invalid,
            Box::new(|p| patch_header(p, |h| h.block_size = 0)),
        ),
        (
            "table-offset-huge",
            ErrorKind::Corrupt,
            Box::new(|p| patch_header(p, |h| h.table_offset = u64::MAX - 3)),
        ),
        (
            "header-offset-huge",
            ErrorKind::Corrupt,
            Box::new(|p| patch_footers(p, |f| f.data_offset = 1 << 62)),
        ),
        (
            "disk-type-7",
            ErrorKind::Invalid,
            Box::new(|p| patch_footers(p, |f| f.disk_type = 7)),
        ),
        (
            "size-3-tib",
            ErrorKind::Unsupported,
            Box::new(|p| patch_footers(p, |f| f.current_size = 3 << 40)),
        ),
        (
            "size-2-tib-tiny-bat",
            ErrorKind::Invalid,
            Box::new(|p| patch_footers(p, |f| f.current_size = 2000 << 30)),
        ),
        (
            "footer-checksums",
            ErrorKind::Invalid,
            Box::new(|p| {
                let mut d = fs::read(p).unwrap();
                let n = d.len();
                d[0x30] ^= 1;
                d[n - 512 + 0x30] ^= 1;
                fs::write(p, d).unwrap();
            }),
        ),
        (
            "header-checksum",
            ErrorKind::Invalid,
            Box::new(|p| {
                let mut d = fs::read(p).unwrap();
                d[0x200 + 0x20] ^= 0x40;
                fs::write(p, d).unwrap();
            }),
        ),
        (
            "empty-file",
            ErrorKind::Invalid,
            Box::new(|p| fs::write(p, b"").unwrap()),
        ),
        (
            "zeros",
            ErrorKind::Invalid,
            Box::new(|p| fs::write(p, vec![0u8; 4096]).unwrap()),
        ),
    ];
    for (name, kind, patch) in cases {
        let img = dir.path().join(format!("{name}.vhd"));
        fs::copy(&base, &img).unwrap();
        patch(&img);
        let t = Instant::now();
        let e = open_image(&img, Some("vpc")).unwrap_err();
        assert_eq!(e.kind(), kind, "{name}: {e}");
        let out = dir.path().join("out.raw");
        assert_vimg_fails(&["convert", "-f", "vpc", "-O", "raw", s(&img), s(&out)]);
        assert!(!out.exists());
        assert!(t.elapsed().as_secs() < 5, "{name}");
    }
}

#[test]
fn truncated_fixtures_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let want = small_raw_sha256();
    for name in ["small.vhd", "small-fixed.vhd"] {
        let img = fixture(name, dir.path());
        assert_eq!(vimg_raw_sha256(&img, None, dir.path()), want, "{name}");
        let len = fs::metadata(&img).unwrap().len();
        let points = [
            0,
            1,
            100,
            511,
            1000,
            1600,
            len / 4,
            len / 2,
            3 * len / 4,
            len - 600,
        ];
        assert_cuts_fail_or_read(&img, "vpc", &points, Some(&want));
    }
}

//! raw read and write against qemu-img, and the convert basics every format relies on.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::*;

#[test]
fn raw_to_raw_keeps_content_and_holes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 64 << 20);
    let dst = dir.path().join("dst.raw");
    vimg(&["convert", "-f", "raw", "-O", "raw", s(&src), s(&dst)]);
    assert_same_file(&src, &dst);
    let used = fs::metadata(&dst).unwrap().blocks() * 512;
    // 1 MiB random + 2 MiB text + 3000 bytes; the written zeros and the holes stay holes.
    assert!(used <= 4 << 20, "output uses {used} bytes");
}

#[test]
fn sparse_zero_writes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 16 << 20);
    let dst = dir.path().join("full.raw");
    vimg(&["convert", "-S", "0", "-O", "raw", s(&src), s(&dst)]);
    assert_same_file(&src, &dst);
    let used = fs::metadata(&dst).unwrap().blocks() * 512;
    assert!(used >= 16 << 20, "output uses only {used} bytes");
}

#[test]
fn bad_sparse_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    write_sparse_raw(&src, 1 << 20, &[]);
    let out = vimg_raw(&[
        "convert",
        "-S",
        "100",
        "-O",
        "raw",
        s(&src),
        s(&dir.path().join("x")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!dir.path().join("x").exists());
}

#[test]
fn preallocation_modes() {
    let dir = tempfile::tempdir().unwrap();
    for mode in ["off", "falloc", "full"] {
        let p = dir.path().join(format!("{mode}.raw"));
        let o = format!("preallocation={mode}");
        vimg(&["create", "-q", "-f", "raw", "-o", &o, s(&p), "8M"]);
        let m = fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 8 << 20);
        if mode == "off" {
            assert!(m.blocks() * 512 < 1 << 20);
        } else {
            assert!(m.blocks() * 512 >= 8 << 20, "{mode}: {}", m.blocks());
        }
    }
}

#[test]
fn destination_that_is_the_source_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 8 << 20);
    let before = sha256_file(&src);
    let link = dir.path().join("link.raw");
    std::os::unix::fs::symlink(&src, &link).unwrap();
    let hard = dir.path().join("hard.raw");
    fs::hard_link(&src, &hard).unwrap();
    for dst in [&src, &link, &hard] {
        let out = vimg_raw(&["convert", "-O", "raw", s(&src), s(dst)]);
        assert_eq!(out.status.code(), Some(1), "{}", dst.display());
        assert!(String::from_utf8_lossy(&out.stderr).contains("same file"));
    }
    assert_eq!(sha256_file(&src), before);
}

#[test]
fn failed_convert_leaves_existing_destination_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("dst.raw");
    fs::write(&dst, b"precious").unwrap();
    let out = vimg_raw(&[
        "convert",
        "-O",
        "raw",
        s(&dir.path().join("missing")),
        s(&dst),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("vimg: Could not open '"), "{err}");
    assert_eq!(fs::read(&dst).unwrap(), b"precious");
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporaries left"
    );
}

#[test]
fn unknown_option_and_format_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    write_sparse_raw(&src, 1 << 20, &[]);
    let out = vimg_raw(&[
        "convert",
        "-O",
        "raw",
        "-o",
        "foo=1",
        s(&src),
        s(&dir.path().join("x")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "vimg: Invalid parameter 'foo'"
    );
    let out = vimg_raw(&["convert", "-O", "nope", s(&src), s(&dir.path().join("x"))]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "vimg: Unknown file format 'nope'"
    );
    assert!(!dir.path().join("x").exists());
}

#[test]
fn raw_info_matches_qemu() {
    if !qemu_available("raw_info_matches_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 16 << 20);
    let q: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", s(&src)])).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&vimg(&["info", "--output=json", s(&src)])).unwrap();
    for key in [
        "virtual-size",
        "filename",
        "format",
        "actual-size",
        "dirty-flag",
    ] {
        assert_eq!(q[key], v[key], "{key}");
    }
    let qh = qemu_img(&["info", s(&src)]);
    let vh = vimg(&["info", s(&src)]);
    assert_eq!(qh, vh);
}

#[test]
fn qemu_reads_vimg_raw() {
    if !qemu_available("qemu_reads_vimg_raw") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 16 << 20);
    let dst = dir.path().join("dst.raw");
    vimg(&["convert", "-O", "raw", s(&src), s(&dst)]);
    assert_qemu_accepts(&dst, "raw", &src, "raw");
    assert_reads_like_qemu(&src, "raw", dir.path());
}

/// Every cache mode qemu-img accepts converts to the same bytes; `-t unsafe` (no fsync)
/// still leaves no temporary file behind, for one file and for a multi-file output.
#[test]
fn every_cache_mode_converts_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    mixed_raw(&src, 8 << 20);
    for mode in [
        "none",
        "off",
        "writeback",
        "writethrough",
        "directsync",
        "unsafe",
    ] {
        let out = d.join(format!("out-{mode}.raw"));
        vimg(&[
            "convert",
            "-t",
            mode,
            "-T",
            mode,
            "-O",
            "raw",
            s(&src),
            s(&out),
        ]);
        assert_same_file(&src, &out);
    }
    let flat = d.join("flat.vmdk");
    vimg(&[
        "convert",
        "-t",
        "unsafe",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&src),
        s(&flat),
    ]);
    let back = d.join("back.raw");
    vimg(&["convert", "-O", "raw", s(&flat), s(&back)]);
    assert_same_file(&src, &back);
    let leftovers: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

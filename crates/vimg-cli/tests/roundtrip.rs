//! Content survives trips through every format, and backing chains of mixed formats read as
//! qemu-img reads them.

mod common;

use std::path::Path;

use common::*;

#[test]
fn raw_through_every_format_and_back() {
    if !qemu_available("raw_through_every_format_and_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    mixed_raw(&src, 48 << 20);
    let want = sha256_file(&src);
    // (format, -o options, file name)
    let steps: [(&str, &str, &str); 7] = [
        ("vmdk", "subformat=streamOptimized", "1.vmdk"),
        ("vdi", "", "2.vdi"),
        ("qcow2", "compression_type=zstd", "3.qcow2"),
        ("vhdx", "", "4.vhdx"),
        ("vpc", "force_size=on", "5.vhd"),
        ("vmdk", "subformat=twoGbMaxExtentSparse", "6.vmdk"),
        ("qcow2", "compat=0.10,cluster_size=4k", "7.qcow2"),
    ];
    let mut prev = src.clone();
    for (i, (fmt, opts, name)) in steps.iter().enumerate() {
        let out = d.join(name);
        let mut args = vec!["convert", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        // Compress one step on the way, as a user would for an upload.
        if i == 2 {
            args.push("-c");
        }
        args.extend([s(&prev), s(&out)]);
        vimg(&args);
        assert_qemu_accepts(&out, fmt, &src, "raw");
        prev = out;
    }
    let back = d.join("back.raw");
    vimg(&["convert", "-O", "raw", s(&prev), s(&back)]);
    assert_eq!(sha256_file(&back), want);
}

/// Converts `img` with both tools, flattening its chain, and compares the raw bytes.
fn flattens_like_qemu(img: &Path, dir: &Path) {
    let q = dir.join("q.raw");
    let v = dir.join("v.raw");
    qemu_img(&["convert", "-O", "raw", s(img), s(&q)]);
    vimg(&["convert", "-O", "raw", s(img), s(&v)]);
    assert_same_file(&q, &v);
    let _ = std::fs::remove_file(&q);
    let _ = std::fs::remove_file(&v);
}

#[test]
fn backing_chains_of_mixed_formats() {
    if !qemu_available("backing_chains_of_mixed_formats") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // vmdk <- qcow2 <- qcow2, each layer writing over the one below.
    qemu_img(&["create", "-q", "-f", "vmdk", s(&d.join("base.vmdk")), "32M"]);
    qemu_io(
        "vmdk",
        &d.join("base.vmdk"),
        &["write -P 1 0 4M", "write -P 2 20M 1M"],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        s(&d.join("mid.qcow2")),
    ]);
    qemu_io(
        "qcow2",
        &d.join("mid.qcow2"),
        &["write -P 3 1M 1M", "write -z 20M 512k"],
    );
    qcow2_overlay(&d.join("top.qcow2"), "mid.qcow2", "", Some("40M"));
    qemu_io(
        "qcow2",
        &d.join("top.qcow2"),
        &["write -P 4 1536k 64k", "write -P 5 36M 1M"],
    );
    flattens_like_qemu(&d.join("top.qcow2"), d);
    // vhdx and vpc bases under a qcow2 overlay.
    for (fmt, name) in [
        ("vhdx", "base.vhdx"),
        ("vpc", "base.vhd"),
        ("vdi", "base.vdi"),
    ] {
        qemu_img(&["create", "-q", "-f", fmt, s(&d.join(name)), "16M"]);
        qemu_io(
            fmt,
            &d.join(name),
            &["write -P 7 0 3M", "write -P 8 10M 65k"],
        );
        let over = d.join(format!("over-{name}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            name,
            "-F",
            fmt,
            s(&over),
            "20M",
        ]);
        qemu_io("qcow2", &over, &["write -P 9 2M 2M", "write -z 10M 4k"]);
        flattens_like_qemu(&over, d);
    }
}

//! QED read against qemu-img: images qemu-img makes (qemu-io patterns, zero clusters,
//! backing files) read and map byte-identically; the image-service block says why a QED is
//! unsafe; hostile tables are refused before anything is written.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

fn qed(dir: &Path, name: &str, opts: &str, size: &str, io: &[&str]) -> PathBuf {
    let img = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qed"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&img), size]);
    qemu_img(&args);
    if !io.is_empty() {
        qemu_io("qed", &img, io);
    }
    img
}

#[test]
fn reads_qemu_made_images_like_qemu() {
    if !qemu_available("qed reads_qemu_made_images_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let io = [
        "write -P 0xaa 0 64k",
        "write -z 1M 64k",
        "write -P 0xbb 5M 4k",
        "write -P 0xcc 7000k 200k",
    ];
    for (i, opts) in [
        "",
        "cluster_size=4k",
        "cluster_size=1M,table_size=16",
        "table_size=2",
    ]
    .iter()
    .enumerate()
    {
        let img = qed(d, &format!("q{i}.qed"), opts, "10M", &io);
        assert_reads_like_qemu(&img, "qed", d);
        let q = qemu_img(&["map", "--output=json", "-f", "qed", s(&img)]);
        let v = vimg(&["map", "--output=json", s(&img)]);
        assert_eq!(json(&v), json(&q), "map of {opts:?}");
        vimg(&["check", s(&img)]);
    }
}

#[test]
fn backing_files_read_like_qemu() {
    if !qemu_available("qed backing_files_read_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = qed(d, "base.qed", "", "10M", &["write -P 0x11 0 3M"]);
    let top = d.join("top.qed");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        "base.qed",
        "-F",
        "qed",
        s(&top),
    ]);
    qemu_io("qed", &top, &["write -P 0x22 1M 64k", "write -z 2M 64k"]);
    assert_reads_like_qemu(&top, "qed", d);
    // A raw backing file the image says not to probe.
    let raw = d.join("base.raw");
    write_sparse_raw(&raw, 10 << 20, &[(0, &pattern(1 << 20, 3))]);
    let top2 = d.join("top2.qed");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&top2),
    ]);
    qemu_io("qed", &top2, &["write -P 0x33 512k 4k"]);
    assert_reads_like_qemu(&top2, "qed", d);
    let info = json(&vimg(&["info", "--output=json", s(&top)]));
    assert_eq!(info["backing-filename"], "base.qed");
    assert_eq!(info["image-service"]["safe"], false);
    let _ = base;
}

#[test]
fn image_service_says_why_qed_is_unsafe() {
    if !qemu_available("image_service_says_why_qed_is_unsafe") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = qed(dir.path(), "x.qed", "", "4M", &[]);
    let info = json(&vimg(&["info", "--output=json", s(&img)]));
    assert_eq!(info["format"], "qed");
    assert_eq!(info["image-service"]["safe"], false, "{info}");
    let text = vimg(&["info", s(&img)]);
    assert!(text.contains("format inspector"), "{text}");
}

#[test]
fn hostile_tables_are_refused() {
    if !qemu_available("qed hostile_tables_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = qed(
        d,
        "base.qed",
        "cluster_size=4k,table_size=2",
        "8M",
        &["write -P 0xaa 0 8k"],
    );
    let b = fs::read(&base).unwrap();
    let l1 = u64::from_le_bytes(b[0x28..0x30].try_into().unwrap()) as usize;
    let l2 = u64::from_le_bytes(b[l1..l1 + 8].try_into().unwrap()) as usize;
    let cases: Vec<(&str, usize, u64)> = vec![
        ("l1-past-eof", 0x28, 1 << 40),
        ("l1-in-header", 0x28, 0),
        ("l2-past-eof", l1, 1 << 40),
        ("l2-is-l1", l1, l1 as u64),
        ("data-past-eof", l2, 1 << 40),
        ("data-misaligned", l2, 4096 * 3 + 7),
        ("data-is-l2", l2, l2 as u64),
        (
            "data-twice",
            l2 + 16,
            u64::from_le_bytes(b[l2..l2 + 8].try_into().unwrap()),
        ),
        ("unknown-feature", 0x10, 0x100),
    ];
    for (name, at, v) in cases {
        let img = d.join(format!("{name}.qed"));
        let mut x = b.clone();
        x[at..at + 8].copy_from_slice(&v.to_le_bytes());
        fs::write(&img, x).unwrap();
        let out = d.join("out.raw");
        let err = assert_vimg_fails(&["convert", "-O", "raw", s(&img), s(&out)]);
        assert!(err.contains("QED"), "{name}: {err}");
        assert!(!out.exists(), "{name}");
    }
}

#[test]
fn writes_what_qemu_writes() {
    if !qemu_available("qed writes_what_qemu_writes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("src.raw");
    mixed_raw(&raw, 24 << 20);
    for opts in [
        "",
        "cluster_size=4k,table_size=2",
        "cluster_size=1M,table_size=16",
    ] {
        let (q, v) = (d.join("q.qed"), d.join("v.qed"));
        let mut qa = vec!["convert", "-f", "raw", "-O", "qed"];
        if !opts.is_empty() {
            qa.extend(["-o", opts]);
        }
        let mut va = qa.clone();
        qa.extend([s(&raw), s(&q)]);
        va.extend(["-m", "4", s(&raw), s(&v)]);
        qemu_img(&qa);
        vimg(&va);
        // The same content and a clean check; the same bytes too where qemu-img's
        // requests and vimg's writes cover the same clusters.
        qemu_img(&["compare", "-f", "qed", "-F", "raw", s(&v), s(&raw)]);
        let out = run_cmd("qemu-img", &["check", "-f", "qed", s(&v)]);
        assert!(
            out.status.success(),
            "qemu-img check {opts:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        vimg(&["check", s(&v)]);
        if opts.is_empty() || opts.starts_with("cluster_size=4k") {
            assert_same_file(&q, &v);
        }
        let _ = (fs::remove_file(&q), fs::remove_file(&v));
    }
}

#[test]
fn create_is_qemu_img_create() {
    if !qemu_available("qed create_is_qemu_img_create") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qed(d, "base.qed", "", "10M", &[]);
    for (size, opts) in [
        ("10M", ""),
        ("1000", ""),
        ("5T", "cluster_size=1M"),
        ("7M", "cluster_size=4k,table_size=8"),
        ("10M", "backing_file=base.qed,backing_fmt=qed"),
        ("10M", "backing_file=base.qed,backing_fmt=raw"),
    ] {
        let (q, v) = (d.join("q.qed"), d.join("v.qed"));
        let mut qa = vec!["create", "-f", "qed"];
        if !opts.is_empty() {
            qa.extend(["-o", opts]);
        }
        let mut va = qa.clone();
        qa.push(s(&q));
        va.push(s(&v));
        if !size.is_empty() {
            qa.push(size);
            va.push(size);
        }
        let qo = qemu_img(&qa);
        let vo = vimg(&va);
        assert_eq!(vo.replace("v.qed", "q.qed"), qo, "{opts}");
        assert_same_file(&q, &v);
        let _ = (fs::remove_file(&q), fs::remove_file(&v));
    }
    assert_eq!(
        vimg(&["create", "-f", "qed", "-o", "help"]),
        qemu_img(&["create", "-f", "qed", "-o", "help"])
    );
    for opts in [
        "cluster_size=3000",
        "cluster_size=128M",
        "table_size=3",
        "table_size=32",
    ] {
        let v = d.join("bad.qed");
        assert_vimg_fails(&["create", "-f", "qed", "-o", opts, s(&v), "10M"]);
        assert!(!v.exists());
    }
}

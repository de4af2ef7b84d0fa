//! qcow2 against qemu-img both ways: images qemu-img writes read byte-identical; images vimg
//! writes pass `qemu-img compare` and `qemu-img check`, with qemu-img's sizes; `info`,
//! `check` and `measure` give qemu-img's answers; hostile images fail with the right kind of
//! error; the shared corpus reads as its manifest says.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use vimg::formats::qcow2::header::{Header, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED};
use vimg::{ErrorKind, Format, Image, OpenOptions};

// ---------------------------------------------------------------------------------------
// Helpers

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A 16 MiB raw image with random, text-like and zero data.
fn src16(d: &Path) -> PathBuf {
    let p = d.join("src.raw");
    if !p.exists() {
        mixed_raw(&p, 16 << 20);
    }
    p
}

fn qemu_qcow2(src: &Path, dst: &Path, args: &[&str]) {
    let mut a = vec!["convert", "-q", "-O", "qcow2"];
    a.extend_from_slice(args);
    a.push(s(src));
    a.push(s(dst));
    qemu_in(dst.parent().unwrap(), &a);
}

fn vimg_qcow2(src: &Path, dst: &Path, args: &[&str]) {
    let mut a = vec!["convert", "-O", "qcow2"];
    a.extend_from_slice(args);
    a.push(s(src));
    a.push(s(dst));
    vimg(&a);
}

fn rd64(p: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u64::from_be_bytes(b)
}

fn wr64(p: &Path, off: u64, v: u64) {
    patch(p, off, &v.to_be_bytes());
}

fn wr32(p: &Path, off: u64, v: u32) {
    patch(p, off, &v.to_be_bytes());
}

/// Where a qcow2 image keeps its tables.
struct Layout {
    h: Header,
    cs: u64,
    /// The L2 table of L1 entry 0.
    l2: u64,
    /// Refcount block 0.
    refblock: u64,
}

fn layout(p: &Path) -> Layout {
    let head = fs::read(p).unwrap();
    let h = Header::parse(&head[..head.len().min(4096)]).unwrap();
    let cs = h.cluster_size();
    let l2 = rd64(p, h.l1_table_offset) & L1E_OFFSET_MASK;
    let refblock = rd64(p, h.refcount_table_offset) & !0x1ff;
    Layout {
        h,
        cs,
        l2,
        refblock,
    }
}

fn open(p: &Path, format: Option<Format>) -> vimg::Result<Image> {
    Image::open(p, &OpenOptions::with_format(format))
}

/// Opens `p` and reads every guest byte through vimg.
fn read_all_as(p: &Path, format: Option<Format>) -> vimg::Result<()> {
    let img = open(p, format)?;
    let size = img.virtual_size();
    let mut pos = 0u64;
    let mut buf = Vec::new();
    while pos < size {
        let (e, _, _) = img.map_flat(pos, size - pos)?;
        if e.kind.has_data() {
            let mut at = pos;
            while at < e.end() {
                let n = (e.end() - at).min(4 << 20);
                buf.resize(n as usize, 0);
                img.read_at(&mut buf, at)?;
                at += n;
            }
        }
        pos = e.end();
    }
    Ok(())
}

fn read_all(p: &Path) -> vimg::Result<()> {
    read_all_as(p, None)
}

/// Asserts reading `p` fails with `kind` and a message containing `needle`, and that
/// `vimg convert` fails too (exit 1, no output left behind).
fn assert_refused(p: &Path, kind: ErrorKind, needle: &str) {
    let e = read_all(p).expect_err("hostile image was accepted");
    assert_eq!(e.kind(), kind, "{e}");
    let msg = e.to_string();
    assert!(msg.contains(needle), "'{needle}' not in: {msg}");
    let out = p.with_extension("out");
    let r = vimg_raw(&["convert", "-O", "raw", s(p), s(&out)]);
    assert_eq!(
        r.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(!out.exists());
}

/// Checks `p` with vimg and qemu-img and asserts the same counts.
fn assert_check_like_qemu(p: &Path) -> vimg::CheckReport {
    let q = std::process::Command::new("qemu-img")
        .args(["check", "--output=json", s(p)])
        .current_dir(p.parent().unwrap())
        .output()
        .unwrap();
    let qj: Value = serde_json::from_slice(&q.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&q.stdout),
            String::from_utf8_lossy(&q.stderr)
        )
    });
    let img = Image::open(p, &OpenOptions::default().open_backing(false)).unwrap();
    let r = img.reader().check().unwrap();
    let v = serde_json::to_value(&r).unwrap();
    for key in [
        "image-end-offset",
        "total-clusters",
        "check-errors",
        "allocated-clusters",
        "fragmented-clusters",
        "compressed-clusters",
        "corruptions",
        "leaks",
    ] {
        let zero = Value::from(0);
        assert_eq!(
            qj.get(key).unwrap_or(&zero),
            v.get(key).unwrap_or(&zero),
            "{key} of {}: qemu {qj} vimg {v}",
            p.display()
        );
    }
    // qemu-img's exit codes: 0 clean, 1 check errors, 2 corruptions, 3 leaks only.
    let code = if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    };
    assert_eq!(q.status.code(), Some(code), "{}", p.display());
    r
}

/// [`assert_reads_like_qemu`] for images whose data file qemu-img must find: qemu-img runs
/// in the image's folder.
fn assert_reads_like_qemu_in_dir(img: &Path) {
    let dir = img.parent().unwrap();
    let q = dir.join("qemu.raw");
    let v = dir.join("vimg.raw");
    qemu_in(dir, &["convert", "-O", "raw", s(img), s(&q)]);
    vimg(&["convert", "-O", "raw", s(img), s(&v)]);
    assert_same_file(&q, &v);
    fs::remove_file(q).unwrap();
    fs::remove_file(v).unwrap();
}

/// [`assert_qemu_accepts`] with qemu-img running in the image's folder.
fn assert_qemu_accepts_in_dir(img: &Path, reference: &Path) {
    let dir = img.parent().unwrap();
    qemu_in(
        dir,
        &["compare", "-f", "qcow2", "-F", "raw", s(img), s(reference)],
    );
    qemu_in(dir, &["check", s(img)]);
}

// ---------------------------------------------------------------------------------------
// Reading what qemu-img writes

#[test]
fn reads_v2_and_v3_like_qemu() {
    if !qemu_available("reads_v2_and_v3_like_qemu") {
        return;
    }
    let d = tmp();
    let src = src16(d.path());
    for (name, opts) in [
        ("v3.qcow2", vec![]),
        ("v2.qcow2", vec!["-o", "compat=0.10"]),
    ] {
        let img = d.path().join(name);
        qemu_qcow2(&src, &img, &opts);
        assert_reads_like_qemu(&img, "qcow2", d.path());
    }
}

#[test]
fn reads_every_cluster_size_like_qemu() {
    if !qemu_available("reads_every_cluster_size_like_qemu") {
        return;
    }
    let d = tmp();
    let src = src16(d.path());
    for cs in ["512", "4k", "64k", "2M"] {
        let img = d.path().join(format!("cs{cs}.qcow2"));
        qemu_qcow2(&src, &img, &["-o", &format!("cluster_size={cs}")]);
        assert_reads_like_qemu(&img, "qcow2", d.path());
    }
}

#[test]
fn reads_compressed_zlib_and_zstd_like_qemu() {
    if !qemu_available("reads_compressed_zlib_and_zstd_like_qemu") {
        return;
    }
    let d = tmp();
    let src = src16(d.path());
    for (name, opts) in [
        ("zlib.qcow2", vec!["-c"]),
        ("zstd.qcow2", vec!["-c", "-o", "compression_type=zstd"]),
        ("zlib4k.qcow2", vec!["-c", "-o", "cluster_size=4k"]),
        (
            "zstd2m.qcow2",
            vec!["-c", "-o", "compression_type=zstd,cluster_size=2M"],
        ),
    ] {
        let img = d.path().join(name);
        qemu_qcow2(&src, &img, &opts);
        assert_reads_like_qemu(&img, "qcow2", d.path());
    }
}

#[test]
fn reads_refcount_widths_and_preallocation_like_qemu() {
    if !qemu_available("reads_refcount_widths_and_preallocation_like_qemu") {
        return;
    }
    let d = tmp();
    let src = src16(d.path());
    for (i, o) in [
        "refcount_bits=1",
        "refcount_bits=64",
        "preallocation=metadata",
        "preallocation=metadata,extended_l2=on",
        "lazy_refcounts=on",
    ]
    .iter()
    .enumerate()
    {
        let img = d.path().join(format!("r{i}.qcow2"));
        qemu_qcow2(&src, &img, &["-o", o]);
        assert_reads_like_qemu(&img, "qcow2", d.path());
    }
}

#[test]
fn reads_extended_l2_subclusters_like_qemu() {
    if !qemu_available("reads_extended_l2_subclusters_like_qemu") {
        return;
    }
    let d = tmp();
    let base = d.path().join("base.raw");
    write_sparse_raw(&base, 8 << 20, &[(0, &vec![0x11u8; 8 << 20])]);
    let img = d.path().join("ext.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&img),
    ]);
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0x22 0 2k",
            "write -P 0x33 6k 3k",
            "write -z 16k 4k",
            "write -z 64k 64k",
            "write -P 0x44 130k 1k",
            "discard 200k 8k",
            "write -z -u 300k 64k",
            "write -P 0x55 1M 64k",
        ],
    );
    assert_reads_like_qemu(&img, "qcow2", d.path());
    // Subcluster runs come back merged as qemu-img map merges them.
    let q = json(&qemu_img(&["map", "--output=json", s(&img)]));
    let top = open(&img, None).unwrap();
    for run in q.as_array().unwrap() {
        let start = run["start"].as_u64().unwrap();
        let len = run["length"].as_u64().unwrap();
        let (e, _, depth) = top.map_flat(start, len).unwrap();
        assert_eq!((e.start.get(), e.len), (start, len), "run {run}");
        assert_eq!(depth as u64, run["depth"].as_u64().unwrap(), "run {run}");
    }
    assert_check_like_qemu(&img);
}

#[test]
fn reads_three_level_chain_of_mixed_formats() {
    if !qemu_available("reads_three_level_chain_of_mixed_formats") {
        return;
    }
    let d = tmp();
    // A raw base shorter than the rest of the chain: past its end the chain reads zeros.
    let base = d.path().join("base.raw");
    write_sparse_raw(
        &base,
        4 << 20,
        &[(0, &pattern(1 << 20, 1)), (3 << 20, &pattern(1 << 20, 2))],
    );
    let mid = d.path().join("mid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=4k",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
        "6M",
    ]);
    qemu_io(
        "qcow2",
        &mid,
        &["write -P 0x61 512k 1M", "write -P 0x62 4M 512k"],
    );
    let top = d.path().join("top.qcow2");
    qcow2_overlay(&top, "mid.qcow2", "", Some("8M"));
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x71 0 64k",
            "write -z 3M 128k",
            "write -P 0x72 7M 100k",
        ],
    );
    assert_reads_like_qemu(&top, "qcow2", d.path());
    let info = json(&vimg(&[
        "info",
        "--output=json",
        "--backing-chain",
        s(&top),
    ]));
    let chain = info.as_array().unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[2]["format"], "raw");
}

#[test]
fn reads_a_backing_file_name_anywhere_in_the_first_cluster() {
    if !qemu_available("reads_a_backing_file_name_anywhere_in_the_first_cluster") {
        return;
    }
    let d = tmp();
    let base = d.path().join("base.raw");
    write_sparse_raw(&base, 1 << 20, &[(4096, &pattern(8192, 8))]);
    let ov = d.path().join("ov.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&ov),
    ]);
    // Move the name from right after the extensions to 12 KiB into the header cluster.
    let h = layout(&ov).h;
    let mut name = vec![0u8; h.backing_file_size as usize];
    fs::File::open(&ov)
        .unwrap()
        .read_exact_at(&mut name, h.backing_file_offset)
        .unwrap();
    patch(&ov, h.backing_file_offset, &vec![0u8; name.len()]);
    patch(&ov, 0x3000, &name);
    wr64(&ov, 8, 0x3000);
    assert_reads_like_qemu(&ov, "qcow2", d.path());
}

#[test]
fn reads_unaligned_virtual_sizes_like_qemu() {
    if !qemu_available("reads_unaligned_virtual_sizes_like_qemu") {
        return;
    }
    let d = tmp();
    let src = d.path().join("odd.raw");
    let size = (5 << 20) + 12345u64;
    write_sparse_raw(
        &src,
        size,
        &[(0, &pattern(70000, 3)), (size - 5000, &pattern(5000, 4))],
    );
    for (name, opts) in [
        ("odd.qcow2", vec![]),
        ("odd-c.qcow2", vec!["-c"]),
        ("odd-2m.qcow2", vec!["-o", "cluster_size=2M"]),
    ] {
        let img = d.path().join(name);
        qemu_qcow2(&src, &img, &opts);
        assert_reads_like_qemu(&img, "qcow2", d.path());
    }
}

#[test]
fn reads_external_data_files_like_qemu() {
    if !qemu_available("reads_external_data_files_like_qemu") {
        return;
    }
    let d = tmp();
    let src = src16(d.path());
    for (name, o) in [
        ("df.qcow2", "data_file=df.bin"),
        ("dfr.qcow2", "data_file=dfr.bin,data_file_raw=on"),
    ] {
        let img = d.path().join(name);
        qemu_qcow2(&src, &img, &["-o", o]);
        assert_reads_like_qemu_in_dir(&img);
        let v = json(&vimg(&["info", "--output=json", s(&img)]));
        let refs = v["vimg-external-references"].as_array().unwrap();
        assert_eq!(refs[0]["field"], "data_file");
        assert_eq!(refs[0]["role"], "data");
    }
}

#[test]
fn reads_zero_clusters_and_snapshots_like_qemu() {
    if !qemu_available("reads_zero_clusters_and_snapshots_like_qemu") {
        return;
    }
    let d = tmp();
    let src = src16(d.path());
    let img = d.path().join("snap.qcow2");
    qemu_qcow2(&src, &img, &[]);
    qemu_img(&["snapshot", "-c", "first", s(&img)]);
    // The active layer moves on: convert reads it, not the snapshot.
    qemu_io("qcow2", &img, &["write -P 0x99 0 128k", "write -z 4M 1M"]);
    qemu_img(&["snapshot", "-c", "second", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 0x98 64k 64k"]);
    assert_reads_like_qemu(&img, "qcow2", d.path());
    let q = json(&qemu_img(&["info", "--output=json", s(&img)]));
    let v = json(&vimg(&["info", "--output=json", s(&img)]));
    assert_eq!(q["snapshots"], v["snapshots"]);
    assert_check_like_qemu(&img);
}

#[test]
fn sixteen_tib_sparse_image_maps_in_a_few_extents() {
    if !qemu_available("sixteen_tib_sparse_image_maps_in_a_few_extents") {
        return;
    }
    let d = tmp();
    let img = d.path().join("huge.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16T"]);
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 1 0 64k",
            "write -P 2 8T 64k",
            "write -P 3 16383G 1M",
        ],
    );
    let t = std::time::Instant::now();
    let im = open(&img, None).unwrap();
    let size = im.virtual_size();
    let mut pos = 0;
    let mut n = 0;
    while pos < size {
        let (e, _, _) = im.map_flat(pos, size - pos).unwrap();
        pos = e.end();
        n += 1;
    }
    assert_eq!(n, 6);
    assert!(t.elapsed().as_secs_f64() < 2.0, "took {:?}", t.elapsed());
    // And a qcow2 -> qcow2 copy of it costs what its data costs.
    let out = d.path().join("copy.qcow2");
    vimg_qcow2(&img, &out, &[]);
    assert_qemu_accepts(&out, "qcow2", &img, "qcow2");
}

// ---------------------------------------------------------------------------------------
// Writing what qemu-img reads

#[test]
fn every_write_variant_passes_qemu_compare_and_check_with_qemus_size() {
    if !qemu_available("every_write_variant_passes_qemu_compare_and_check_with_qemus_size") {
        return;
    }
    let d = tmp();
    let src = src16(d.path());
    let variants: &[(&str, &[&str], f64)] = &[
        ("default", &[], 0.01),
        ("v2", &["-o", "compat=0.10"], 0.01),
        ("cs512", &["-o", "cluster_size=512"], 0.01),
        ("cs4k", &["-o", "cluster_size=4k"], 0.01),
        ("cs2m", &["-o", "cluster_size=2M"], 0.01),
        ("rc1", &["-o", "refcount_bits=1"], 0.01),
        ("rc64", &["-o", "refcount_bits=64"], 0.01),
        ("lazy", &["-o", "lazy_refcounts=on"], 0.01),
        ("extl2", &["-o", "extended_l2=on"], 0.01),
        ("prealloc", &["-o", "preallocation=metadata"], 0.01),
        ("falloc", &["-o", "preallocation=falloc"], 0.01),
        ("full", &["-o", "preallocation=full"], 0.01),
        // Compressed output: vimg's deflate level trades a few percent of size for speed.
        ("zlib", &["-c"], 0.05),
        ("zstd", &["-c", "-o", "compression_type=zstd"], 0.01),
        ("zlib4k", &["-c", "-o", "cluster_size=4k"], 0.05),
        ("zlib-rc1", &["-c", "-o", "refcount_bits=1"], 0.05),
        ("zlib-v2", &["-c", "-o", "compat=0.10"], 0.05),
    ];
    for (name, args, tolerance) in variants {
        let v = d.path().join(format!("{name}.v.qcow2"));
        let q = d.path().join(format!("{name}.q.qcow2"));
        vimg_qcow2(&src, &v, args);
        qemu_qcow2(&src, &q, args);
        assert_qemu_accepts(&v, "qcow2", &src, "raw");
        let (vs, qs) = (size_of(&v) as f64, size_of(&q) as f64);
        assert!(
            (vs - qs).abs() <= qs * tolerance,
            "{name}: vimg {vs} bytes, qemu-img {qs} bytes"
        );
        // vimg reads its own output like qemu-img does.
        assert_reads_like_qemu(&v, "qcow2", d.path());
        fs::remove_file(&q).unwrap();
        fs::remove_file(&v).unwrap();
    }
}

#[test]
fn create_writes_the_same_bytes_as_qemu_img() {
    if !qemu_available("create_writes_the_same_bytes_as_qemu_img") {
        return;
    }
    let d = tmp();
    let base = d.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "100M"]);
    for (i, o) in [
        "",
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=2M,refcount_bits=64",
        "extended_l2=on",
        "lazy_refcounts=on",
        "compression_type=zstd",
        "preallocation=metadata",
        "data_file=data.bin",
        "data_file=data.bin,data_file_raw=on",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "cluster_size=1k,backing_file=base.qcow2,backing_fmt=qcow2",
    ]
    .iter()
    .enumerate()
    {
        let q = d.path().join(format!("q{i}.qcow2"));
        let v = d.path().join(format!("v{i}.qcow2"));
        let mut qa = vec!["create", "-q", "-f", "qcow2"];
        let mut va = vec!["create", "-q", "-f", "qcow2"];
        if !o.is_empty() {
            qa.extend(["-o", o]);
            va.extend(["-o", o]);
        }
        qa.extend([s(&q), "100M"]);
        va.extend([s(&v), "100M"]);
        qemu_in(d.path(), &qa);
        let _ = fs::remove_file(d.path().join("data.bin"));
        vimg(&va);
        assert_same_file(&q, &v);
    }
}

#[test]
fn create_with_backing_file_and_convert_top_only_keep_the_chain() {
    if !qemu_available("create_with_backing_file_and_convert_top_only_keep_the_chain") {
        return;
    }
    let d = tmp();
    let base = d.path().join("base.raw");
    write_sparse_raw(&base, 8 << 20, &[(0, &pattern(8 << 20, 5))]);
    // vimg create -b: the size comes from the backing file.
    let ov = d.path().join("ov.qcow2");
    vimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&ov),
    ]);
    let q = json(&qemu_img(&["info", "--output=json", s(&ov)]));
    assert_eq!(q["backing-filename"], "base.raw");
    assert_eq!(q["backing-filename-format"], "raw");
    assert_eq!(q["virtual-size"], 8 << 20);
    qemu_img(&["compare", s(&ov), s(&base)]);
    // A top image with data, zeros over backing data, and holes; copied top-only (as
    // convert -B does) into an overlay of the same base, in v3 (zero clusters) and v2
    // (zeros written as data).
    let top = d.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&top),
    ]);
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x42 0 192k",
            "write -z 1M 256k",
            "write -P 0 3M 64k",
        ],
    );
    for compat in ["1.1", "0.10"] {
        let out = d.path().join(format!("out-{compat}.qcow2"));
        let src = open(&top, None).unwrap();
        let mut co = vimg::ConvertOptions::new(Format::Qcow2);
        co.create = vimg::CreateOptions::new()
            .with("backing_file", "base.raw")
            .with("backing_fmt", "raw")
            .with("compat", compat);
        co.copy.mode = vimg::CopyMode::TopOnly;
        vimg::convert(&src, &out, &co).unwrap();
        qemu_img(&["compare", s(&top), s(&out)]);
        assert_check_like_qemu(&out);
        // Unallocated stays unallocated: the base shows through at 2 MiB.
        let map = json(&qemu_img(&["map", "--output=json", s(&out)]));
        let at2m = map
            .as_array()
            .unwrap()
            .iter()
            .find(|r| {
                let s = r["start"].as_u64().unwrap();
                s <= 2 << 20 && 2 << 20 < s + r["length"].as_u64().unwrap()
            })
            .unwrap()
            .clone();
        assert_eq!(at2m["depth"], 1, "{map}");
    }
}

#[test]
fn writes_external_data_files() {
    if !qemu_available("writes_external_data_files") {
        return;
    }
    let d = tmp();
    let src = src16(d.path());
    for (name, o) in [
        ("df.qcow2", "data_file=df.bin"),
        ("dfr.qcow2", "data_file=dfr.bin,data_file_raw=on"),
    ] {
        let v = d.path().join(name);
        vimg_qcow2(&src, &v, &["-o", o]);
        assert_qemu_accepts_in_dir(&v, &src);
        assert_reads_like_qemu_in_dir(&v);
    }
    // A raw data file is the disk itself.
    assert_same_file(&d.path().join("dfr.bin"), &src);
}

#[test]
fn writes_unaligned_virtual_sizes() {
    if !qemu_available("writes_unaligned_virtual_sizes") {
        return;
    }
    let d = tmp();
    let src = d.path().join("odd.raw");
    let size = (3 << 20) + 777u64;
    write_sparse_raw(
        &src,
        size,
        &[(0, &pattern(100000, 6)), (size - 3000, &pattern(3000, 7))],
    );
    for (name, args) in [
        ("a", vec![]),
        ("b", vec!["-c"]),
        ("c", vec!["-o", "cluster_size=2M,extended_l2=on"]),
    ] {
        let v = d.path().join(format!("{name}.qcow2"));
        vimg_qcow2(&src, &v, &args);
        assert_qemu_accepts(&v, "qcow2", &src, "raw");
    }
}

#[test]
fn bad_create_options_are_refused_before_anything_is_written() {
    let d = tmp();
    let out = d.path().join("x.qcow2");
    for (o, msg) in [
        ("cluster_size=1000", "power of two"),
        ("cluster_size=4M", "power of two"),
        ("refcount_bits=3", "power of two"),
        ("compat=0.10,refcount_bits=8", "compatibility level"),
        ("compat=0.10,lazy_refcounts=on", "Lazy refcounts"),
        ("extended_l2=on,cluster_size=4k", "16384"),
        ("compat=0.10,compression_type=zstd", "compatibility level"),
        ("compat=2", "Invalid compatibility level"),
        ("preallocation=all", "preallocation"),
        (
            "encrypt.format=luks",
            "Parameter 'encrypt.key-secret' is required for cipher",
        ),
        (
            "encrypt.format=aes",
            "Parameter 'encrypt.key-secret' is required for cipher",
        ),
        ("backing_fmt=raw", "without backing file"),
        // qemu-img opens the backing file first (it does not exist here).
        ("backing_file=x.raw", "Could not open backing image"),
        ("data_file_raw=on", "requires data-file"),
    ] {
        let r = vimg_raw(&["create", "-q", "-f", "qcow2", "-o", o, s(&out), "1G"]);
        assert_eq!(r.status.code(), Some(1), "{o}");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(msg), "{o}: {err}");
        assert!(!out.exists(), "{o}");
    }
    let r = vimg_raw(&["create", "-q", "-f", "qcow2", s(&out), "1E"]);
    assert_eq!(r.status.code(), Some(1));
    let help = vimg(&["create", "-f", "qcow2", "-o", "help", s(&out), "1G"]);
    for key in [
        "backing_file",
        "backing_fmt",
        "cluster_size",
        "compat",
        "compression_type",
        "data_file",
        "data_file_raw",
        "encrypt.format",
        "encryption",
        "extended_l2",
        "lazy_refcounts",
        "preallocation",
        "refcount_bits",
        "size",
    ] {
        assert!(
            help.contains(&format!("  {key}=")),
            "{key} missing from:\n{help}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// info, check, measure

const INFO_KEYS: [&str; 11] = [
    "virtual-size",
    "filename",
    "format",
    "actual-size",
    "dirty-flag",
    "cluster-size",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "snapshots",
    "format-specific",
];

fn assert_info_and_human_like_qemu(img: &Path) {
    assert_info_like_qemu(img, &INFO_KEYS);
    // The human output is qemu-img's, then vimg's own lines (external references, the
    // image-service verdict) after it.
    let qh = qemu_in(img.parent().unwrap(), &["info", s(img)]);
    let vh = vimg(&["info", s(img)]);
    assert!(
        vh.starts_with(&qh),
        "{}: vimg's human info does not start with qemu-img's:\n{vh}\n---\n{qh}",
        img.display()
    );
}

#[test]
fn info_matches_qemu() {
    if !qemu_available("info_matches_qemu") {
        return;
    }
    let d = tmp();
    let src = src16(d.path());
    let mut imgs = Vec::new();
    for (name, args) in [
        ("q-v3.qcow2", vec![]),
        ("q-v2.qcow2", vec!["-o", "compat=0.10"]),
        ("q-zstd.qcow2", vec!["-c", "-o", "compression_type=zstd"]),
        (
            "q-ext.qcow2",
            vec!["-o", "extended_l2=on,lazy_refcounts=on,refcount_bits=8"],
        ),
        ("q-df.qcow2", vec!["-o", "data_file=q-df.bin"]),
    ] {
        let p = d.path().join(name);
        qemu_qcow2(&src, &p, &args);
        imgs.push(p);
        let p = d.path().join(name.replacen("q-", "v-", 1));
        let args: Vec<String> = args.iter().map(|a| a.replace("q-df", "v-df")).collect();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        vimg_qcow2(&src, &p, &refs);
        imgs.push(p);
    }
    // A backing file, snapshots, bitmaps, the dirty and corrupt bits.
    let ov = d.path().join("ov.qcow2");
    qcow2_overlay(&ov, "q-v3.qcow2", "", None);
    imgs.push(ov);
    let sn = d.path().join("snap.qcow2");
    qemu_qcow2(&src, &sn, &[]);
    qemu_img(&["snapshot", "-c", "one", s(&sn)]);
    qemu_img(&["bitmap", "--add", s(&sn), "bm0"]);
    qemu_img(&["bitmap", "--add", "-g", "1M", "--disable", s(&sn), "bm1"]);
    imgs.push(sn);
    let dirty = d.path().join("dirty.qcow2");
    qemu_qcow2(&src, &dirty, &["-o", "lazy_refcounts=on"]);
    wr64(&dirty, 72, 1);
    imgs.push(dirty);
    let corrupt = d.path().join("corrupt.qcow2");
    qemu_qcow2(&src, &corrupt, &[]);
    wr64(&corrupt, 72, 2);
    imgs.push(corrupt.clone());
    for img in &imgs {
        assert_info_and_human_like_qemu(img);
    }
    // The corrupt bit is readable, with a warning.
    let r = vimg_raw(&[
        "convert",
        "-O",
        "raw",
        s(&corrupt),
        s(&d.path().join("c.raw")),
    ]);
    assert!(r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("corrupt"));
}

#[test]
fn check_counts_match_qemu_on_clean_images() {
    if !qemu_available("check_counts_match_qemu_on_clean_images") {
        return;
    }
    let d = tmp();
    let src = src16(d.path());
    for (name, args) in [
        ("a", vec![]),
        ("b", vec!["-c"]),
        ("c", vec!["-o", "compat=0.10,cluster_size=4k"]),
        ("d", vec!["-o", "extended_l2=on,refcount_bits=1"]),
        ("e", vec!["-o", "refcount_bits=64,preallocation=metadata"]),
        ("f", vec!["-o", "data_file=f.bin"]),
    ] {
        for writer in ["qemu", "vimg"] {
            let p = d.path().join(format!("{name}-{writer}.qcow2"));
            let args: Vec<String> = args
                .iter()
                .map(|a| a.replace("f.bin", &format!("f-{writer}.bin")))
                .collect();
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            if writer == "qemu" {
                qemu_qcow2(&src, &p, &refs);
            } else {
                vimg_qcow2(&src, &p, &refs);
            }
            let r = assert_check_like_qemu(&p);
            assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0));
        }
    }
}

/// A fresh 16 MiB image qemu-img made, with its layout.
fn patchable(d: &Path, name: &str, args: &[&str]) -> (PathBuf, Layout) {
    let src = src16(d);
    let p = d.join(name);
    qemu_qcow2(&src, &p, args);
    let l = layout(&p);
    (p, l)
}

#[test]
fn check_counts_match_qemu_on_leaky_and_corrupt_images() {
    if !qemu_available("check_counts_match_qemu_on_leaky_and_corrupt_images") {
        return;
    }
    let d = tmp();
    // 16-bit refcounts: entry i of refcount block 0 is at refblock + 2 i.
    type Patch = Box<dyn Fn(&Path, &Layout)>;
    let cases: Vec<(&str, Patch)> = vec![
        (
            "leak",
            Box::new(|p, l| {
                // One more cluster at the end of the file with refcount 1 and no user.
                let end = size_of(p).div_ceil(l.cs) * l.cs;
                patch(p, end, &vec![0u8; l.cs as usize]);
                let c = end / l.cs;
                patch(p, l.refblock + 2 * c, &[0, 1]);
            }),
        ),
        (
            "refcount-too-high",
            Box::new(|p, l| {
                let c = (rd64(p, l.l2) & L2E_OFFSET_MASK) / l.cs;
                patch(p, l.refblock + 2 * c, &[0, 2]);
            }),
        ),
        (
            "refcount-zero",
            Box::new(|p, l| {
                let c = (rd64(p, l.l2) & L2E_OFFSET_MASK) / l.cs;
                patch(p, l.refblock + 2 * c, &[0, 0]);
            }),
        ),
        (
            "l2-refcount-zero",
            Box::new(|p, l| patch(p, l.refblock + 2 * (l.l2 / l.cs), &[0, 0])),
        ),
        ("shared", Box::new(|p, l| wr64(p, l.l2 + 8, rd64(p, l.l2)))),
        (
            "unaligned",
            Box::new(|p, l| wr64(p, l.l2, rd64(p, l.l2) + 512)),
        ),
        (
            "reserved",
            Box::new(|p, l| wr64(p, l.l2, rd64(p, l.l2) | 1 << 58)),
        ),
        (
            "past-eof",
            Box::new(|p, l| {
                let far = (size_of(p).div_ceil(l.cs) + 100) * l.cs;
                wr64(p, l.l2, far | 1 << 63);
            }),
        ),
        (
            "into-l1",
            Box::new(|p, l| wr64(p, l.l2, l.h.l1_table_offset | 1 << 63)),
        ),
        (
            "copied-flag",
            Box::new(|p, l| wr64(p, l.l2, rd64(p, l.l2) & !(1 << 63))),
        ),
        (
            "reftable-unaligned",
            Box::new(|p, l| wr64(p, l.h.refcount_table_offset, l.refblock + 512)),
        ),
    ];
    for (name, f) in &cases {
        for args in [&[][..], &["-c"][..]] {
            let (p, l) = patchable(d.path(), &format!("{name}{}.qcow2", args.len()), args);
            f(&p, &l);
            assert_check_like_qemu(&p);
        }
    }
}

#[test]
fn measure_matches_qemu() {
    if !qemu_available("measure_matches_qemu") {
        return;
    }
    let d = tmp();
    let src = src16(d.path());
    let q3 = d.path().join("q3.qcow2");
    qemu_qcow2(&src, &q3, &[]);
    qemu_img(&["bitmap", "--add", s(&q3), "b"]);
    let q2 = d.path().join("q2.qcow2");
    qemu_qcow2(&src, &q2, &["-o", "compat=0.10"]);
    let qc = d.path().join("qc.qcow2");
    qemu_qcow2(&src, &qc, &["-c"]);
    let driver = Format::Qcow2.driver();
    let check = |q: Value, m: vimg::formats::Measure| {
        assert_eq!(q["required"], m.required, "{q}");
        assert_eq!(q["fully-allocated"], m.fully_allocated, "{q}");
        assert_eq!(q.get("bitmaps").and_then(Value::as_u64), m.bitmaps, "{q}");
    };
    for (size, o) in [
        ("1G", ""),
        ("1G", "cluster_size=512"),
        ("16T", "cluster_size=2M,refcount_bits=1"),
        ("100M", "extended_l2=on"),
        ("1000001", "preallocation=full"),
        ("7G", "compat=0.10,preallocation=metadata"),
    ] {
        let mut args = vec!["measure", "--output=json", "-O", "qcow2", "--size", size];
        if !o.is_empty() {
            args.extend(["-o", o]);
        }
        let q = json(&qemu_img(&args));
        let mut opts = vimg::CreateOptions::new();
        opts.parse_into(o).unwrap();
        let n = vimg::options::parse_size(size).unwrap();
        check(q, driver.measure(n, &opts, None).unwrap());
    }
    for (img, o) in [
        (&src, ""),
        (&q3, ""),
        (&q3, "compat=0.10"),
        (&q2, ""),
        (&qc, "cluster_size=4k,extended_l2=off"),
        (&q3, "backing_file=x,backing_fmt=raw"),
        (&q3, "extended_l2=on,cluster_size=16k"),
    ] {
        let mut args = vec!["measure", "--output=json", "-O", "qcow2"];
        if !o.is_empty() {
            args.extend(["-o", o]);
        }
        args.push(s(img));
        let q = json(&qemu_img(&args));
        let mut opts = vimg::CreateOptions::new();
        opts.parse_into(o).unwrap();
        let image = open(img, None).unwrap();
        let data = vimg::engine::ImageData::new(&image);
        check(
            q,
            driver
                .measure(image.virtual_size(), &opts, Some(&data))
                .unwrap(),
        );
    }
}

// ---------------------------------------------------------------------------------------
// Hostile images: one per strict-table rule

fn hostile(name: &str, f: impl Fn(&Path, &Layout)) -> (tempfile::TempDir, PathBuf) {
    let d = tmp();
    let (p, l) = patchable(d.path(), name, &[]);
    f(&p, &l);
    (d, p)
}

#[test]
fn l2_entry_past_the_end_of_the_file_is_refused() {
    if !qemu_available("l2_entry_past_the_end_of_the_file_is_refused") {
        return;
    }
    let (_d, p) = hostile("eof.qcow2", |p, l| {
        wr64(
            p,
            l.l2,
            ((size_of(p).div_ceil(l.cs) + 16) * l.cs) | (1 << 63),
        )
    });
    assert_refused(&p, ErrorKind::Corrupt, "past the end of the file");
}

#[test]
fn l1_entry_pointing_at_the_l1_table_itself_is_refused() {
    if !qemu_available("l1_entry_pointing_at_the_l1_table_itself_is_refused") {
        return;
    }
    let (_d, p) = hostile("l1self.qcow2", |p, l| {
        wr64(p, l.h.l1_table_offset, l.h.l1_table_offset | 1 << 63)
    });
    assert_refused(&p, ErrorKind::Corrupt, "L1 table entry 0");
}

#[test]
fn l2_entry_pointing_into_metadata_is_refused() {
    if !qemu_available("l2_entry_pointing_into_metadata_is_refused") {
        return;
    }
    for (i, target) in ["header", "refcount table", "refcount block", "itself"]
        .iter()
        .enumerate()
    {
        let (_d, p) = hostile(&format!("meta{i}.qcow2"), |p, l| {
            let at = match *target {
                "header" => 0,
                "refcount table" => l.h.refcount_table_offset,
                "refcount block" => l.refblock,
                _ => l.l2,
            };
            wr64(p, l.l2, at | 1 << 63);
        });
        let needle = if *target == "header" {
            "header"
        } else {
            "metadata"
        };
        assert_refused(&p, ErrorKind::Corrupt, needle);
    }
}

#[test]
fn reserved_bits_are_refused() {
    if !qemu_available("reserved_bits_are_refused") {
        return;
    }
    let (_d, p) = hostile("l1res.qcow2", |p, l| {
        wr64(
            p,
            l.h.l1_table_offset,
            rd64(p, l.h.l1_table_offset) | 1 << 57,
        )
    });
    assert_refused(&p, ErrorKind::Corrupt, "reserved bits");
    let (_d, p) = hostile("l2res.qcow2", |p, l| wr64(p, l.l2, rd64(p, l.l2) | 1 << 60));
    assert_refused(&p, ErrorKind::Corrupt, "reserved bits");
    let (_d, p) = hostile("l2res0.qcow2", |p, l| wr64(p, l.l2, rd64(p, l.l2) | 1 << 4));
    assert_refused(&p, ErrorKind::Corrupt, "reserved bits");
}

#[test]
fn unaligned_entries_are_refused() {
    if !qemu_available("unaligned_entries_are_refused") {
        return;
    }
    let (_d, p) = hostile("l2ua.qcow2", |p, l| wr64(p, l.l2, rd64(p, l.l2) + 0x200));
    assert_refused(&p, ErrorKind::Corrupt, "not cluster aligned");
    let (_d, p) = hostile("l1ua.qcow2", |p, l| {
        wr64(
            p,
            l.h.l1_table_offset,
            rd64(p, l.h.l1_table_offset) + 0x1000,
        )
    });
    assert_refused(&p, ErrorKind::Corrupt, "not cluster aligned");
}

#[test]
fn two_guest_clusters_sharing_a_host_cluster_are_refused() {
    if !qemu_available("two_guest_clusters_sharing_a_host_cluster_are_refused") {
        return;
    }
    let (_d, p) = hostile("share.qcow2", |p, l| wr64(p, l.l2 + 8 * 5, rd64(p, l.l2)));
    assert_refused(
        &p,
        ErrorKind::Corrupt,
        "already used by another guest cluster",
    );
    // Amplification: every entry of the table on one data cluster.
    let (_d, p) = hostile("amp.qcow2", |p, l| {
        let e = rd64(p, l.l2);
        let all: Vec<u8> = (0..l.cs / 8).flat_map(|_| e.to_be_bytes()).collect();
        patch(p, l.l2, &all);
    });
    assert_refused(
        &p,
        ErrorKind::Corrupt,
        "already used by another guest cluster",
    );
    // Two L1 entries on one L2 table.
    let d = tmp();
    let p = d.path().join("l1share.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "1G"]);
    qemu_io("qcow2", &p, &["write -P 1 0 64k", "write -P 2 600M 64k"]);
    let l = layout(&p);
    wr64(&p, l.h.l1_table_offset + 8, rd64(&p, l.h.l1_table_offset));
    assert_refused(&p, ErrorKind::Corrupt, "shared with another L1 entry");
}

#[test]
fn oversized_tables_are_refused_without_allocating_them() {
    if !qemu_available("oversized_tables_are_refused_without_allocating_them") {
        return;
    }
    // L1 over QEMU's 32 MiB.
    let (_d, p) = hostile("l1big.qcow2", |p, _| wr32(p, 36, 0x0100_0000));
    assert_refused(&p, ErrorKind::Invalid, "larger than 32 MiB");
    // An L1 of 32 MiB claimed by a file of a few MiB.
    let (_d, p) = hostile("l1eof.qcow2", |p, _| wr32(p, 36, 0x0040_0000));
    assert_refused(&p, ErrorKind::Corrupt, "extends past the end of the file");
    // Refcount table over QEMU's 8 MiB.
    let (_d, p) = hostile("rtbig.qcow2", |p, _| wr32(p, 56, 0x1_0000));
    assert_refused(&p, ErrorKind::Invalid, "larger than 8 MiB");
    // More snapshots than QEMU allows.
    let (_d, p) = hostile("snaps.qcow2", |p, l| {
        wr32(p, 60, 100_000);
        wr64(p, 64, l.cs * 8);
    });
    assert_refused(&p, ErrorKind::Invalid, "Snapshot table too large");
    // A snapshot table past the end of the file.
    let (_d, p) = hostile("snapeof.qcow2", |p, l| {
        wr32(p, 60, 60_000);
        wr64(p, 64, size_of(p).div_ceil(l.cs) * l.cs);
    });
    assert_refused(&p, ErrorKind::Corrupt, "snapshot table");
    // An L1 too small for the virtual size, and a virtual size past vimg's limit.
    let (_d, p) = hostile("l1small.qcow2", |p, _| wr64(p, 24, 1 << 50));
    assert_refused(&p, ErrorKind::Invalid, "L1 table is too small");
    let (_d, p) = hostile("vsize.qcow2", |p, _| wr64(p, 24, 1 << 60));
    assert_refused(&p, ErrorKind::Unsupported, "virtual size");
}

#[test]
fn header_fields_out_of_range_are_refused() {
    if !qemu_available("header_fields_out_of_range_are_refused") {
        return;
    }
    let cases: Vec<(&str, u64, Vec<u8>, ErrorKind, &str)> = vec![
        (
            "version",
            4,
            vec![0, 0, 0, 4],
            ErrorKind::Invalid,
            "version 4",
        ),
        (
            "cluster-bits",
            20,
            vec![0, 0, 0, 22],
            ErrorKind::Invalid,
            "2^22",
        ),
        (
            "header-length",
            100,
            vec![0, 0, 0, 0x6c],
            ErrorKind::Invalid,
            "multiple of 8",
        ),
        (
            "refcount-order",
            96,
            vec![0, 0, 0, 7],
            ErrorKind::Invalid,
            "64 bits",
        ),
        (
            // LUKS (2) without its encryption header extension: qemu-img's -EINVAL.
            "crypt",
            32,
            vec![0, 0, 0, 2],
            ErrorKind::Invalid,
            "crypt method 2",
        ),
        (
            "compression",
            104,
            vec![1],
            ErrorKind::Invalid,
            "must be set",
        ),
        (
            "backing-offset",
            8,
            vec![0, 0, 0, 0, 0, 2, 0, 0],
            ErrorKind::Invalid,
            "backing_file_offset",
        ),
        (
            "no-reftable",
            56,
            vec![0, 0, 0, 0],
            ErrorKind::Invalid,
            "no refcount table",
        ),
        (
            "v2-zero-flag",
            4,
            vec![0, 0, 0, 2],
            ErrorKind::Corrupt,
            "version 2",
        ),
    ];
    for (name, off, bytes, kind, needle) in cases {
        let (_d, p) = hostile(&format!("{name}.qcow2"), |p, l| {
            patch(p, off, &bytes);
            if name == "v2-zero-flag" {
                wr64(p, l.l2, rd64(p, l.l2) | 1);
            }
        });
        assert_refused(&p, kind, needle);
    }
}

#[test]
fn unknown_incompatible_features_are_named() {
    if !qemu_available("unknown_incompatible_features_are_named") {
        return;
    }
    let (_d, p) = hostile("feat.qcow2", |p, _| wr64(p, 72, 1 << 20));
    assert_refused(
        &p,
        ErrorKind::Unsupported,
        "Unknown incompatible feature: 100000",
    );
    // With a name in the feature name table, the name is used.
    let (_d, p) = hostile("featname.qcow2", |p, _| {
        // The first table entry ("dirty bit", incompatible bit 0), right after the
        // extension header at 0x70, becomes bit 20, "flux capacitor".
        let mut e = [0u8; 48];
        e[1] = 20;
        e[2..16].copy_from_slice(b"flux capacitor");
        patch(p, 0x78, &e);
        wr64(p, 72, 1 << 20);
    });
    assert_refused(&p, ErrorKind::Unsupported, "flux capacitor");
}

#[test]
fn header_extensions_that_do_not_fit_are_refused_and_unknown_ones_tolerated() {
    if !qemu_available("header_extensions_that_do_not_fit_are_refused_and_unknown_ones_tolerated") {
        return;
    }
    // The feature table extension claims 1 MiB.
    let (_d, p) = hostile("ext.qcow2", |p, _| wr32(p, 0x74, 1 << 20));
    assert_refused(&p, ErrorKind::Invalid, "header extension");
    // An unknown extension type is skipped.
    let (d, p) = hostile("extunk.qcow2", |p, _| wr32(p, 0x70, 0x1234_5678));
    assert_reads_like_qemu(&p, "qcow2", d.path());
}

fn first_compressed(p: &Path, l: &Layout) -> (u64, u64) {
    let g = vimg::formats::qcow2::header::Geometry::new(l.h.cluster_bits, false, 4);
    for i in 0..l.cs / 8 {
        let e = rd64(p, l.l2 + 8 * i);
        if e & OFLAG_COMPRESSED != 0 {
            return (i, e & g.coffset_mask);
        }
    }
    panic!("no compressed cluster");
}

#[test]
fn compressed_clusters_of_the_wrong_size_are_refused() {
    if !qemu_available("compressed_clusters_of_the_wrong_size_are_refused") {
        return;
    }
    let d = tmp();
    for (name, len) in [("short", 32768usize), ("long", 131072)] {
        let (p, l) = patchable(d.path(), &format!("{name}.qcow2"), &["-c"]);
        let (_, coff) = first_compressed(&p, &l);
        let stream = vimg::codec::deflate(&vec![b'A'; len], 6, 12, false, 65536).unwrap();
        patch(&p, coff, &stream);
        let e = read_all(&p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("compressed"), "{e}");
    }
    // Compressed data past the end of the file.
    let (p, l) = patchable(d.path(), "ceof.qcow2", &["-c"]);
    let (i, _) = first_compressed(&p, &l);
    let far = size_of(&p) + (1 << 20);
    wr64(&p, l.l2 + 8 * i, OFLAG_COMPRESSED | far);
    assert_refused(&p, ErrorKind::Corrupt, "past the end of the file");
}

#[test]
fn files_named_outside_the_image_folder_are_refused() {
    if !qemu_available("files_named_outside_the_image_folder_are_refused") {
        return;
    }
    let d = tmp();
    let secret = d.path().join("secret.raw");
    write_sparse_raw(&secret, 1 << 20, &[(0, &[0x5eu8; 4096][..])]);
    fs::create_dir(d.path().join("img")).unwrap();
    // Absolute backing file.
    let a = d.path().join("img/abs.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        s(&secret),
        "-F",
        "raw",
        s(&a),
        "1M",
    ]);
    assert_refused(&a, ErrorKind::UnsafeReference, "absolute");
    // A relative escape.
    let r = d.path().join("img/rel.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "../secret.raw",
        "-F",
        "raw",
        s(&r),
        "1M",
    ]);
    assert_refused(&r, ErrorKind::UnsafeReference, "outside");
    // An external data file renamed to escape ("img.bin" -> "../s.raw", same length).
    let df = d.path().join("img/df.qcow2");
    qemu_in(
        &d.path().join("img"),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=dfdf.bin",
            s(&df),
            "1M",
        ],
    );
    let raw = fs::read(&df).unwrap();
    let at = raw.windows(8).position(|w| w == b"dfdf.bin").unwrap();
    patch(&df, at as u64, b"../x.raw");
    fs::copy(&secret, d.path().join("x.raw")).unwrap();
    assert_refused(&df, ErrorKind::UnsafeReference, "data_file");
    // info still shows what the image names.
    let v = json(&vimg(&["info", "--output=json", s(&df)]));
    assert_eq!(v["vimg-external-references"][0]["name"], "../x.raw");
}

#[test]
fn truncated_images_are_errors_not_panics() {
    if !qemu_available("truncated_images_are_errors_not_panics") {
        return;
    }
    let d = tmp();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata");
    let mut fixtures = vec![root.join("small.qcow2")];
    let (p, _) = patchable(d.path(), "plain.qcow2", &[]);
    fixtures.push(p);
    for f in fixtures {
        let bytes = fs::read(&f).unwrap();
        for k in 0..10u64 {
            let cut = (bytes.len() as u64 * k / 10) as usize + k as usize * 3;
            let t = d.path().join(format!("cut{k}.qcow2"));
            fs::write(&t, &bytes[..cut.min(bytes.len() - 1)]).unwrap();
            let r = read_all_as(&t, Some(Format::Qcow2));
            assert!(r.is_err(), "{} cut at {cut} was accepted", f.display());
        }
    }
}

// ---------------------------------------------------------------------------------------
// The shared corpus

/// qemu-img's raw output digest as DIGESTS.tsv defines it: sha256 over each non-zero
/// 64 KiB block's index (u64 BE) and bytes, then the length (u64 BE).
fn sparse_digest(img: &Image) -> String {
    use sha2::{Digest, Sha256};
    const B: u64 = 65536;
    let size = img.virtual_size();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; B as usize];
    let mut pos = 0u64;
    let mut next_block = 0u64;
    while pos < size {
        let (e, _, _) = img.map_flat(pos, size - pos).unwrap();
        if e.kind.has_data() {
            let first = (e.start.get() / B).max(next_block);
            let last = (e.end() - 1) / B;
            for b in first..=last {
                let n = (size - b * B).min(B) as usize;
                img.read_at(&mut buf[..n], b * B).unwrap();
                if buf[..n].iter().any(|&x| x != 0) {
                    h.update(b.to_be_bytes());
                    h.update(&buf[..n]);
                }
            }
            next_block = last + 1;
        }
        pos = e.end();
    }
    h.update(size.to_be_bytes());
    hex(&h.finalize())
}

fn full_sha256(img: &Image) -> String {
    use sha2::{Digest, Sha256};
    let size = img.virtual_size();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(1 << 20) as usize;
        img.read_at(&mut buf[..n], pos).unwrap();
        h.update(&buf[..n]);
        pos += n as u64;
    }
    hex(&h.finalize())
}

fn decompress(src: &Path, dir: &Path) -> PathBuf {
    let name = src.file_name().unwrap().to_str().unwrap();
    let (base, tool) = if let Some(b) = name.strip_suffix(".gz") {
        (b, "gzip")
    } else if let Some(b) = name.strip_suffix(".xz") {
        (b, "xz")
    } else if let Some(b) = name.strip_suffix(".bz2") {
        (b, "bzip2")
    } else {
        (name, "")
    };
    let out = dir.join(base);
    if tool.is_empty() {
        fs::copy(src, &out).unwrap();
    } else {
        let o = std::process::Command::new(tool)
            .args(["-dc", s(src)])
            .output()
            .unwrap();
        assert!(o.status.success(), "{tool} -dc {}", src.display());
        fs::write(&out, o.stdout).unwrap();
    }
    out
}

#[test]
fn corpus_qcow2_rows_read_as_the_manifest_says() {
    let Some(corpus) = corpus_dir() else {
        return;
    };
    let manifest = fs::read_to_string(corpus.join("MANIFEST.tsv")).unwrap();
    let digests = fs::read_to_string(corpus.join("DIGESTS.tsv")).unwrap();
    let mut rows = 0;
    for line in manifest.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 8 || cols[3] != "qcow2" {
            continue;
        }
        rows += 1;
        let (file, expected, notes) = (cols[0], cols[6], cols[7]);
        let d = tmp();
        let primary = decompress(&corpus.join(file), d.path());
        if let Some(rest) = notes.split("needs companions: ").nth(1) {
            let list = rest.split(" (").next().unwrap().split(';').next().unwrap();
            let folder = Path::new(file).parent().unwrap();
            for c in list.split(", ") {
                decompress(&corpus.join(folder).join(c.trim()), d.path());
            }
        }
        let opened = open(&primary, None);
        if let Some(err) = expected.strip_prefix("ERROR") {
            assert!(
                opened.is_err() || read_all(&primary).is_err(),
                "{file}: {err}"
            );
            continue;
        }
        let img = opened.unwrap_or_else(|e| panic!("{file}: {e}"));
        let sha = expected.split_whitespace().next().unwrap();
        let digest = digests
            .lines()
            .find(|l| l.starts_with(&format!("{file}\t")))
            .and_then(|l| l.split('\t').nth(1))
            .unwrap_or_else(|| panic!("{file} has no digest"));
        assert_eq!(sparse_digest(&img), digest, "{file}");
        // Small images are hashed whole as well, against the manifest's sha256.
        if img.virtual_size() <= 64 << 20 {
            assert_eq!(full_sha256(&img), sha, "{file}");
        }
        // The image's metadata checks out as qemu-img's does.
        let r = img.reader().check().unwrap();
        assert_eq!(
            (r.corruptions, r.leaks, r.check_errors),
            (0, 0, 0),
            "{file}"
        );
    }
    assert!(rows >= 17, "only {rows} qcow2 rows in the manifest");
}

//! Issue 16: `convert --checksum` to a new raw file hashes the bytes as they are written (in
//! order, on a thread of its own, the gaps between writes as zeros) instead of reading the
//! finished file again. Whatever the path, the digest is the one `sha512sum`/`sha256sum`/
//! `md5sum` print for the output, for every thread count, sources that begin or end with a
//! hole or with data, qcow2 inside xz (the seed's workflow), and outputs whose writer seeks
//! back (qcow2, vhd: hashed by reading the file).

mod common;

use std::path::Path;

use common::*;

fn tool_hash(tool: &str, p: &Path) -> String {
    run_ok(tool, &[s(p)])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `vimg convert ARGS --checksum ALG SRC OUT`, checked against the coreutils tool.
fn check(alg: &str, tool: &str, args: &[&str], src: &Path, out: &Path) {
    let _ = std::fs::remove_file(out);
    let mut a = vec!["convert", "-q"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--checksum", alg, s(src), s(out)]);
    let line = vimg(&a);
    let want = tool_hash(tool, out);
    assert_eq!(
        line,
        format!("{want}  {}\n", out.display()),
        "{alg} {args:?} {}",
        src.display()
    );
}

#[test]
fn inline_hash_equals_coreutils() {
    if !tool_available("inline_hash_equals_coreutils", "sha512sum") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 24u64 << 20;
    let data = pattern(3 << 20, 11);
    let zeros = vec![0u8; 2 << 20];
    // Data at both ends, holes and written zeros between.
    let ends = d.join("ends.raw");
    write_sparse_raw(
        &ends,
        size,
        &[
            (0, &data[..1 << 20]),
            (5 << 20, &zeros[..]),
            ((9 << 20) + 4096, &data[..70_000]),
            (size - (2 << 20), &data[..2 << 20]),
        ],
    );
    // Holes at both ends, a sub-sector piece, odd offsets.
    let holes = d.join("holes.raw");
    write_sparse_raw(
        &holes,
        size + 512,
        &[
            ((3 << 20) + 512, &data[..3 << 20]),
            (12 << 20, &data[5..105]),
            ((17 << 20) - 7, &data[..100_000]),
        ],
    );
    let empty = d.join("empty.raw");
    write_sparse_raw(&empty, 8 << 20, &[]);
    let out = d.join("out.raw");
    for src in [&ends, &holes, &empty] {
        for m in ["1", "2", "8"] {
            check("sha512", "sha512sum", &["-O", "raw", "-m", m], src, &out);
        }
        check("sha256", "sha256sum", &["-O", "raw", "-W"], src, &out);
        check("md5", "md5sum", &["-O", "raw", "-S", "0"], src, &out);
        // Writers that seek back are hashed by reading the finished file.
        check("sha512", "sha512sum", &["-O", "qcow2"], src, &out);
        check("sha512", "sha512sum", &["-O", "vpc"], src, &out);
    }
}

#[test]
fn seed_workflow_qcow2_in_xz() {
    if !qemu_available("seed_workflow_qcow2_in_xz")
        || !tool_available("seed_workflow_qcow2_in_xz", "xz")
        || !tool_available("seed_workflow_qcow2_in_xz", "sha512sum")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("src.raw");
    mixed_raw(&raw, 32 << 20);
    let q = d.join("img.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)]);
    run_ok("xz", &["-T1", "-0", "-k", s(&q)]);
    let xz = d.join("img.qcow2.xz");
    let out = d.join("out.raw");
    for m in ["1", "2", "8"] {
        check("sha512", "sha512sum", &["-O", "raw", "-m", m], &xz, &out);
        assert_same_file(&raw, &out);
    }
}

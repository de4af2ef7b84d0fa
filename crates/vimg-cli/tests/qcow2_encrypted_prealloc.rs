//! Encrypted qcow2 with `-o preallocation` (iotest 188's last part), against qemu-img:
//! `convert` gives qemu-img's map, `check`, image end and file length (every range the
//! source leaves unwritten zero-flagged, or discarded in version 2, its preallocated
//! cluster freed); `create` gives qemu-img's layout but reads as zeros (qemu-img's reads
//! as noise: the zero flag over the allocation differs on purpose); `convert -n` into a
//! preallocated image matches qemu-img's.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

const OBJ: &str = "secret,id=sec0,data=astrochicken";
const SIZE: u64 = (4 << 20) + 1536;

fn io(img: &Path) -> String {
    format!(
        "driver=qcow2,encrypt.key-secret=sec0,file.filename={}",
        s(img)
    )
}

/// Whole data clusters, data inside a cluster, an allocated cluster of zeros, a partial
/// last cluster.
fn source(dir: &Path) -> PathBuf {
    let src = dir.join("src.raw");
    write_sparse_raw(
        &src,
        SIZE,
        &[
            (0, &pattern(65536, 1)),
            (69632, &pattern(4096, 2)),
            (196608, &vec![0u8; 65536]),
            (1 << 20, &pattern(131072, 3)),
            (2 << 20, &pattern(512, 4)),
            (4 << 20, &pattern(1536, 5)),
        ],
    );
    src
}

/// What qemu-img says of an image: its map, its check, and the file's length.
fn describe(img: &Path) -> (String, String, u64) {
    let map = qemu_img(&[
        "map",
        "--output=json",
        "--object",
        OBJ,
        "--image-opts",
        &io(img),
    ]);
    let check = qemu_img(&["check", "--object", OBJ, "--image-opts", &io(img)]);
    assert!(check.contains("No errors were found"), "{check}");
    (map, check, fs::metadata(img).unwrap().len())
}

fn identical(src: &Path, img: &Path) {
    let raw = format!("driver=raw,file.filename={}", s(src));
    let out = qemu_img(&["compare", "--object", OBJ, "--image-opts", &raw, &io(img)]);
    assert!(out.contains("Images are identical"), "{out}");
}

fn convert(tool: &str, src: &Path, dst: &Path, o: &str) {
    let args = [
        "convert",
        "-f",
        "raw",
        s(src),
        "-O",
        "qcow2",
        "--object",
        OBJ,
        "-o",
        o,
        s(dst),
    ];
    if tool == "qemu-img" {
        qemu_img(&args);
    } else {
        vimg(&args);
    }
}

#[test]
fn convert_into_preallocated_encrypted_qcow2_as_qemu_img() {
    if !qemu_available("convert_into_preallocated_encrypted_qcow2_as_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    // iotest 188: an empty source.
    let empty = dir.path().join("empty.raw");
    write_sparse_raw(&empty, 16 << 20, &[]);
    let luks = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    for (from, extra) in [
        (&empty, "preallocation=metadata"),
        (&src, "preallocation=metadata"),
        (&src, "preallocation=metadata,compat=0.10"),
        (&src, "preallocation=metadata,cluster_size=4096"),
        (&src, "preallocation=falloc"),
        (&src, "preallocation=full,compat=0.10"),
        (&src, "preallocation=metadata,data_file=DATA"),
        (&src, "aes"),
    ] {
        let mut got = Vec::new();
        for tool in ["qemu-img", "vimg"] {
            let dst = dir.path().join(format!("{tool}.qcow2"));
            let data = dir.path().join(format!("{tool}.data"));
            let _ = fs::remove_file(&dst);
            let _ = fs::remove_file(&data);
            let o = match extra {
                "aes" => "encrypt.format=aes,encrypt.key-secret=sec0,preallocation=metadata".into(),
                e => format!("{luks},{}", e.replace("DATA", s(&data))),
            };
            convert(tool, from, &dst, &o);
            identical(from, &dst);
            got.push(describe(&dst));
        }
        assert_eq!(got[0], got[1], "{extra}");
    }
}

#[test]
fn create_preallocated_encrypted_reads_zeros_in_qemu_img_layout() {
    if !qemu_available("create_preallocated_encrypted_reads_zeros_in_qemu_img_layout") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let zeros = dir.path().join("zeros.raw");
    write_sparse_raw(&zeros, SIZE, &[]);
    for extra in [
        "preallocation=metadata",
        "preallocation=falloc",
        "preallocation=full",
        "preallocation=metadata,compat=0.10",
    ] {
        let o = format!("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,{extra}");
        let size = SIZE.to_string();
        let v = dir.path().join("v.qcow2");
        let q = dir.path().join("q.qcow2");
        let _ = fs::remove_file(&v);
        let _ = fs::remove_file(&q);
        let args = |p: &Path| -> Vec<String> {
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                OBJ,
                "-o",
                &o,
                s(p),
                &size,
            ]
            .map(String::from)
            .to_vec()
        };
        let a: Vec<String> = args(&v);
        vimg(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let a: Vec<String> = args(&q);
        qemu_img(&a.iter().map(String::as_str).collect::<Vec<_>>());
        // vimg's reads as zeros; qemu-img's preallocated clusters decrypt to noise.
        identical(&zeros, &v);
        let raw = format!("driver=raw,file.filename={}", s(&zeros));
        let r = run_cmd(
            "qemu-img",
            &["compare", "--object", OBJ, "--image-opts", &raw, &io(&q)],
        );
        assert_eq!(
            r.status.code(),
            Some(1),
            "{extra}: qemu-img's image reads as zeros now"
        );
        let (vm, vc, vl) = describe(&v);
        let (qm, qc, ql) = describe(&q);
        assert_eq!((vc, vl), (qc, ql), "{extra}");
        if extra.contains("0.10") {
            assert_eq!(vm, qm, "{extra}");
        } else {
            assert!(
                vm.contains("\"zero\": true, \"data\": false"),
                "{extra}: {vm}"
            );
        }
    }
}

#[test]
fn convert_n_into_preallocated_encrypted_qcow2_as_qemu_img() {
    if !qemu_available("convert_n_into_preallocated_encrypted_qcow2_as_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    for compat in ["1.1", "0.10"] {
        let mut got = Vec::new();
        for tool in ["qemu-img", "vimg"] {
            let dst = dir.path().join(format!("{tool}-n.qcow2"));
            let _ = fs::remove_file(&dst);
            let o = format!(
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,preallocation=metadata,compat={compat}"
            );
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                OBJ,
                "-o",
                &o,
                s(&dst),
                &SIZE.to_string(),
            ]);
            let args = [
                "convert",
                "-n",
                "-f",
                "raw",
                "--object",
                OBJ,
                s(&src),
                "--target-image-opts",
                &io(&dst),
            ];
            if tool == "qemu-img" {
                qemu_img(&args);
            } else {
                vimg(&args);
            }
            identical(&src, &dst);
            got.push(describe(&dst));
        }
        assert_eq!(got[0], got[1], "compat={compat}");
    }
}

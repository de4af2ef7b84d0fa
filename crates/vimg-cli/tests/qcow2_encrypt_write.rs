//! Issue 13, writing qcow2 with `encrypt.format=luks`: what vimg creates and converts
//! qemu-img reads back identically with the secret (`qemu-img compare`), `qemu-img check`
//! finds clean, with qemu-img's layout (LUKS area after the L1 table, the extension in
//! qemu's order, the same file size); vimg reads qemu-img's; `info`, `measure` and the
//! "Formatting" line match qemu-img; compression and the option forms vimg does not write
//! are refused before anything is written.

mod common;

use std::fs;
use std::path::Path;

use common::*;

const OBJ: &str = "secret,id=sec0,data=correct horse";

fn io(img: &Path) -> String {
    format!(
        "driver=qcow2,encrypt.key-secret=sec0,file.filename={}",
        s(img)
    )
}

/// A sparse 8 MiB raw source: data, a whole zero cluster run, a partial cluster, the last
/// sector.
fn source(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src.raw");
    write_sparse_raw(
        &src,
        8 << 20,
        &[
            (0, &pattern(1 << 20, 1)),
            (3 << 20, &pattern(65536, 2)),
            ((5 << 20) + 4096, &pattern(512, 3)),
            ((8 << 20) - 512, &pattern(512, 4)),
        ],
    );
    src
}

fn qemu_compare_raw(src: &Path, img: &Path) {
    let raw = format!("driver=raw,file.filename={}", s(src));
    let out = qemu_img(&["compare", "--object", OBJ, "--image-opts", &raw, &io(img)]);
    assert!(out.contains("Images are identical"), "{out}");
}

fn qemu_check_clean(img: &Path) {
    let out = qemu_img(&["check", "--object", OBJ, "--image-opts", &io(img)]);
    assert!(out.contains("No errors were found"), "{out}");
}

/// Header extension types in order, from the header cluster.
fn extensions(img: &Path) -> Vec<(u32, Vec<u8>)> {
    let d = fs::read(img).unwrap();
    let be32 = |o: usize| u32::from_be_bytes(d[o..o + 4].try_into().unwrap());
    let mut off = be32(100) as usize;
    let mut v = Vec::new();
    loop {
        let (t, l) = (be32(off), be32(off + 4) as usize);
        if t == 0 {
            return v;
        }
        v.push((t, d[off + 8..off + 8 + l].to_vec()));
        off += 8 + l.div_ceil(8) * 8;
    }
}

const SETUPS: &[&str] = &[
    "",
    ",encrypt.cipher-alg=aes-128",
    ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1",
    ",encrypt.cipher-alg=aes-192,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512",
];

#[test]
fn vimg_writes_what_qemu_reads() {
    if !qemu_available("vimg_writes_what_qemu_reads") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    for (i, setup) in SETUPS.iter().enumerate() {
        for extra in ["", ",compat=0.10", ",cluster_size=4096"] {
            if i > 0 && !extra.is_empty() {
                continue;
            }
            let o = format!(
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10{setup}{extra}"
            );
            let v = dir.path().join("v.qcow2");
            let q = dir.path().join("q.qcow2");
            let _ = fs::remove_file(&v);
            let _ = fs::remove_file(&q);
            for (tool, out) in [(vimg_bin(), &v), ("qemu-img".into(), &q)] {
                run_ok(
                    tool,
                    &[
                        "convert",
                        "-q",
                        "-f",
                        "raw",
                        s(&src),
                        "-O",
                        "qcow2",
                        "--object",
                        OBJ,
                        "-o",
                        &o,
                        s(out),
                    ],
                );
            }
            qemu_compare_raw(&src, &v);
            qemu_check_clean(&v);
            // qemu-img's layout: the same file size, the same extensions (the LUKS area
            // right after the L1 table, in clusters of its own).
            assert_eq!(
                fs::metadata(&v).unwrap().len(),
                fs::metadata(&q).unwrap().len(),
                "{setup}{extra}"
            );
            let (ve, qe) = (extensions(&v), extensions(&q));
            assert_eq!(
                ve.iter().map(|e| e.0).collect::<Vec<_>>(),
                qe.iter().map(|e| e.0).collect::<Vec<_>>()
            );
            assert_eq!(ve[0], qe[0], "crypto header pointer {setup}{extra}");
            assert_eq!(read_bytes::<4>(&v, 32), [0, 0, 0, 2], "crypt_method");
            // The same map with the secret (data/zero runs, no host offsets).
            let qm = qemu_img(&[
                "map",
                "--output=json",
                "--object",
                OBJ,
                "--image-opts",
                &io(&q),
            ]);
            let vm = qemu_img(&[
                "map",
                "--output=json",
                "--object",
                OBJ,
                "--image-opts",
                &io(&v),
            ]);
            assert_eq!(qm, vm);
            // vimg reads both back; info's encrypt block (all but the random parts)
            // matches qemu-img's.
            for img in [&v, &q] {
                let out = dir.path().join("back.raw");
                vimg(&[
                    "convert",
                    "--object",
                    OBJ,
                    "--image-opts",
                    &io(img),
                    "-O",
                    "raw",
                    s(&out),
                ]);
                assert_same_file(&src, &out);
            }
            let vi = json(&vimg(&["info", "--output=json", s(&v)]));
            let qi = json(&qemu_img(&["info", "--output=json", s(&v)]));
            assert_eq!(vi["format-specific"], qi["format-specific"]);
            assert_eq!(vi["encrypted"], qi["encrypted"]);
            let mut ve = vi["format-specific"]["data"]["encrypt"].clone();
            let mut qe = json(&qemu_img(&["info", "--output=json", s(&q)]))["format-specific"]
                ["data"]["encrypt"]
                .clone();
            for e in [&mut ve, &mut qe] {
                let o = e.as_object_mut().unwrap();
                o.remove("uuid");
                o.remove("master-key-iters");
                o["slots"][0].as_object_mut().unwrap().remove("iters");
            }
            assert_eq!(ve, qe, "{setup}{extra}");
        }
    }
}

#[test]
fn create_matches_qemu() {
    if !qemu_available("create_matches_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = "encrypt.iter-time=10,encrypt.cipher-mode=cbc,encrypt.key-secret=sec0,encrypt.format=luks,encrypt.ivgen-alg=essiv,encrypt.cipher-alg=aes-128,lazy_refcounts=on";
    let (v, q) = (dir.path().join("v.qcow2"), dir.path().join("q.qcow2"));
    let vo = vimg(&[
        "create",
        "-f",
        "qcow2",
        "--object",
        OBJ,
        "-o",
        o,
        s(&v),
        "3M",
    ]);
    let qo = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "--object",
        OBJ,
        "-o",
        o,
        s(&q),
        "3M",
    ]);
    assert_eq!(
        vo.replace(s(&v), "X"),
        qo.replace(s(&q), "X"),
        "Formatting line"
    );
    assert_eq!(
        fs::metadata(&v).unwrap().len(),
        fs::metadata(&q).unwrap().len()
    );
    qemu_check_clean(&v);
    // qemu-io writes into vimg's image and reads it back; vimg reads what qemu wrote.
    run_ok(
        "qemu-io",
        &[
            "--object",
            OBJ,
            "--image-opts",
            &io(&v),
            "-c",
            "write -P 0x5c 64k 128k",
            "-c",
            "read -P 0 0 64k",
            "-c",
            "read -P 0x5c 64k 128k",
        ],
    );
    qemu_check_clean(&v);
    let out = dir.path().join("v.raw");
    vimg(&[
        "convert",
        "--object",
        OBJ,
        "--image-opts",
        &io(&v),
        "-O",
        "raw",
        s(&out),
    ]);
    let mut want = vec![0u8; 3 << 20];
    want[65536..196608].fill(0x5c);
    assert_eq!(fs::read(&out).unwrap(), want);
    // measure as qemu-img measures it (the LUKS area's clusters added).
    for size in ["1G", "5M"] {
        let args = [
            "measure",
            "--object",
            OBJ,
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            "--size",
            size,
        ];
        assert_eq!(vimg(&args), qemu_img(&args), "{size}");
    }
}

#[test]
fn refusals() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let out = dir.path().join("x.qcow2");
    let base = [
        "convert",
        "-f",
        "raw",
        s(&src),
        "-O",
        "qcow2",
        "--object",
        OBJ,
    ];
    for (o, c, want) in [
        (
            "encrypt.format=luks,encrypt.key-secret=sec0",
            true,
            "Compression and encryption not supported at the same time",
        ),
        (
            "encrypt.format=luks,encrypt.key-secret=sec0,preallocation=metadata,extended_l2=on",
            false,
            "does not preallocate encrypted qcow2 images with extended L2",
        ),
        (
            "encrypt.format=luks,encrypt.key-secret=sec0,data_file=x.data,data_file_raw=on",
            false,
            "over a raw data file",
        ),
        (
            "encrypt.format=aes,encrypt.key-secret=sec0",
            true,
            "Compression and encryption not supported at the same time",
        ),
        (
            "encryption=on",
            false,
            "Parameter 'encrypt.key-secret' is required for cipher",
        ),
        (
            "encrypt.format=luks",
            false,
            "Parameter 'encrypt.key-secret' is required for cipher",
        ),
        ("encrypt.format=luks,encrypt.key-secret=nope", false, "nope"),
        (
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=twofish-256",
            false,
            "twofish-256",
        ),
        (
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.detached-header=on",
            false,
            "Invalid parameter 'encrypt.detached-header'",
        ),
    ] {
        let mut a: Vec<&str> = base.to_vec();
        if c {
            a.push("-c");
        }
        a.extend(["-o", o, s(&out)]);
        let r = vimg_raw(&a);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{o}: {err}");
        assert!(err.contains(want), "{o}: {err}");
        assert!(!out.exists(), "{o}: nothing is written");
    }
}

/// Encryption with the other qcow2 options (an external data file: its sectors are
/// encrypted with their data-file offsets as IV, as qemu does; extended L2; 64-bit
/// refcounts; lazy refcounts): qemu-img reads each back identically and checks it clean.
#[test]
fn with_other_options_reads_back_in_qemu() {
    if !qemu_available("with_other_options_reads_back_in_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let v = dir.path().join("o.qcow2");
    let data = dir.path().join("o.data");
    for extra in [
        format!("data_file={}", s(&data)),
        "extended_l2=on,cluster_size=128k".into(),
        "refcount_bits=64".into(),
        "lazy_refcounts=on".into(),
    ] {
        let _ = fs::remove_file(&v);
        let _ = fs::remove_file(&data);
        let o = format!("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,{extra}");
        vimg(&[
            "convert",
            "-f",
            "raw",
            s(&src),
            "-O",
            "qcow2",
            "--object",
            OBJ,
            "-o",
            &o,
            s(&v),
        ]);
        qemu_compare_raw(&src, &v);
        qemu_check_clean(&v);
        if extra.starts_with("data_file") {
            // The data file holds ciphertext, not the guest's bytes.
            assert_ne!(
                fs::read(&data).unwrap()[..65536],
                fs::read(&src).unwrap()[..65536]
            );
        }
    }
}

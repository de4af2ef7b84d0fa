//! qcow (version 1) read against qemu-img: images qemu-img makes (qemu-io patterns,
//! compressed clusters, backing files) read and map byte-identically; encrypted images and
//! hostile tables are refused before anything is written.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

fn qcow(dir: &Path, name: &str, size: &str, io: &[&str]) -> PathBuf {
    let img = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow", s(&img), size]);
    if !io.is_empty() {
        qemu_io("qcow", &img, io);
    }
    img
}

#[test]
fn reads_qemu_made_images_like_qemu() {
    if !qemu_available("qcow reads_qemu_made_images_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = qcow(
        d,
        "x.qcow",
        "10M",
        &[
            "write -P 0xaa 0 64k",
            "write -P 0xbb 5M 4k",
            "write -P 0xcc 7000k 200k",
        ],
    );
    assert_reads_like_qemu(&img, "qcow", d);
    let q = qemu_img(&["map", "--output=json", "-f", "qcow", s(&img)]);
    let v = vimg(&["map", "--output=json", s(&img)]);
    assert_eq!(json(&v), json(&q));
    // Compressed clusters, as qemu-img convert -c writes them. qemu-img 10 writes the whole
    // image and then exits 1 without a message (the final empty compressed write that
    // marks the end is refused by its qcow driver); the image itself is complete.
    let raw = d.join("src.raw");
    let text: Vec<u8> = b"qcow version 1 compressed cluster test, 0123456789\n"
        .iter()
        .cycle()
        .take(3 << 20)
        .copied()
        .collect();
    write_sparse_raw(&raw, 12 << 20, &[(0, &text), (7 << 20, &[0x5a; 100_000])]);
    let c = d.join("c.qcow");
    run_cmd(
        "qemu-img",
        &["convert", "-c", "-f", "raw", "-O", "qcow", s(&raw), s(&c)],
    );
    let roundtrip = d.join("rt.raw");
    qemu_img(&["convert", "-f", "qcow", "-O", "raw", s(&c), s(&roundtrip)]);
    assert_same_file(&raw, &roundtrip);
    assert_reads_like_qemu(&c, "qcow", d);
    // An odd size: qemu counts whole sectors.
    let odd = qcow(d, "odd.qcow", "1000001", &["write -P 0x11 0 4k"]);
    assert_reads_like_qemu(&odd, "qcow", d);
}

#[test]
fn backing_file_reads_like_qemu() {
    if !qemu_available("qcow backing_file_reads_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow(d, "base.qcow", "10M", &["write -P 0x11 0 3M"]);
    let top = d.join("top.qcow");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "-b",
        "base.qcow",
        "-F",
        "qcow",
        s(&top),
    ]);
    qemu_io("qcow", &top, &["write -P 0x22 1M 64k"]);
    assert_reads_like_qemu(&top, "qcow", d);
    let info = json(&vimg(&["info", "--output=json", s(&top)]));
    assert_eq!(info["backing-filename"], "base.qcow");
}

#[test]
fn encrypted_images_are_refused() {
    if !qemu_available("qcow encrypted_images_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("e.qcow");
    let out = run_cmd(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow",
            "--object",
            "secret,id=s,data=x",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s",
            s(&img),
            "1M",
        ],
    );
    if !out.status.success() {
        skipped_line(format_args!(
            "SKIPPED encrypted qcow: this qemu-img does not create them"
        ));
        return;
    }
    let o = dir.path().join("o.raw");
    // Read without its key: refused in qemu-img's words (legacy_aes.rs reads with it).
    let err = assert_vimg_fails(&["convert", "-O", "raw", s(&img), s(&o)]);
    assert!(
        err.contains("Parameter 'encrypt.key-secret' is required for cipher"),
        "{err}"
    );
    assert!(!o.exists());
}

#[test]
fn hostile_tables_are_refused() {
    if !qemu_available("qcow hostile_tables_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = qcow(d, "base.qcow", "8M", &["write -P 0xaa 0 8k"]);
    let b = fs::read(&base).unwrap();
    let l1 = u64::from_be_bytes(b[0x28..0x30].try_into().unwrap()) as usize;
    let l2 = u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) as usize;
    let first = u64::from_be_bytes(b[l2..l2 + 8].try_into().unwrap());
    let cases: Vec<(&str, usize, u64)> = vec![
        ("l1-past-eof", 0x28, 1 << 40),
        ("l1-on-header", 0x28, 0),
        ("l2-past-eof", l1, 1 << 40),
        ("l2-on-l1", l1, l1 as u64),
        ("data-past-eof", l2, 1 << 40),
        ("data-on-l2", l2, l2 as u64),
        ("data-twice", l2 + 16, first),
        (
            "compressed-past-eof",
            l2,
            (1 << 63) | (100 << 51) | (1 << 40),
        ),
    ];
    for (name, at, v) in cases {
        let img = d.join(format!("{name}.qcow"));
        let mut x = b.clone();
        x[at..at + 8].copy_from_slice(&v.to_be_bytes());
        fs::write(&img, x).unwrap();
        let out = d.join("out.raw");
        let err = assert_vimg_fails(&["convert", "-O", "raw", s(&img), s(&out)]);
        assert!(err.contains("qcow"), "{name}: {err}");
        assert!(!out.exists(), "{name}");
    }
}

#[test]
fn writes_what_qemu_writes() {
    if !qemu_available("qcow writes_what_qemu_writes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("src.raw");
    mixed_raw(&raw, 24 << 20);
    let (q, v) = (d.join("q.qcow"), d.join("v.qcow"));
    qemu_img(&["convert", "-f", "raw", "-O", "qcow", s(&raw), s(&q)]);
    vimg(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow",
        "-m",
        "4",
        s(&raw),
        s(&v),
    ]);
    assert_same_file(&q, &v);
    qemu_img(&["compare", "-f", "qcow", "-F", "raw", s(&v), s(&raw)]);
    // Over a backing file: 512-byte clusters, as QEMU chooses them.
    qcow(d, "base.qcow", "24M", &["write -P 0x11 0 1M"]);
    let (qb, vb) = (d.join("qb.qcow"), d.join("vb.qcow"));
    for (img, tool) in [(&qb, "qemu"), (&vb, "vimg")] {
        let args = [
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow",
            "-B",
            "base.qcow",
            "-F",
            "qcow",
            s(&raw),
            s(img),
        ];
        if tool == "qemu" {
            qemu_img(&args);
        } else {
            vimg(&args);
        }
    }
    qemu_img(&["compare", "-f", "qcow", "-F", "raw", s(&vb), s(&raw)]);
    assert_reads_like_qemu(&vb, "qcow", d);
}

#[test]
fn create_is_qemu_img_create() {
    if !qemu_available("qcow create_is_qemu_img_create") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow(d, "base.qcow", "10M", &[]);
    for args in [
        vec!["10M"],
        vec!["1000"],
        vec!["3T"],
        vec!["-b", "base.qcow", "-F", "qcow"],
        vec!["-o", "backing_file=base.qcow,backing_fmt=qcow", "7M"],
    ] {
        let (q, v) = (d.join("q.qcow"), d.join("v.qcow"));
        let with = |img: &Path| {
            let mut a = vec!["create", "-f", "qcow"];
            let (opts, size): (Vec<&str>, Vec<&str>) = match args.last() {
                Some(x) if !x.ends_with("qcow") && !x.contains('=') => {
                    (args[..args.len() - 1].to_vec(), vec![*x])
                }
                _ => (args.clone(), vec![]),
            };
            a.extend(opts);
            a.push(s(img));
            a.extend(size);
            a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
        };
        let qa = with(&q);
        let va = with(&v);
        let qo = qemu_img(&qa.iter().map(String::as_str).collect::<Vec<_>>());
        let vo = vimg(&va.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(vo.replace("v.qcow", "q.qcow"), qo, "{args:?}");
        assert_same_file(&q, &v);
        let _ = (fs::remove_file(&q), fs::remove_file(&v));
    }
    assert_eq!(
        vimg(&["create", "-f", "qcow", "-o", "help"]),
        qemu_img(&["create", "-f", "qcow", "-o", "help"])
    );
    let bad = d.join("bad.qcow");
    assert_vimg_fails(&["create", "-f", "qcow", s(&bad), "0"]);
    assert_vimg_fails(&["create", "-f", "qcow", "-o", "encryption=on", s(&bad), "1M"]);
    assert!(!bad.exists());
    // Compressed output is written (inplace_qcow.rs compares it with qemu-img's), except
    // with encryption, where QEMU would store the compressed clusters in clear.
    let raw = d.join("r.raw");
    write_sparse_raw(&raw, 1 << 20, &[(0, &[1; 4096])]);
    assert_vimg_fails(&[
        "convert",
        "-c",
        "--object",
        "secret,id=sec0,data=123456",
        "-O",
        "qcow",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        s(&raw),
        s(&bad),
    ]);
    assert!(!bad.exists());
}

//! Issue 14, the legacy AES encryption of qcow and qcow2 (`crypt_method` 1,
//! `encryption=on` / `encrypt.format=aes`): images qemu-img writes read in vimg as in
//! qemu-img (convert, compare, map, info, check); images vimg writes are bit-identical to
//! qemu-img's and read back in qemu-img; a missing or unknown secret gives qemu-img's
//! message, a wrong one reads noise as in qemu-img; hostile headers are refused.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

const OBJ: &str = "secret,id=sec0,data=astrochicken";
const WRONG: &str = "secret,id=sec0,data=platypus";

fn spec(fmt: &str, img: &Path) -> String {
    format!(
        "driver={fmt},encrypt.key-secret=sec0,file.filename={}",
        s(img)
    )
}

/// qemu-img creates an AES image of `fmt` with `opts`; qemu-io writes some patterns (a
/// whole cluster, a part of one, something near the end).
fn qemu_aes(dir: &Path, name: &str, fmt: &str, opts: &str, size: &str) -> PathBuf {
    let img = dir.join(name);
    let _ = fs::remove_file(&img);
    let o = format!("{opts},encrypt.key-secret=sec0");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        fmt,
        "--object",
        OBJ,
        "-o",
        &o,
        s(&img),
        size,
    ]);
    run_ok(
        "qemu-io",
        &[
            "--object",
            OBJ,
            "--image-opts",
            &spec(fmt, &img),
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x22 100k 3k",
            "-c",
            "write -P 0x33 900k 512",
        ],
    );
    img
}

fn convert_raw(tool: &str, fmt: &str, img: &Path, out: &Path, obj: &str) {
    run_ok(
        if tool == "vimg" {
            vimg_bin().into_os_string()
        } else {
            tool.into()
        },
        &[
            "convert",
            "--object",
            obj,
            "--image-opts",
            &spec(fmt, img),
            "-O",
            "raw",
            s(out),
        ],
    );
}

/// qemu-img's AES images (qcow2 and qcow, both option spellings) decrypt in vimg to
/// qemu-img's bytes; `info`, `map`, `compare` and `check` agree with qemu-img.
#[test]
fn qemu_written_aes_images_read_like_qemu() {
    if !qemu_available("qemu_written_aes_images_read_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (fmt, opts) in [
        ("qcow2", "encrypt.format=aes"),
        ("qcow2", "encryption=on,cluster_size=4k"),
        ("qcow2", "encryption=on,compat=0.10"),
        ("qcow", "encryption=on"),
        ("qcow", "encrypt.format=aes"),
    ] {
        let img = qemu_aes(dir.path(), &format!("a.{fmt}"), fmt, opts, "2M");
        let q = dir.path().join("q.raw");
        let v = dir.path().join("v.raw");
        convert_raw("qemu-img", fmt, &img, &q, OBJ);
        convert_raw("vimg", fmt, &img, &v, OBJ);
        assert_same_file(&q, &v);
        let raw = fs::read(&v).unwrap();
        assert!(raw[..65536].iter().all(|b| *b == 0x11), "{fmt} {opts}");
        assert!(raw[100 * 1024..103 * 1024].iter().all(|b| *b == 0x22));
        assert!(raw[103 * 1024..900 * 1024].iter().all(|b| *b == 0));

        // info needs no key, as in qemu-img.
        let qi = json(&qemu_img(&["info", "--output=json", s(&img)]));
        let vi = json(&vimg(&["info", "--output=json", s(&img)]));
        for k in [
            "encrypted",
            "format-specific",
            "virtual-size",
            "cluster-size",
        ] {
            assert_eq!(vi.get(k), qi.get(k), "{fmt} {opts}: info {k}");
        }
        assert_eq!(vi["encrypted"], true);
        let human = vimg(&["info", s(&img)]);
        assert!(human.contains("encrypted: yes"), "{human}");

        // map with the key: no offsets (qemu reports none for encrypted data).
        let args = |_: ()| {
            vec![
                "map".to_string(),
                "--output=json".into(),
                "--object".into(),
                OBJ.into(),
                "--image-opts".into(),
                spec(fmt, &img),
            ]
        };
        let a = args(());
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        assert_eq!(vimg(&a), qemu_img(&a), "{fmt} {opts}: map");

        // compare against the decrypted raw, both ways.
        for tool in ["qemu-img", "vimg"] {
            let prog = if tool == "vimg" {
                vimg_bin().into_os_string()
            } else {
                tool.into()
            };
            let out = run_ok(
                prog,
                &[
                    "compare",
                    "--object",
                    OBJ,
                    "--image-opts",
                    &spec(fmt, &img),
                    &format!("driver=raw,file.filename={}", s(&q)),
                ],
            );
            assert!(out.contains("Images are identical"), "{tool}: {out}");
        }
        if fmt == "qcow2" {
            let a = ["check", "--object", OBJ, "--image-opts", &spec(fmt, &img)];
            assert_eq!(vimg(&a), qemu_img(&a), "{fmt} {opts}: check");
        }
        let _ = fs::remove_file(&q);
        let _ = fs::remove_file(&v);
    }
}

/// Without a key, reading is refused in qemu-img's words; an unknown secret likewise; a
/// wrong key reads the same noise qemu-img reads (nothing checks the key).
#[test]
fn missing_unknown_and_wrong_keys_behave_like_qemu() {
    if !qemu_available("missing_unknown_and_wrong_keys_behave_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["qcow2", "qcow"] {
        let img = qemu_aes(dir.path(), &format!("k.{fmt}"), fmt, "encryption=on", "1M");
        let out = dir.path().join("o.raw");
        for args in [
            vec!["convert", "-O", "raw", s(&img), s(&out)],
            vec!["map", s(&img)],
            vec!["check", s(&img)],
        ] {
            let q = run_cmd("qemu-img", &args);
            let v = vimg_raw(&args);
            assert_eq!(v.status.code(), q.status.code(), "{fmt} {args:?}");
            let ve = String::from_utf8_lossy(&v.stderr);
            assert!(
                ve.contains("Parameter 'encrypt.key-secret' is required for cipher"),
                "{fmt} {args:?}: {ve}"
            );
            assert!(!out.exists());
        }
        let sp = format!(
            "driver={fmt},encrypt.key-secret=nosuch,file.filename={}",
            s(&img)
        );
        let args = [
            "convert",
            "--object",
            OBJ,
            "--image-opts",
            &sp,
            "-O",
            "raw",
            s(&out),
        ];
        let v = vimg_raw(&args);
        assert_eq!(v.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&v.stderr).contains("No secret with id 'nosuch'"));
        assert!(!out.exists());

        let q = dir.path().join("q.raw");
        convert_raw("qemu-img", fmt, &img, &q, WRONG);
        convert_raw("vimg", fmt, &img, &out, WRONG);
        assert_same_file(&q, &out);
        let noise = fs::read(&out).unwrap();
        assert!(noise[..512].iter().any(|b| *b != 0x11));
        let _ = fs::remove_file(&q);
        let _ = fs::remove_file(&out);
    }
}

/// `create` of AES qcow2 and qcow is bit-identical to qemu-img's, `convert` into them
/// too (the data, including partly written clusters, encrypts to qemu-img's bytes), and
/// qemu-img reads vimg's images back and finds them clean.
#[test]
fn vimg_writes_aes_images_like_qemu() {
    if !qemu_available("vimg_writes_aes_images_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    let data = pattern(70 * 1024, 7);
    // A whole 64k cluster, a part of the next one, a sector near the end, a tail.
    write_sparse_raw(
        &src,
        3 * 1024 * 1024 + 1536,
        &[
            (0, &data[..]),
            (1 << 20, &data[..4096]),
            (3 << 20, &data[..1536]),
        ],
    );
    for (fmt, opts) in [
        ("qcow2", "encrypt.format=aes"),
        ("qcow2", "encryption=on"),
        ("qcow2", "encryption=on,cluster_size=4k,compat=0.10"),
        ("qcow", "encryption=on"),
        ("qcow", "encrypt.format=aes"),
    ] {
        let o = format!("{opts},encrypt.key-secret=sec0");
        // create
        let q = d.join(format!("q.{fmt}"));
        let v = d.join(format!("v.{fmt}"));
        let _ = fs::remove_file(&q);
        let _ = fs::remove_file(&v);
        let cq = qemu_img(&["create", "-f", fmt, "--object", OBJ, "-o", &o, s(&q), "5M"]);
        let cv = vimg(&["create", "-f", fmt, "--object", OBJ, "-o", &o, s(&v), "5M"]);
        assert_eq!(
            cv.replace(s(&v), "X"),
            cq.replace(s(&q), "X"),
            "{fmt} {opts}: create's Formatting line"
        );
        if fmt == "qcow2" {
            assert_same_file(&q, &v);
        } else {
            // qcow's header holds the creation time; the rest is the same.
            let (a, b) = (fs::read(&q).unwrap(), fs::read(&v).unwrap());
            assert_eq!(a.len(), b.len());
            assert_eq!(a[..0x10], b[..0x10]);
            assert_eq!(a[0x14..], b[0x14..], "{fmt} {opts}");
        }
        // convert
        let _ = fs::remove_file(&q);
        let _ = fs::remove_file(&v);
        let conv = |prog: std::ffi::OsString, out: &Path| {
            run_ok(
                prog,
                &[
                    "convert",
                    "--object",
                    OBJ,
                    "-f",
                    "raw",
                    "-O",
                    fmt,
                    "-o",
                    &o,
                    s(&src),
                    s(out),
                ],
            );
        };
        conv("qemu-img".into(), &q);
        conv(vimg_bin().into_os_string(), &v);
        if fmt == "qcow2" {
            assert_same_file(&q, &v);
        } else {
            let (a, b) = (fs::read(&q).unwrap(), fs::read(&v).unwrap());
            assert_eq!(a.len(), b.len(), "{fmt} {opts}");
            assert_eq!(a[0x14..], b[0x14..], "{fmt} {opts}");
        }
        // qemu-img reads vimg's image as the source.
        let back = d.join("back.raw");
        convert_raw("qemu-img", fmt, &v, &back, OBJ);
        let (a, b) = (fs::read(&src).unwrap(), fs::read(&back).unwrap());
        assert_eq!(a.len(), b.len());
        assert!(
            a == b,
            "{fmt} {opts}: qemu-img reads vimg's image differently"
        );
        if fmt == "qcow2" {
            let r = run_cmd(
                "qemu-img",
                &["check", "--object", OBJ, "--image-opts", &spec(fmt, &v)],
            );
            assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stdout));
        }
        let _ = fs::remove_file(&back);
    }
}

/// Options qemu-img refuses are refused in its words, and nothing is left behind.
#[test]
fn create_refusals_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (fmt, o, want) in [
        (
            "qcow2",
            "encryption=on",
            "Parameter 'encrypt.key-secret' is required for cipher",
        ),
        (
            "qcow",
            "encryption=on",
            "Parameter 'encrypt.key-secret' is required for cipher",
        ),
        (
            "qcow2",
            "encryption=on,encrypt.key-secret=sec1",
            "No secret with id 'sec1'",
        ),
        (
            "qcow",
            "encrypt.format=aes,encrypt.key-secret=sec1",
            "No secret with id 'sec1'",
        ),
        (
            "qcow2",
            "encryption=on,encrypt.format=aes,encrypt.key-secret=sec0",
            "'encrypt.format' and its alias 'encryption' can't be used at the same time",
        ),
        (
            "qcow",
            "encryption=on,encrypt.format=aes,encrypt.key-secret=sec0",
            "'encrypt.format' and its alias 'encryption' can't be used at the same time",
        ),
        (
            "qcow",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            "Unsupported encryption format",
        ),
        (
            "qcow",
            "encrypt.key-secret=sec0",
            "Parameter 'encrypt.format' is missing",
        ),
        (
            "qcow2",
            "encrypt.key-secret=sec0",
            "Parameter 'encrypt.format' is missing",
        ),
        (
            "qcow2",
            "encrypt.format=aes,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128",
            "Parameter 'encrypt.cipher-alg' is unexpected",
        ),
    ] {
        let img = d.join(format!("r.{fmt}"));
        let r = vimg_raw(&["create", "-f", fmt, "--object", OBJ, "-o", o, s(&img), "1M"]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{fmt} {o}: {err}");
        assert!(err.contains(want), "{fmt} {o}: {err}");
        assert!(!img.exists(), "{fmt} {o}: output left behind");
    }
    // encryption=off with encrypt.format is no conflict (qemu-img encrypts).
    let img = d.join("off.qcow2");
    vimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        OBJ,
        "-o",
        "encryption=off,encrypt.format=aes,encrypt.key-secret=sec0",
        s(&img),
        "1M",
    ]);
    let i = json(&vimg(&["info", "--output=json", s(&img)]));
    assert_eq!(i["encrypted"], true);
}

/// Hostile headers: an unknown crypt method, and AES data clusters past the end of the
/// file or overlapping the metadata, are refused or read as qemu-img reads them, never a
/// panic; a write into an AES qcow2 in place is refused before anything is written.
#[test]
fn hostile_and_in_place() {
    if !qemu_available("hostile_and_in_place") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // qcow: crypt_method 2 is "invalid encryption method".
    let img = qemu_aes(d, "h.qcow", "qcow", "encryption=on", "1M");
    patch(&img, 0x24, &2u32.to_be_bytes());
    let r = vimg_raw(&["info", s(&img)]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("invalid encryption method"));
    // qcow2: crypt_method 3.
    let img = qemu_aes(d, "h.qcow2", "qcow2", "encryption=on", "1M");
    let before = fs::read(&img).unwrap();
    patch(&img, 0x20, &3u32.to_be_bytes());
    let r = vimg_raw(&["info", s(&img)]);
    assert_eq!(
        r.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&r.stdout)
    );
    fs::write(&img, &before).unwrap();
    // Truncated: the last data cluster is cut short; reads as qemu-img reads it (zeros
    // under the missing part, decrypted) or fails cleanly.
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(before.len() as u64 - 1000).unwrap();
    drop(f);
    let out = d.join("t.raw");
    let mut args = vec!["convert", "--object", OBJ, "--image-opts"];
    let sp = spec("qcow2", &img);
    args.push(&sp);
    args.extend(["-O", "raw", s(&out)]);
    let v = vimg_raw(&args);
    assert!(matches!(v.status.code(), Some(0) | Some(1)));
    let _ = fs::remove_file(&out);
    fs::write(&img, &before).unwrap();

    // Without the key (a plain name), changes in place are refused in qemu-img's words,
    // the image unchanged.
    for args in [
        vec!["rebase", "-u", "-b", "", s(&img)],
        vec!["amend", "-o", "lazy_refcounts=on", s(&img)],
    ] {
        let r = vimg_raw(&args);
        assert_eq!(r.status.code(), Some(1), "{args:?}");
        let e = String::from_utf8_lossy(&r.stderr);
        assert!(e.contains("encrypt.key-secret"), "{args:?}: {e}");
    }
    assert_eq!(fs::read(&img).unwrap(), before);
    // With it, guest writes go in encrypted (convert -n; more in encrypted_inplace.rs):
    // qemu-img reads them back.
    let src = d.join("s.raw");
    write_sparse_raw(&src, 1 << 20, &[(0, &[0x5a; 4096])]);
    vimg(&[
        "convert",
        "-n",
        "--object",
        OBJ,
        "-f",
        "raw",
        "--target-image-opts",
        s(&src),
        &sp,
    ]);
    qemu_img(&[
        "compare",
        "--object",
        OBJ,
        "--image-opts",
        &format!("driver=raw,file.filename={}", s(&src)),
        &sp,
    ]);
}

/// Compressed clusters in an AES image are not decrypted (qemu reads them as they are):
/// a compressed qcow2 whose header says AES reads in vimg as in qemu-img.
#[test]
fn compressed_clusters_in_aes_images_read_like_qemu() {
    if !qemu_available("compressed_clusters_in_aes_images_read_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("c.raw");
    // Compressible (an incompressible cluster is stored plain, and then decrypted).
    let data: Vec<u8> = (0..200 * 1024u32).map(|i| (i / 1000) as u8).collect();
    write_sparse_raw(&src, 1 << 20, &[(0, &data[..]), (512 * 1024, &[7u8; 8192])]);
    // (qemu-img 10.0.2's `convert -c -O qcow` fails without a message, so qcow2 only.)
    let img = d.join("c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&src),
        s(&img),
    ]);
    // crypt_method (0x20) says AES.
    patch(&img, 0x20, &1u32.to_be_bytes());
    let q = d.join("q.raw");
    let v = d.join("v.raw");
    convert_raw("qemu-img", "qcow2", &img, &q, OBJ);
    convert_raw("vimg", "qcow2", &img, &v, OBJ);
    assert_same_file(&q, &v);
    assert!(fs::read(&v).unwrap() == fs::read(&src).unwrap());
}

/// An AES qcow2 with an external data file: the data file is bit-identical to qemu-img's
/// (guest-sector IVs, the last cluster encrypted whole), the image differs only in the
/// data file's name.
#[test]
fn aes_with_data_file_like_qemu() {
    if !qemu_available("aes_with_data_file_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    let data = pattern(70 * 1024, 9);
    write_sparse_raw(
        &src,
        (2 << 20) + 1536,
        &[(0, &data[..]), (2 << 20, &data[..1536])],
    );
    let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
    for (prog, img, df) in [
        ("qemu-img".into(), &q, d.join("q.data")),
        (vimg_bin().into_os_string(), &v, d.join("v.data")),
    ] {
        let o = format!(
            "encrypt.format=aes,encrypt.key-secret=sec0,data_file={}",
            s(&df)
        );
        run_ok(
            prog,
            &[
                "convert",
                "--object",
                OBJ,
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &o,
                s(&src),
                s(img),
            ],
        );
    }
    assert_same_file(&d.join("q.data"), &d.join("v.data"));
    let (a, b) = (fs::read(&q).unwrap(), fs::read(&v).unwrap());
    assert_eq!(a.len(), b.len());
    let diff: Vec<usize> = (0..a.len()).filter(|i| a[*i] != b[*i]).collect();
    assert!(diff.len() <= 1, "header differs at {diff:?}");
    let back = d.join("back.raw");
    convert_raw("qemu-img", "qcow2", &v, &back, OBJ);
    assert!(fs::read(&back).unwrap() == fs::read(&src).unwrap());
}

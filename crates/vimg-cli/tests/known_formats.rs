//! Issue 13, first part: a file with the signature of a format qemu-img reads is never
//! copied as raw. Until vimg reads a format, probing names it and refuses it before anything
//! is written; `-f raw` stays the explicit way to copy the bytes.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

/// Formats vimg recognises but does not read yet (none since LUKS is read).
#[allow(dead_code)]
const UNREAD: &[&str] = &[];

/// Asserts vimg refuses `img` as a `fmt` image in `convert` (leaving no output) and in
/// `info` (text and JSON), and that `-f raw` copies its bytes.
#[allow(dead_code)]
fn assert_refused_as(img: &Path, fmt: &str, dir: &Path) {
    let out = dir.join("out.raw");
    let _ = fs::remove_file(&out);
    let r = vimg_raw(&["convert", "-O", "raw", s(img), s(&out)]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "convert {}: {err}", img.display());
    assert!(
        err.contains(&format!("is a {fmt} image; vimg does not read {fmt}")),
        "convert {}: {err}",
        img.display()
    );
    assert!(!out.exists(), "a refused convert left {}", out.display());
    for extra in [&[][..], &["--output=json"][..]] {
        let mut args = vec!["info"];
        args.extend_from_slice(extra);
        args.push(s(img));
        let r = vimg_raw(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "info {}: {err}", img.display());
        assert!(err.contains(&format!("is a {fmt} image")), "{err}");
        assert!(
            !String::from_utf8_lossy(&r.stdout).contains("raw"),
            "info called {} raw",
            img.display()
        );
    }
    for cmd in [
        &["map"][..],
        &["check"][..],
        &["measure", "-O", "qcow2"][..],
    ] {
        let mut args = cmd.to_vec();
        args.push(s(img));
        let r = vimg_raw(&args);
        assert_ne!(
            r.status.code(),
            Some(0),
            "{cmd:?} {} succeeded",
            img.display()
        );
        assert!(String::from_utf8_lossy(&r.stderr).contains(&format!("{fmt} image")));
    }
    // The explicit raw copy still works and is the file's bytes (padded to whole sectors,
    // as qemu-img pads them).
    vimg(&["convert", "-f", "raw", "-O", "raw", s(img), s(&out)]);
    let (got, want) = (fs::read(&out).unwrap(), fs::read(img).unwrap());
    assert!(
        got.len() >= want.len()
            && got[..want.len()] == want[..]
            && got[want.len()..].iter().all(|b| *b == 0),
        "-f raw did not copy {} as it is",
        img.display()
    );
    let _ = fs::remove_file(&out);
}

fn qemu_made(fmt: &str, dir: &Path) -> PathBuf {
    let img = dir.join(format!("x.{fmt}"));
    match fmt {
        "luks" => {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                "secret,id=s,data=x",
                "-o",
                "key-secret=s,iter-time=10",
                s(&img),
                "4M",
            ]);
        }
        _ => {
            qemu_img(&["create", "-q", "-f", fmt, s(&img), "4M"]);
            qemu_io(fmt, &img, &["write -P 0xaa 0 64k"]);
        }
    }
    img
}

#[test]
fn qemu_made_luks_without_secret_is_refused_not_copied() {
    if !qemu_available("qemu_made_luks_without_secret_is_refused_not_copied") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // vimg reads LUKS now (tests/luks.rs); without its secret it is refused by qemu-img's
    // words, never copied as raw.
    let img = qemu_made("luks", dir.path());
    let out = dir.path().join("out.raw");
    let r = vimg_raw(&["convert", "-O", "raw", s(&img), s(&out)]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Parameter 'key-secret' is required for cipher"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn luks2_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("luks2.img");
    let mut b = vec![0u8; 1 << 20];
    b[..8].copy_from_slice(b"LUKS\xba\xbe\x00\x02");
    fs::write(&img, &b).unwrap();
    let r = vimg_raw(&["convert", "-O", "raw", s(&img), s(&dir.path().join("o"))]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("LUKS2"), "{err}");
    assert!(!dir.path().join("o").exists());
}

/// Every corpus sample of a format qemu-img reads beyond the classic six (parallels, bochs,
/// cloop, dmg) is now read as that format: probing never calls it raw.
#[test]
fn corpus_samples_probe_as_their_format() {
    let Some(corpus) = corpus_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for row in corpus_rows(&corpus, &[""]) {
        if !["parallels", "qed", "qcow", "luks", "dmg", "bochs", "cloop"]
            .contains(&row.format.as_str())
        {
            continue;
        }
        let img = corpus_file(&corpus, &row, dir.path());
        let info: serde_json::Value =
            serde_json::from_str(&vimg(&["info", "--output=json", s(&img)])).unwrap();
        assert_eq!(info["format"], row.format.as_str(), "{}", row.file);
        let _ = fs::remove_file(&img);
        seen += 1;
    }
    assert!(
        seen >= 6,
        "expected the parallels, bochs, cloop and dmg samples, found {seen}"
    );
}

#[test]
fn create_of_an_unread_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in UNREAD {
        let img = dir.path().join(format!("new.{fmt}"));
        let r = vimg_raw(&["create", "-f", fmt, s(&img), "1M"]);
        assert_eq!(r.status.code(), Some(1), "create -f {fmt}");
        assert!(!img.exists(), "create -f {fmt} left a file");
    }
}

/// qemu-img's info JSON without what vimg adds (image-service, external references) and
/// without the child nodes (their disk usage depends on the file system).
fn info_json(tool: &str, img: &std::path::Path) -> serde_json::Value {
    let args = ["info", "--output=json", s(img)];
    let text = if tool == "qemu" {
        qemu_img(&args)
    } else {
        vimg(&args)
    };
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    if let Some(o) = v.as_object_mut() {
        for k in ["children", "image-service", "vimg-external-references"] {
            o.remove(k);
        }
    }
    v
}

#[test]
fn info_json_is_qemu_imgs() {
    if !qemu_available("info_json_is_qemu_imgs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["parallels", "qed", "qcow"] {
        let img = dir.path().join(format!("i.{fmt}"));
        qemu_img(&["create", "-q", "-f", fmt, s(&img), "4M"]);
        qemu_io(fmt, &img, &["write -P 0xaa 0 8k"]);
        assert_eq!(info_json("vimg", &img), info_json("qemu", &img), "{fmt}");
        if fmt != "qcow" {
            // check: the same report, text and JSON, and the same exit status.
            for extra in [&[][..], &["--output=json"][..]] {
                let mut args = vec!["check"];
                args.extend_from_slice(extra);
                args.push(s(&img));
                let q = run_cmd("qemu-img", &args);
                let v = vimg_raw(&args);
                assert_eq!(v.status.code(), q.status.code(), "{fmt} {extra:?}");
                assert_eq!(
                    String::from_utf8_lossy(&v.stdout),
                    String::from_utf8_lossy(&q.stdout),
                    "{fmt} {extra:?}"
                );
            }
        }
    }
    if let Some(corpus) = corpus_dir() {
        for row in corpus_rows(&corpus, &[""]) {
            if !["bochs", "cloop", "dmg"].contains(&row.format.as_str()) {
                continue;
            }
            let img = corpus_file(&corpus, &row, dir.path());
            assert_eq!(
                info_json("vimg", &img),
                info_json("qemu", &img),
                "{}",
                row.file
            );
        }
    }
}

//! `amend -o data_file=` (issue 15), against qemu-img amend on a copy: another name for
//! the external data file, or (empty) none, on images that have one; refused with
//! qemu-img's words on images that do not, before anything changes; combined with
//! `data_file_raw=off`; a run killed at every write leaves the old name or the new one.

mod common;

use std::path::Path;

use common::kill::run_killed;
use common::*;

fn data_file_of(img: &Path) -> Option<String> {
    let v = json(&qemu_img(&["info", "--output=json", "-f", "qcow2", s(img)]));
    v["format-specific"]["data"]["data-file"]
        .as_str()
        .map(str::to_string)
}

fn data_file_of_err(img: &Path) -> String {
    let out = run_cmd("qemu-img", &["info", "-f", "qcow2", s(img)]);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What qemu-io says opening `img` (which must fail).
fn info_err(img: &Path) -> String {
    let out = run_cmd("qemu-io", &["-f", "qcow2", "-c", "read 0 4k", s(img)]);
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A qcow2 image in `d` with the external data file `d.raw` (raw when `raw`) and data.
fn image(d: &Path, raw: bool) -> std::path::PathBuf {
    let img = d.join("i.qcow2");
    // Absolute names: qemu opens a data file name as given (from its working folder).
    let opts = format!(
        "data_file={},data_file_raw={}",
        s(&d.join("d.raw")),
        if raw { "on" } else { "off" }
    );
    qemu_in(d, &["create", "-q", "-f", "qcow2", "-o", &opts, "i.qcow2", "1M"]);
    qemu_io("qcow2", &img, &["write -P 0x3c 0 64k", "write -P 0x4d 512k 64k"]);
    img
}

fn both(d: &Path, img: &Path, opts: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
    std::fs::copy(img, &q).unwrap();
    std::fs::copy(img, &v).unwrap();
    let qo = run_cmd("qemu-img", &["amend", "-f", "qcow2", "-o", opts, s(&q)]);
    let vo = vimg_raw(&["amend", "-f", "qcow2", "-o", opts, s(&v)]);
    assert_eq!(vo.status.code(), qo.status.code(), "{opts}");
    assert_eq!(
        String::from_utf8_lossy(&vo.stderr).replacen("vimg:", "qemu-img:", 1),
        String::from_utf8_lossy(&qo.stderr).replace(s(&q), s(&v)),
        "{opts}"
    );
    (q, v)
}

#[test]
fn data_file_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for raw in [false, true] {
        let img = image(d, raw);
        std::fs::copy(d.join("d.raw"), d.join("d2.raw")).unwrap();
        // Another name: stored as given; the image then reads through the new file.
        let d2 = s(&d.join("d2.raw")).to_string();
        for opts in [
            format!("data_file={d2}"),
            format!("data_file={d2},data_file_raw=off"),
        ] {
            let opts = opts.as_str();
            let (q, v) = both(d, &img, opts);
            assert_eq!(data_file_of(&v), Some(d2.clone()), "{opts}");
            assert_eq!(data_file_of(&v), data_file_of(&q), "{opts}");
            let info = |p: &Path| {
                json(&qemu_img(&["info", "--output=json", "-f", "qcow2", s(p)]))
                    ["format-specific"]
                    .clone()
            };
            assert_eq!(info(&v), info(&q), "{opts}");
            qemu_img(&["check", "-q", "-f", "qcow2", s(&v)]);
            qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "qcow2", s(&v), s(&img)]);
            // vimg reads it too (the new name resolves inside the image's folder).
            assert_eq!(
                sha256_file(&d.join("d2.raw")),
                sha256_file(&d.join("d.raw"))
            );
            vimg(&["compare", "-q", "-f", "qcow2", "-F", "qcow2", s(&v), s(&img)]);
        }
        // No name: the image then needs its data file named when it is opened.
        let (q, v) = both(d, &img, "data_file=");
        assert_eq!(info_err(&v), info_err(&q).replace(s(&q), s(&v)));
        assert!(info_err(&v).contains("'data-file' is required"));
        // A name of a file that does not exist is stored as given, as qemu-img does.
        let (q, v) = both(d, &img, "data_file=gone.raw");
        assert_eq!(data_file_of_err(&v), data_file_of_err(&q).replace(s(&q), s(&v)));
    }
    // An image without an external data file: refused, untouched.
    let plain = d.join("plain.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&plain), "1M"]);
    for opts in [
        "data_file=x.raw",
        "data_file=",
        "lazy_refcounts=on,data_file=x.raw",
    ] {
        let before = sha256_file(&plain);
        let (q, v) = both(d, &plain, opts);
        assert_eq!(sha256_file(&v), before, "{opts}");
        assert_eq!(sha256_file(&q), before, "{opts}");
    }
}

#[test]
fn data_file_killed_at_every_write() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img0 = image(d, false);
    let img0c = d.join("orig.qcow2");
    std::fs::copy(&img0, &img0c).unwrap();
    std::fs::copy(d.join("d.raw"), d.join("d2.raw")).unwrap();
    let img = d.join("k.qcow2");
    let mut killed = 0;
    for n in 0.. {
        std::fs::copy(&img0c, &img).unwrap();
        let (d1, d2) = (s(&d.join("d.raw")).to_string(), s(&d.join("d2.raw")).to_string());
        let opt = format!("data_file={d2}");
        let args = ["amend", "-f", "qcow2", "-o", &opt, s(&img)];
        let k = run_killed(&args, n);
        let name = data_file_of(&img);
        assert!(
            name.as_deref() == Some(d1.as_str()) || name.as_deref() == Some(d2.as_str()),
            "killed at {n}: {name:?}"
        );
        qemu_img(&["check", "-q", "-f", "qcow2", s(&img)]);
        qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "qcow2", s(&img), s(&img0c)]);
        if !k {
            assert_eq!(name.as_deref(), Some(d2.as_str()));
            break;
        }
        killed += 1;
        assert!(n < 100);
    }
    assert!(killed >= 1);
}

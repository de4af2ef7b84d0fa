//! qcow2's external data file named on the command line (`data-file.filename` in
//! `--image-opts` and `json:` names, iotest 061): the user's file is read in place of the one
//! the image names, `amend -o data_file=` removes the stored name, and an image that names
//! none opens for `info` and is refused for reading with qemu-img's words. Every result is
//! compared with qemu-img's on a copy of the same image.

mod common;

use std::fs;
use std::path::Path;
use std::process::Output;

use common::*;

/// An image with an external data file holding a pattern, made by qemu-img.
fn image(dir: &Path, name: &str) -> (String, String) {
    let img = dir.join(name);
    let data = dir.join(format!("{name}.data"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("compat=1.1,data_file={}", s(&data)),
        s(&img),
        "4M",
    ]);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5c 64k 192k",
            "-c",
            "write -z 1M 64k",
            s(&img),
        ],
    );
    (s(&img).to_string(), s(&data).to_string())
}

fn opts(img: &str, data: &str) -> String {
    format!("data-file.filename={data},file.filename={img}")
}

/// `v` as text with object keys sorted and vimg's own keys left out.
fn canon(v: &serde_json::Value) -> String {
    use serde_json::Value;
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let b: std::collections::BTreeMap<_, _> = m
                    .iter()
                    .filter(|(k, _)| !k.starts_with("vimg-") && *k != "image-service")
                    .map(|(k, v)| (k.clone(), sorted(v)))
                    .collect();
                serde_json::to_value(b).unwrap()
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            x => x.clone(),
        }
    }
    sorted(v).to_string()
}

fn both(tool: &str, args: &[&str]) -> Output {
    if tool == "qemu-img" {
        run_cmd("qemu-img", args)
    } else {
        run_cmd(vimg_bin(), args)
    }
}

#[test]
fn data_file_named_by_the_user_reads_like_qemu() {
    let t = "data_file_named_by_the_user_reads_like_qemu";
    if !qemu_available(t) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut finals = Vec::new();
    let mut outputs: Vec<Vec<String>> = Vec::new();
    for tool in ["qemu-img", "vimg"] {
        let (img, data) = image(dir.path(), &format!("{tool}.qcow2"));
        let mut seen = Vec::new();
        // The image names a data file that does not exist; the user names the real one.
        let o = both(tool, &["amend", "-o", "data_file=missing.data", &img]);
        assert!(o.status.success(), "{tool}: {}", said(&o));
        let io = opts(&img, &data);
        let json_name = format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{img}"}},"data-file":{{"driver":"file","filename":"{data}"}}}}"#
        );
        for name in [["--image-opts", io.as_str()], ["--", json_name.as_str()]] {
            let with = |a: &[&str]| -> Vec<String> {
                let mut v: Vec<String> = a.iter().map(|x| x.to_string()).collect();
                if name[0] != "--" {
                    v.push(name[0].into());
                }
                v.push(name[1].into());
                v
            };
            let a = with(&["info", "--output=json"]);
            let o = both(tool, &a.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(o.status.success(), "{tool} {a:?}: {}", said(&o));
            let mut v = json(&String::from_utf8_lossy(&o.stdout));
            // The file names differ (two copies); vimg adds keys of its own.
            v.as_object_mut()
                .unwrap()
                .retain(|k, _| !["filename", "actual-size", "children"].contains(&k.as_str()));
            seen.push(canon(&v));
            let a = with(&["map", "--output=json"]);
            let o = both(tool, &a.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(o.status.success(), "{tool} {a:?}: {}", said(&o));
            seen.push(String::from_utf8_lossy(&o.stdout).into_owned());
            let out = dir.path().join(format!("{tool}.raw"));
            let mut a = with(&["convert", "-O", "raw"]);
            a.push(s(&out).into());
            let o = both(tool, &a.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(o.status.success(), "{tool} {a:?}: {}", said(&o));
            seen.push(sha256_file(&out));
        }
        // Without the user's name the stored one is used: it does not exist.
        let o = both(tool, &["convert", "-O", "raw", &img, "/dev/null"]);
        assert!(!o.status.success(), "{tool}");
        // The stored name removed, as qemu-img's iotest 061 does it.
        let o = both(tool, &["amend", "-o", "data_file=", "--image-opts", &io]);
        assert!(o.status.success(), "{tool}: {}", said(&o));
        let o = both(tool, &["info", "--output=json", &img]);
        assert!(o.status.success(), "{tool} info: {}", said(&o));
        let v = json(&String::from_utf8_lossy(&o.stdout));
        seen.push(canon(&v["format-specific"]));
        let o = both(tool, &["convert", "-O", "raw", &img, "/dev/null"]);
        assert_eq!(o.status.code(), Some(1), "{tool}");
        seen.push(said(&o).replace(&img, "IMG"));
        let raw = format!("driver=raw,file.filename={data}");
        let o = both(tool, &["compare", "--image-opts", &io, &raw]);
        seen.push(format!("{:?} {}", o.status.code(), said(&o)));
        finals.push(img.clone());
        outputs.push(seen);
    }
    assert_eq!(outputs[0].len(), outputs[1].len());
    for (q, v) in outputs[0].iter().zip(&outputs[1]) {
        assert_eq!(v, q, "vimg (left) and qemu-img (right) differ");
    }
    assert!(
        outputs[1]
            .iter()
            .any(|l| l.contains("'data-file' is required for this image")),
        "{:?}",
        outputs[1]
    );
    // Not byte for byte: vimg leaves QEMU's feature-name table out of a header it rewrites
    // when the table would make the rewrite more than one sector (docs/iotests.md).
    for img in &finals {
        let data = format!("{img}.data");
        let o = run_cmd("qemu-img", &["check", "--image-opts", &opts(img, &data)]);
        assert!(o.status.success(), "{img}: {}", said(&o));
    }
}

/// An image without an external data file takes none: `info` ignores the option, reading
/// refuses it, both in qemu-img's words.
#[test]
fn data_file_option_on_an_image_without_one() {
    let t = "data_file_option_on_an_image_without_one";
    if !qemu_available(t) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("plain.qcow2");
    qemu_create(&img, "qcow2", "", "1M");
    fs::write(dir.path().join("plain.qcow2.data"), vec![0u8; 1 << 20]).unwrap();
    let io = format!(
        "data-file.filename={}.data,file.filename={}",
        s(&img),
        s(&img)
    );
    let out = dir.path().join("o.raw");
    for tool in ["qemu-img", "vimg"] {
        let o = both(tool, &["info", "--image-opts", &io]);
        assert!(o.status.success(), "{tool}: {}", said(&o));
        let o = both(
            tool,
            &["convert", "-O", "raw", "--image-opts", &io, s(&out)],
        );
        assert_eq!(o.status.code(), Some(1), "{tool}");
        assert!(
            said(&o).contains("'data-file' can only be set for images with an external data file"),
            "{tool}: {}",
            said(&o)
        );
    }
}

#[test]
fn data_file_option_is_refused_for_other_formats() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    fs::write(&img, vec![0u8; 65536]).unwrap();
    let o = vimg_raw(&[
        "info",
        "--image-opts",
        &format!("driver=raw,data-file.filename=x,file.filename={}", s(&img)),
    ]);
    assert!(!o.status.success());
    assert!(said(&o).contains("data-file"), "{}", said(&o));
}

//! `info`'s `children` (the node tree qemu-img 10 prints) comes from the library's
//! `ImageInfo` and is byte-identical to qemu-img's, JSON and human, for images with more
//! than one child node: multi-extent VMDKs (qemu lists the newest child first), a qcow2
//! with an external data file, a chain with `--backing-chain`.

mod common;

use std::path::Path;

use common::*;

/// qemu-img's output for `args` is vimg's up to where vimg's own keys/lines begin.
fn assert_prefix_like_qemu(args: &[&str]) {
    let q = qemu_img(args);
    let v = vimg(args);
    let json = args.contains(&"--output=json");
    let want = if json {
        // vimg's own keys follow qemu's last one: qemu's text without its closing brace.
        q.trim_end()
            .trim_end_matches('}')
            .trim_end_matches(']')
            .trim_end()
            .to_string()
    } else {
        q.clone()
    };
    assert!(v.starts_with(&want), "{args:?}\nqemu-img:\n{q}\nvimg:\n{v}");
}

fn images(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for (name, sub, size) in [
        ("sparse3.vmdk", "twoGbMaxExtentSparse", "5G"),
        ("flat2.vmdk", "twoGbMaxExtentFlat", "3G"),
    ] {
        let p = dir.join(name);
        qemu_create(&p, "vmdk", &format!("subformat={sub}"), size);
        out.push(s(&p).to_string());
    }
    let dd = dir.join("dd.qcow2");
    let data = dir.join("dd.data");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&data)),
        s(&dd),
        "1M",
    ]);
    out.push(s(&dd).to_string());
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    qcow2_overlay(&top, s(&base), "", None);
    out.push(s(&top).to_string());
    out
}

#[test]
fn children_json_and_human_byte_identical_to_qemu() {
    if !qemu_available("children_json_and_human_byte_identical_to_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for img in images(dir.path()) {
        assert_prefix_like_qemu(&["info", "--output=json", &img]);
        assert_prefix_like_qemu(&["info", &img]);
    }
    let top = dir.path().join("top.qcow2");
    let q = json(&qemu_img(&[
        "info",
        "--output=json",
        "--backing-chain",
        s(&top),
    ]));
    let v = json(&vimg(&[
        "info",
        "--output=json",
        "--backing-chain",
        s(&top),
    ]));
    for i in 0..2 {
        assert_eq!(v[i]["children"], q[i]["children"], "layer {i}");
    }
}

#[test]
fn vmdk_extents_are_listed_newest_first() {
    if !qemu_available("vmdk_extents_are_listed_newest_first") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.vmdk");
    qemu_create(&p, "vmdk", "subformat=twoGbMaxExtentFlat", "5G");
    let v = json(&vimg(&["info", "--output=json", s(&p)]));
    let names: Vec<&str> = v["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["extents.2", "extents.1", "extents.0", "file"]);
    assert_eq!(
        v["children"][0]["info"]["filename"],
        s(&dir.path().join("e-f003.vmdk"))
    );
}

#[test]
fn compressed_input_file_length_is_the_compressed_files() {
    let test = "compressed_input_file_length_is_the_compressed_files";
    if !qemu_available(test) || !tool_available(test, "xz") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, pattern(3 << 20, 7)).unwrap();
    let q = dir.path().join("d.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)]);
    run_ok("xz", &["-k", "-1", s(&q)]);
    let xz = dir.path().join("d.qcow2.xz");
    let stored = std::fs::metadata(&xz).unwrap().len();
    let decoded = std::fs::metadata(&q).unwrap().len();
    let v = json(&vimg(&["info", "--output=json", s(&xz)]));
    let file = &v["children"][0]["info"];
    assert_eq!(v["children"][0]["name"], "file");
    assert_eq!(file["filename"], s(&xz));
    assert_eq!(file["virtual-size"], stored.div_ceil(512) * 512, "{v}");
    assert_eq!(v["vimg-container"]["decoded-size"], decoded, "{v}");
    let human = vimg(&["info", s(&xz)]);
    let want = "    file length: ";
    let line = human
        .lines()
        .find(|l| l.starts_with(want))
        .unwrap_or_else(|| panic!("{human}"));
    assert!(
        line.ends_with(&format!("({} bytes)", stored.div_ceil(512) * 512)),
        "{human}"
    );
}

//! Issue 13, ploop directories: a `DiskDescriptor.xml` (built here, single snapshot, as
//! docs/interop/prl-xml.rst describes it) opens the parallels image it names; `info` says
//! parallels, the image service says `ploop`; `convert`, `map` and `check` give what
//! qemu-img gives for the image file itself (this qemu-img reads no descriptor: it probes
//! one as raw and refuses it with `-f parallels`). The name inside the XML goes through
//! the gate; descriptors that disagree with their image, or describe what vimg does not
//! read (split images, snapshot chains, Plain images), are refused and write nothing.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use vimg::{ErrorKind, Image, OpenOptions};

const GUID: &str = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";
const ZERO: &str = "{00000000-0000-0000-0000-000000000000}";

fn descriptor(sectors: u64, blocksize: u64, file: &str) -> String {
    format!(
        r#"<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
    <Disk_Parameters>
        <Disk_size>{sectors}</Disk_size>
        <Cylinders>8</Cylinders>
        <Heads>16</Heads>
        <Sectors>32</Sectors>
        <Padding>0</Padding>
        <Encryption>
            <Engine>{ZERO}</Engine>
            <Data></Data>
        </Encryption>
        <UID>{GUID}</UID>
    </Disk_Parameters>
    <StorageData>
        <Storage>
            <Start>0</Start>
            <End>{sectors}</End>
            <Blocksize>{blocksize}</Blocksize>
            <Image>
                <GUID>{GUID}</GUID>
                <Type>Compressed</Type>
                <File>{file}</File>
            </Image>
        </Storage>
    </StorageData>
    <Snapshots>
        <Shot>
            <GUID>{GUID}</GUID>
            <ParentGUID>{ZERO}</ParentGUID>
        </Shot>
    </Snapshots>
</Parallels_disk_image>
"#
    )
}

/// A ploop directory `dir/name` with a 6 MiB root.hds (256 KiB clusters) qemu-img made
/// and qemu-io filled.
fn ploop_dir(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let d = dir.join(name);
    fs::create_dir_all(&d).unwrap();
    let root = d.join("root.hds");
    qemu_create(&root, "parallels", "cluster_size=256k", "6M");
    qemu_io(
        "parallels",
        &root,
        &[
            "write -P 0x61 0 256k",
            "write -P 0x62 1M 4k",
            "write -P 0x63 5M 512k",
        ],
    );
    let xml = d.join("DiskDescriptor.xml");
    fs::write(&xml, descriptor(6 * 2048, 512, "root.hds")).unwrap();
    (xml, root)
}

#[test]
fn descriptor_reads_as_its_image() {
    if !qemu_available("descriptor_reads_as_its_image") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (xml, root) = ploop_dir(dir.path(), "ct");
    // What qemu-img does with the descriptor on this machine: raw (no XML support).
    let q = json(&qemu_img(&["info", "--output=json", s(&xml)]));
    assert_eq!(q["format"], "raw");
    let q_raw = dir.path().join("q.raw");
    qemu_img(&[
        "convert",
        "-f",
        "parallels",
        "-O",
        "raw",
        s(&root),
        s(&q_raw),
    ]);
    for f in [None, Some("parallels")] {
        let v_raw = dir.path().join("v.raw");
        let mut a = vec!["convert"];
        if let Some(f) = f {
            a.extend(["-f", f]);
        }
        a.extend(["-O", "raw", s(&xml), s(&v_raw)]);
        vimg(&a);
        assert_same_file(&q_raw, &v_raw);
    }
    let v = json(&vimg(&["info", "--output=json", s(&xml)]));
    assert_eq!(v["format"], "parallels", "{v}");
    assert_eq!(v["virtual-size"], 6 << 20);
    assert_eq!(v["image-service"]["disk_format"], "ploop", "{v}");
    let qi = json(&qemu_img(&[
        "info",
        "--output=json",
        "-f",
        "parallels",
        s(&root),
    ]));
    assert_eq!(v["format-specific"], qi["format-specific"]);
    assert_eq!(v["vimg-external-references"][0]["name"], "root.hds", "{v}");
    // map: qemu-img's runs for the image file, the offsets in root.hds.
    let vm = json(&vimg(&["map", "--output=json", s(&xml)]));
    let qm = json(&qemu_img(&[
        "map",
        "--output=json",
        "-f",
        "parallels",
        s(&root),
    ]));
    assert_eq!(vm, qm);
    let out = vimg(&["check", s(&xml)]);
    assert!(out.contains("No errors were found"), "{out}");
    // Converting to a new parallels image reads back identically in qemu-img.
    let back = dir.path().join("back.hds");
    vimg(&["convert", "-O", "parallels", s(&xml), s(&back)]);
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "parallels",
        "-F",
        "parallels",
        s(&root),
        s(&back),
    ]);
    assert!(cmp.contains("identical"), "{cmp}");
}

/// Opening `xml` fails with `kind`; converting it fails and writes nothing.
fn assert_refused(xml: &Path, kind: ErrorKind, what: &str) -> String {
    let e = Image::open(xml, &OpenOptions::default())
        .err()
        .unwrap_or_else(|| panic!("{what}: opened"));
    assert_eq!(e.kind(), kind, "{what}: {e}");
    let out = xml.with_file_name("out.raw");
    let r = vimg_raw(&["convert", "-O", "raw", s(xml), s(&out)]);
    assert_eq!(r.status.code(), Some(1), "{what}");
    assert!(!out.exists(), "{what}: output left behind");
    String::from_utf8_lossy(&r.stderr).into_owned()
}

#[test]
fn names_in_the_descriptor_go_through_the_gate() {
    if !qemu_available("names_in_the_descriptor_go_through_the_gate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (xml, root) = ploop_dir(dir.path(), "ct");
    // A parallels image outside the directory, and a host file.
    fs::copy(&root, dir.path().join("outside.hds")).unwrap();
    for name in [
        "../outside.hds",
        s(&dir.path().join("outside.hds")),
        "/etc/passwd",
        "json:{\"driver\":\"parallels\"}",
        "../does-not-exist.hds",
    ] {
        fs::write(&xml, descriptor(6 * 2048, 512, name)).unwrap();
        let err = assert_refused(&xml, ErrorKind::UnsafeReference, name);
        assert!(err.contains(name), "{name}: reported as spelled: {err}");
    }
    // Inside the directory but missing: an I/O error naming it.
    fs::write(&xml, descriptor(6 * 2048, 512, "missing.hds")).unwrap();
    assert_refused(&xml, ErrorKind::Io, "missing");
    // A name that is not a parallels image.
    fs::write(dir.path().join("ct/plain.img"), vec![0u8; 6 << 20]).unwrap();
    fs::write(&xml, descriptor(6 * 2048, 512, "plain.img")).unwrap();
    let e = Image::open(&xml, &OpenOptions::default()).err().unwrap();
    assert!(e.to_string().contains("arallels"), "{e}");
}

#[test]
fn descriptors_vimg_does_not_read_are_refused() {
    if !qemu_available("descriptors_vimg_does_not_read_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (xml, _) = ploop_dir(dir.path(), "ct");
    let good = descriptor(6 * 2048, 512, "root.hds");
    for (from, to, kind, what) in [
        ("12288", "8192", ErrorKind::Invalid, "Disk_size"),
        ("<Blocksize>512", "<Blocksize>2048", ErrorKind::Invalid, "Blocksize"),
        ("<Type>Compressed", "<Type>Plain", ErrorKind::Unsupported, "Plain"),
        ("</Storage>", "</Storage><Storage/>", ErrorKind::Unsupported, "split"),
        (
            "</Shot>",
            "</Shot><Shot><GUID>{1}</GUID><ParentGUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</ParentGUID></Shot>",
            ErrorKind::Unsupported,
            "single-snapshot",
        ),
        ("<?xml version='1.0' encoding='UTF-8'?>", "<!DOCTYPE p [<!ENTITY x SYSTEM \"/etc/passwd\">]>", ErrorKind::Invalid, "DOCTYPE"),
        ("<File>root.hds", "<File>&x;", ErrorKind::Invalid, "bad text"),
    ] {
        let bad = good.replace(from, to);
        assert_ne!(bad, good, "{from}");
        fs::write(&xml, &bad).unwrap();
        let err = assert_refused(&xml, kind, what);
        assert!(err.contains(what), "{what}: {err}");
    }
}

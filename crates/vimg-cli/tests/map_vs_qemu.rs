//! Issue 13, `map` of the formats added for it against qemu-img, byte for byte: the JSON
//! array and the human table (stdout, stderr with the program name swapped, exit code) on
//! the corpus images (bochs, cloop, dmg, parallels) and on images qemu-img makes and
//! qemu-io fills (luks, parallels with partly written clusters, qed, qcow). qemu's
//! bochs/cloop/dmg/luks drivers answer no block status, so qemu-img maps them as data
//! without an offset (and the human table stops with "File contains external, encrypted
//! or compressed clusters." after its header); its parallels driver does not look for
//! holes in the host file under data clusters, nor do its qed and qcow drivers (checked on
//! images vimg writes, whose partly zero clusters keep holes).

mod common;

use std::path::{Path, PathBuf};

use common::*;

const OBJ: &str = "secret,id=s,data=pw";

/// Runs `prog map ARGS` for both output formats; stdout, stderr and status must match.
fn assert_map_like_qemu(args: &[&str], what: &str) {
    for o in ["--output=json", "--output=human"] {
        let mut a = vec!["map", o];
        a.extend_from_slice(args);
        let q = run_cmd("qemu-img", &a);
        let v = run_cmd(vimg_bin(), &a);
        assert_eq!(v.status.code(), q.status.code(), "{what} {o}");
        assert_eq!(
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&q.stdout),
            "{what} {o}"
        );
        let verr = String::from_utf8_lossy(&v.stderr).replace("vimg: ", "qemu-img: ");
        assert_eq!(verr, String::from_utf8_lossy(&q.stderr), "{what} {o}");
    }
}

/// The corpus images of `format`, decompressed into `dir`.
fn corpus_images(format: &str, dir: &Path) -> Vec<PathBuf> {
    let Some(corpus) = corpus_dir() else {
        return Vec::new();
    };
    let v: Vec<PathBuf> = corpus_rows(&corpus, &[""])
        .into_iter()
        .filter(|r| r.format == format)
        .map(|r| corpus_file(&corpus, &r, dir))
        .collect();
    assert!(!v.is_empty(), "no {format} image in the corpus");
    v
}

fn corpus_case(format: &str) {
    if !qemu_available(&format!("map_{format}")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for img in corpus_images(format, dir.path()) {
        assert_map_like_qemu(&["-f", format, s(&img)], s(&img));
        assert_map_like_qemu(&[s(&img)], s(&img));
    }
}

#[test]
fn bochs_maps_like_qemu() {
    corpus_case("bochs");
}

#[test]
fn cloop_maps_like_qemu() {
    corpus_case("cloop");
}

#[test]
fn dmg_maps_like_qemu() {
    corpus_case("dmg");
}

#[test]
fn parallels_maps_like_qemu() {
    corpus_case("parallels");
    if !qemu_available("parallels_maps_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.hds");
    qemu_img(&["create", "-q", "-f", "parallels", s(&img), "5M"]);
    // Partly written 1 MiB clusters: the rest of each is a hole in the file.
    qemu_io(
        "parallels",
        &img,
        &["write -P 1 0 64k", "write -P 2 2M 4k", "write -P 3 4M 1M"],
    );
    assert_map_like_qemu(&[s(&img)], "qemu-img's parallels");
    assert_map_like_qemu(&["--start-offset=1M", "--max-length=2M", s(&img)], "range");
    vimg_written("parallels", dir.path());
}

#[test]
fn qed_maps_like_qemu() {
    if !qemu_available("qed_maps_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qed");
    qemu_img(&["create", "-q", "-f", "qed", s(&img), "6M"]);
    qemu_io(
        "qed",
        &img,
        &[
            "write -P 1 0 64k",
            "write -P 2 128k 4k",
            "write -z 1M 128k",
            "write -P 3 5M 1M",
        ],
    );
    assert_map_like_qemu(&[s(&img)], "qed");
    // With a backing file: depth and merging across layers.
    let top = dir.path().join("top.qed");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        s(&img),
        "-F",
        "qed",
        s(&top),
    ]);
    qemu_io("qed", &top, &["write -P 9 64k 64k", "write -z 5M 64k"]);
    assert_map_like_qemu(&[s(&top)], "qed overlay");
    vimg_written("qed", dir.path());
}

/// An image vimg writes from a raw file whose clusters are partly zero (vimg leaves the
/// zero parts of a data cluster as holes in the file): qemu-img maps the clusters as data,
/// whatever the file holds under them, and so must vimg.
fn vimg_written(format: &str, dir: &Path) {
    let raw = dir.join("holes.raw");
    write_sparse_raw(
        &raw,
        1 << 20,
        &[
            (0, &pattern(65536, 7)),
            (69632, &pattern(4096, 8)),
            (200704, &pattern(512, 9)),
        ],
    );
    let img = dir.join(format!("holes.{format}"));
    vimg(&["convert", "-f", "raw", "-O", format, s(&raw), s(&img)]);
    assert_map_like_qemu(&[s(&img)], &format!("vimg-written {format}"));
}

#[test]
fn qcow_maps_like_qemu() {
    if !qemu_available("qcow_maps_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow");
    qemu_img(&["create", "-q", "-f", "qcow", s(&img), "6M"]);
    qemu_io(
        "qcow",
        &img,
        &["write -P 1 0 64k", "write -P 2 1M 512", "write -P 3 5M 1M"],
    );
    assert_map_like_qemu(&[s(&img)], "qcow");
    // Over a backing file: depth and merging across layers.
    let top = dir.path().join("top.qcow");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "-b",
        s(&img),
        "-F",
        "qcow",
        s(&top),
    ]);
    qemu_io("qcow", &top, &["write -P 9 4k 8k", "write -P 8 5M 4k"]);
    assert_map_like_qemu(&[s(&top)], "qcow overlay");
    vimg_written("qcow", dir.path());
    // Compressed clusters as vimg writes them (`convert -c`).
    let c = dir.path().join("c.qcow");
    vimg(&["convert", "-c", "-f", "qcow", "-O", "qcow", s(&img), s(&c)]);
    assert_map_like_qemu(&[s(&c)], "vimg-written compressed qcow");
}

#[test]
fn luks_maps_like_qemu() {
    if !qemu_available("luks_maps_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.luks");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        OBJ,
        "-o",
        "key-secret=s,iter-time=10",
        s(&img),
        "4M",
    ]);
    let io = format!("driver=luks,key-secret=s,file.filename={}", s(&img));
    run_ok(
        "qemu-io",
        &[
            "--object",
            OBJ,
            "--image-opts",
            &io,
            "-c",
            "write -P 1 64k 64k",
        ],
    );
    assert_map_like_qemu(&["--object", OBJ, "--image-opts", &io], "luks");
}

//! QEMU's `quorum` driver (read-only) and raw's block status under `cache.direct=on`,
//! against qemu-img as the oracle: the same `json:` / `--image-opts` names open the same
//! way, reads vote the same way, `info` and `map` print the same, and an image over a
//! quorum node cannot resolve relative names (iotests 110, vmdk 059, raw 253).
//!
//! vimg runs under the name `qemu-img` (a symlink, its compatibility mode) in the images'
//! folder, as qemu-img does, so the outputs compare byte for byte.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// Runs `prog ARGS` in `dir`.
fn run_in(dir: &Path, prog: &Path, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog:?}: {e}"))
}

/// qemu-img's and vimg's (as `qemu-img`) runs of `args` in `dir`.
fn both(dir: &Path, args: &[&str]) -> (Output, Output) {
    let link = dir.join("qemu-img");
    if !link.exists() {
        std::os::unix::fs::symlink(vimg_bin(), &link).unwrap();
    }
    (
        run_in(dir, Path::new("qemu-img"), args),
        run_in(dir, &link, args),
    )
}

fn same(dir: &Path, args: &[&str]) -> Output {
    let (q, v) = both(dir, args);
    assert_same_output(&v, &q, &format!("{args:?}"));
    v
}

fn quorum(threshold: &str, extra: &str, files: &[&str]) -> String {
    let children: Vec<String> = files
        .iter()
        .map(|f| format!("{{\"driver\":\"file\",\"filename\":\"{f}\"}}"))
        .collect();
    format!(
        "json:{{\"driver\":\"quorum\",\"vote-threshold\":{threshold}{extra},\"children\":[{}]}}",
        children.join(",")
    )
}

/// Three 1 MiB raw copies: `r1` and `r2` alike, `r3` with one sector changed.
fn copies(dir: &Path) {
    let mut data = vec![0u8; 1 << 20];
    data[..8192].fill(7);
    data[200_000..210_000].fill(9);
    std::fs::write(dir.join("r1"), &data).unwrap();
    std::fs::write(dir.join("r2"), &data).unwrap();
    data[512..1024].fill(3);
    std::fs::write(dir.join("r3"), &data).unwrap();
}

#[test]
fn quorum_node_info_and_map_like_qemu_img() {
    if !qemu_available("quorum_node_info_and_map_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    copies(d);
    let name = quorum("2", "", &["r1", "r2", "r3"]);
    let v = same(d, &["info", &name]);
    assert!(String::from_utf8_lossy(&v.stdout).contains("file format: quorum"));
    same(d, &["info", "--output=json", &name]);
    let v = same(d, &["map", "--output=json", &name]);
    assert!(String::from_utf8_lossy(&v.stdout).contains("\"data\": true"));
    // No host offsets: the human map refuses, in qemu-img's words.
    let v = same(d, &["map", &name]);
    assert_eq!(v.status.code(), Some(1));
    // The same node as --image-opts; a string threshold is shown as given.
    let opts = "driver=quorum,vote-threshold=2,children.0.driver=file,children.0.filename=r1,\
                children.1.driver=file,children.1.filename=r3,read-pattern=quorum";
    same(d, &["info", "--image-opts", opts]);
    same(d, &["map", "--output=json", "--image-opts", opts]);
}

#[test]
fn quorum_reads_vote_like_qemu_img() {
    if !qemu_available("quorum_reads_vote_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    copies(d);
    // Two of three agree: the majority's bytes.
    let name = quorum("2", "", &["r3", "r1", "r2"]);
    same(d, &["compare", &name, "r1"]);
    let (q, v) = both(d, &["convert", "-O", "raw", &name, "q.raw"]);
    assert!(q.status.success() && v.status.success(), "{}", said(&v));
    assert_same_file(&d.join("q.raw"), &d.join("r1"));
    // Threshold 3 cannot be met where r3 differs: both fail, and what else reads agrees.
    let name = quorum("3", "", &["r1", "r2", "r3"]);
    let (q, v) = both(d, &["convert", "-O", "raw", &name, "x.raw"]);
    assert_eq!(v.status.code(), q.status.code());
    assert_eq!(v.status.code(), Some(1));
    assert!(said(&v).contains("Input/output error"), "{}", said(&v));
    // A tie at threshold 1 goes to the version seen last, as in QEMU.
    let name = quorum("1", "", &["r1", "r3"]);
    let (q, v) = both(d, &["convert", "-O", "raw", &name, "t.raw"]);
    assert!(q.status.success() && v.status.success(), "{}", said(&v));
    assert_same_file(&d.join("t.raw"), &d.join("r3"));
    // fifo: the first child answers.
    let name = quorum("1", ",\"read-pattern\":\"fifo\"", &["r3", "r1"]);
    same(d, &["compare", &name, "r3"]);
    // blkverify: a difference fails the read, at the first differing byte.
    let name = quorum("2", ",\"blkverify\":true", &["r1", "r3"]);
    let (q, v) = both(d, &["convert", "-O", "raw", &name, "b.raw"]);
    assert_eq!(q.status.code(), Some(1));
    assert_eq!(v.status.code(), Some(1));
    assert!(
        said(&v).contains("contents mismatch at offset 512"),
        "{}",
        said(&v)
    );
    assert!(
        said(&q).contains("contents mismatch at offset 512"),
        "{}",
        said(&q)
    );
}

#[test]
fn quorum_options_refused_in_qemu_img_words() {
    if !qemu_available("quorum_options_refused_in_qemu_img_words") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    copies(d);
    std::fs::write(d.join("short"), vec![0u8; 4096]).unwrap();
    for name in [
        quorum("0", "", &["r1"]),
        quorum("2", "", &["r1"]),
        quorum("1", ",\"read-pattern\":\"x\"", &["r1"]),
        quorum("1", ",\"blkverify\":true", &["r1", "r2"]),
        quorum("2", ",\"rewrite-corrupted\":true", &["r1", "r2"]),
        quorum("1", "", &["r1", "short"]),
        quorum("1", "", &["missing"]),
        "json:{\"driver\":\"quorum\",\"vote-threshold\":1,\"children\":[]}".to_string(),
        "json:{\"driver\":\"quorum\",\"vote-threshold\":1,\"children\":[\"r1\"]}".to_string(),
    ] {
        let v = same(d, &["info", &name]);
        assert_eq!(v.status.code(), Some(1), "{name}");
    }
}

#[test]
fn format_over_quorum_like_qemu_img() {
    if !qemu_available("format_over_quorum_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let over = |fmt: &str, a: &str, b: &str| {
        format!(
            "json:{{'driver':'{fmt}','file':{{'driver':'quorum','vote-threshold':1,\
             'children':[{{'driver':'file','filename':'{a}'}},{{'driver':'file','filename':'{b}'}}]}}}}"
        )
    };
    // iotest 110: a relative backing name cannot be resolved against a quorum node.
    qemu_in(d, &["create", "-f", "qcow2", "t.base", "4M"]);
    qemu_in(
        d,
        &[
            "create", "-f", "qcow2", "-b", "t.base", "-F", "qcow2", "t.qcow2",
        ],
    );
    std::fs::copy(d.join("t.qcow2"), d.join("t.copy")).unwrap();
    let name = over("qcow2", "t.qcow2", "t.copy");
    let (q, v) = both(d, &["info", &name]);
    assert_eq!(v.status.code(), Some(0), "{}", said(&v));
    // vimg adds its lines about the files an image names after qemu-img's.
    let v_out = String::from_utf8_lossy(&v.stdout).into_owned();
    let ours = v_out.split("External references:\n").next().unwrap();
    assert_eq!(ours, String::from_utf8_lossy(&q.stdout));
    assert!(ours.contains("backing file: t.base (cannot determine actual path)"));
    let v = same(d, &["map", "--output=json", &name]);
    assert!(said(&v).contains("Cannot generate a base directory for quorum nodes"));
    // Without the backing file, the image reads through the quorum.
    qemu_in(d, &["create", "-f", "qcow2", "p.qcow2", "4M"]);
    qemu_io("qcow2", &d.join("p.qcow2"), &["write -P 5 64k 128k"]);
    std::fs::copy(d.join("p.qcow2"), d.join("p.copy")).unwrap();
    let name = over("qcow2", "p.qcow2", "p.copy");
    same(d, &["map", "--output=json", &name]);
    same(d, &["compare", &name, "p.qcow2"]);
    // vmdk 059: a monolithicFlat descriptor names its extent relative to its own folder.
    qemu_in(
        d,
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "f.vmdk",
            "1M",
        ],
    );
    std::fs::copy(d.join("f.vmdk"), d.join("f.orig")).unwrap();
    let v = same(d, &["info", &over("vmdk", "f.vmdk", "f.orig")]);
    assert!(said(&v).contains("Cannot use relative paths with VMDK descriptor file"));
}

#[test]
fn raw_map_with_cache_direct_like_qemu_img() {
    if !qemu_available("raw_map_with_cache_direct_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // iotest 253: 1 MiB less a byte, its last 64 KiB written.
    let size = (1u64 << 20) - 1;
    let mut data = vec![0u8; size as usize];
    data[..4096].fill(1);
    data[983_040..].fill(2);
    write_sparse_raw(
        &d.join("u.raw"),
        size,
        &[(0, &data[..4096]), (983_040, &data[983_040..])],
    );
    assert_eq!(size_of(&d.join("u.raw")), size);
    for name in [
        "driver=raw,file.driver=file,file.filename=u.raw,cache.direct=on",
        "driver=raw,file.driver=file,file.filename=u.raw,file.cache.direct=on",
        "driver=raw,file.driver=file,file.filename=u.raw,cache.direct=off",
    ] {
        let v = same(d, &["map", "--output=json", "--image-opts", name]);
        let text = String::from_utf8_lossy(&v.stdout).into_owned();
        assert_eq!(
            text.contains("\"length\": 1, "),
            name.ends_with("off"),
            "{name}: {text}"
        );
    }
    same(
        d,
        &[
            "map",
            "--output=json",
            "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"file\",\"filename\":\"u.raw\",\"cache\":{\"direct\":true}}}",
        ],
    );
    // Without O_DIRECT (iotest 221) the byte past the end is zero.
    same(d, &["map", "--output=json", "u.raw"]);
}

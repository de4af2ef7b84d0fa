//! `convert -n` into an existing qcow2 image (issues 14 and 15): for several sources (raw
//! with holes and written zeros, qcow2 over a backing file, compressed qcow2) and several
//! existing targets (empty, with old data, over a backing file, with an internal snapshot,
//! compat=0.10, 512-byte and 2 MiB clusters), qemu-img and vimg each write into their own
//! copy of the target; then the two read the same (`qemu-img compare`), vimg's passes
//! `qemu-img check`, and both have the same allocation (`qemu-img map --output=json`'s
//! flags; the host offsets may differ). Refusals match qemu-img's and leave the target
//! untouched, and a run killed at any write leaves an image `qemu-img check` accepts.

mod common;

use std::path::{Path, PathBuf};

use common::kill::{assert_old_or_new, check_then_repair, guest, run_killed};
use common::*;

const MIB: u64 = 1 << 20;

/// The map's entries without host offsets (qemu-img and vimg place clusters differently
/// after frees; what is data, zero, or the backing file's must agree).
fn map_flags(img: &Path) -> Vec<serde_json::Value> {
    let text = qemu_img(&["map", "--output=json", "-f", "qcow2", s(img)]);
    let v = json(&text);
    let mut out: Vec<serde_json::Value> = Vec::new();
    for e in v.as_array().expect("map array") {
        let mut e = e.clone();
        if let Some(o) = e.as_object_mut() {
            o.remove("offset");
        }
        // Neighbours that differ only in host offset were separate entries: merge them.
        if let Some(last) = out.last_mut() {
            let same = ["depth", "present", "zero", "data", "compressed"]
                .iter()
                .all(|k| last[k] == e[k]);
            let end = last["start"].as_u64().unwrap_or(0) + last["length"].as_u64().unwrap_or(0);
            if same && end == e["start"].as_u64().unwrap_or(u64::MAX) {
                let len = last["length"].as_u64().unwrap_or(0) + e["length"].as_u64().unwrap_or(0);
                last["length"] = len.into();
                continue;
            }
        }
        out.push(e);
    }
    out
}

fn qemu_io_w(img: &Path, cmds: &[&str]) {
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(img));
    run_ok("qemu-io", &args);
}

fn check_clean(img: &Path, what: &str) {
    let out = run_cmd("qemu-img", &["check", "-f", "qcow2", s(img)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: qemu-img check of vimg's result:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_same_guest(a: &Path, b: &Path, what: &str) {
    let out = run_cmd(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "qcow2", s(a), s(b)],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: qemu-img's and vimg's results differ:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The sources: (name, format, path).
fn sources(dir: &Path) -> Vec<(&'static str, &'static str, PathBuf)> {
    let raw = dir.join("src.raw");
    mixed_raw(&raw, 8 * MIB);
    // A 4 KiB piece of data inside an otherwise empty cluster, and written zeros next to
    // a hole inside one cluster (the partial-cluster zero writes).
    write_sparse_raw_into(
        &raw,
        &[(3 * MIB + 8192, &pattern(4096, 3)), (5 * MIB, &[0u8; 8192])],
    );
    let base = dir.join("src-base.qcow2");
    qemu_create(&base, "qcow2", "", "8M");
    qemu_io_w(
        &base,
        &[
            "write -P 0x11 0 3M",
            "write -P 0x12 5M 1M",
            "write -z 7M 64k",
        ],
    );
    let top = dir.join("src-top.qcow2");
    qcow2_overlay(&top, "src-base.qcow2", "", None);
    qemu_io_w(
        &top,
        &[
            "write -P 0x21 1M 512k",
            "write -z 2M 256k",
            "write -P 0x22 5246976 4k",
            "write -P 0 6M 64k",
        ],
    );
    let comp = dir.join("src-comp.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&comp),
    ]);
    vec![
        ("raw", "raw", raw),
        ("backed", "qcow2", top),
        ("compressed", "qcow2", comp),
    ]
}

fn write_sparse_raw_into(path: &Path, pieces: &[(u64, &[u8])]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for (off, data) in pieces {
        f.write_all_at(data, *off).unwrap();
    }
}

/// Makes target `kind` at `p` (with its files next to it, named after `p`).
fn make_target(kind: &str, p: &Path) {
    let name = p.file_name().and_then(|n| n.to_str()).expect("name");
    let dir = p.parent().expect("dir");
    let old = [
        "write -P 0xaa 0 2M",
        "write -P 0xab 4198400 1M",
        "write -z 6M 128k",
        "write -P 0xac 8M 1M",
    ];
    match kind {
        "empty" => {
            qemu_create(p, "qcow2", "", "9M");
        }
        "old-data" => {
            qemu_create(p, "qcow2", "", "9M");
            qemu_io_w(p, &old);
        }
        "backing" => {
            let b = dir.join(format!("{name}.base"));
            qemu_create(&b, "qcow2", "", "9M");
            qemu_io_w(&b, &["write -P 0x55 0 9M"]);
            qcow2_overlay(p, &format!("{name}.base"), "", None);
            qemu_io_w(p, &["write -P 0x66 1M 64k", "write -z 3M 64k"]);
        }
        "snapshot" => {
            qemu_create(p, "qcow2", "", "9M");
            qemu_io_w(p, &old);
            qemu_img(&["snapshot", "-c", "before", s(p)]);
            qemu_io_w(p, &["write -P 0xbb 512k 1M"]);
        }
        "compat010" => {
            qemu_create(p, "qcow2", "compat=0.10", "9M");
            qemu_io_w(p, &old);
        }
        "compat010-backing" => {
            let b = dir.join(format!("{name}.base"));
            qemu_create(&b, "qcow2", "", "9M");
            qemu_io_w(&b, &["write -P 0x55 0 9M"]);
            qcow2_overlay(p, &format!("{name}.base"), "compat=0.10", None);
        }
        "c512" => {
            qemu_create(p, "qcow2", "cluster_size=512", "9M");
            qemu_io_w(p, &old);
        }
        "c2m" => {
            qemu_create(p, "qcow2", "cluster_size=2M", "9M");
            qemu_io_w(p, &old);
        }
        other => panic!("unknown target {other}"),
    }
}

const TARGETS: [&str; 8] = [
    "empty",
    "old-data",
    "backing",
    "snapshot",
    "compat010",
    "compat010-backing",
    "c512",
    "c2m",
];

/// qemu-img and vimg run `convert ARGS SRC TARGET` on two copies of target `kind`; the
/// results must agree. Returns (qemu's, vimg's) target paths.
fn both(dir: &Path, kind: &str, tag: &str, args: &[&str], src: &Path) -> (PathBuf, PathBuf) {
    let a = dir.join(format!("{tag}-q.qcow2"));
    let b = dir.join(format!("{tag}-v.qcow2"));
    make_target(kind, &a);
    make_target(kind, &b);
    let mut qa: Vec<&str> = vec!["convert"];
    qa.extend_from_slice(args);
    qa.extend_from_slice(&[s(src), s(&a)]);
    let out = run_cmd("qemu-img", &qa);
    assert!(
        out.status.success(),
        "qemu-img {qa:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut va: Vec<&str> = vec!["convert", "--allow-external"];
    va.extend_from_slice(args);
    va.extend_from_slice(&[s(src), s(&b)]);
    let out = vimg_raw(&va);
    assert!(
        out.status.success(),
        "vimg {va:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let what = format!("{tag} ({args:?})");
    assert_same_guest(&a, &b, &what);
    check_clean(&b, &what);
    assert_eq!(map_flags(&a), map_flags(&b), "{what}: allocation differs");
    (a, b)
}

#[test]
fn sources_into_existing_qcow2_targets_like_qemu_img() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (sname, sfmt, src) in sources(d) {
        for kind in TARGETS {
            let tag = format!("{sname}-{kind}");
            let (a, b) = both(d, kind, &tag, &["-n", "-f", sfmt, "-O", "qcow2"], &src);
            if kind == "snapshot" {
                // The internal snapshot still reads as before, in both.
                let ga = d.join(format!("{tag}-snap-q.raw"));
                let gb = d.join(format!("{tag}-snap-v.raw"));
                qemu_img(&["convert", "-l", "before", "-O", "raw", s(&a), s(&ga)]);
                qemu_img(&["convert", "-l", "before", "-O", "raw", s(&b), s(&gb)]);
                assert_eq!(sha256_file(&ga), sha256_file(&gb), "{tag}: snapshot");
            }
            for f in [a, b] {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

/// `-S 0`, `-S 64k`, `--target-is-zero`, `-m 1 -W`, `-p`, `-B` (the ranges the source's top
/// does not hold are left as they are) and a larger target whose tail is kept.
#[test]
fn options_with_n_like_qemu_img() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let srcs = sources(d);
    let raw = &srcs[0].2;
    let top = &srcs[1].2;
    let cases: [(&str, &str, Vec<&str>, &Path); 8] = [
        ("s0", "old-data", vec!["-S", "0"], raw),
        ("s64k", "old-data", vec!["-S", "64k"], raw),
        ("tiz", "empty", vec!["--target-is-zero"], raw),
        ("m1w", "old-data", vec!["-m", "1", "-W"], raw),
        ("m8", "c512", vec!["-m", "8"], raw),
        ("p", "old-data", vec!["-p"], raw),
        (
            "bqcow2",
            "backing",
            vec!["-B", "x.base", "-F", "qcow2"],
            top,
        ),
        ("bplain", "old-data", vec!["-B", "whatever"], top),
    ];
    for (tag, kind, extra, src) in cases {
        let fmt = if src == raw { "raw" } else { "qcow2" };
        let mut args = vec!["-n", "-f", fmt, "-O", "qcow2"];
        args.extend_from_slice(&extra);
        both(d, kind, tag, &args, src);
    }
}

/// What qemu-img refuses with -n, vimg refuses in the same words, and the target is left
/// as it was; formats whose updater writes no guest data are refused before anything is
/// written.
#[test]
fn refusals_leave_the_target_untouched() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("s.raw");
    mixed_raw(&src, 8 * MIB);
    let small = d.join("small.qcow2");
    qemu_create(&small, "qcow2", "", "4M");
    let tgt = d.join("t.qcow2");
    make_target("old-data", &tgt);
    let plain = d.join("plain.raw");
    std::fs::write(&plain, vec![7u8; 9 << 20]).unwrap();
    let vmdk = d.join("t.vmdk");
    // A stream-optimized vmdk with its directory at the end (vimg's own layout): qemu-img
    // loses writes into it, vimg refuses them.
    vimg(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&vmdk),
        "9M",
    ]);
    let cases: [(Vec<&str>, &Path, &str); 5] = [
        (
            vec!["-O", "qcow2"],
            &small,
            "output file is smaller than input file",
        ),
        (
            vec!["-O", "qcow2", "-o", "cluster_size=4k"],
            &tgt,
            "-o has no effect when skipping image creation",
        ),
        (vec!["-O", "qcow2"], &plain, "Image is not in qcow2 format"),
        (vec!["-O", "qcow2", "-c"], &tgt, "compressed"),
        (vec!["-O", "vmdk"], &vmdk, "grain directory at the end"),
    ];
    for (extra, target, words) in cases {
        let before = sha256_file(target);
        let mut args = vec!["convert", "-n", "-f", "raw"];
        args.extend_from_slice(&extra);
        args.extend_from_slice(&[s(&src), s(target)]);
        let out = vimg_raw(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(words), "{args:?}: {err}");
        assert_eq!(sha256_file(target), before, "{args:?} changed the target");
        // qemu-img refuses these too (it writes compressed clusters where it can).
        if !extra.contains(&"-c") && !extra.contains(&"vmdk") {
            let mut qa = args.clone();
            qa[0] = "convert";
            let out = run_cmd("qemu-img", &qa);
            let qerr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "qemu-img {qa:?}: {qerr}");
            assert!(qerr.contains(words), "qemu-img {qa:?}: {qerr}");
        }
    }
}

/// A `convert -n` killed (SIGKILL) before each of its writes leaves an image that
/// `qemu-img check` accepts (at worst leaked clusters, which `vimg check -r leaks`
/// repairs), every cluster holding its old or its new content.
#[test]
fn killed_convert_n_leaves_a_consistent_image() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("s.raw");
    let data = pattern(256 << 10, 5);
    write_sparse_raw(
        &src,
        2 * MIB,
        &[
            (0, &data[..]),
            (MIB + 4096, &data[..8192]),
            (1536 << 10, &[0u8; 64 << 10]),
        ],
    );
    let pristine = d.join("pristine.qcow2");
    qemu_create(&pristine, "qcow2", "", "3M");
    qemu_io_w(&pristine, &["write -P 0xaa 0 3M", "write -z 512k 128k"]);
    qemu_img(&["snapshot", "-c", "snap", s(&pristine)]);
    qemu_io_w(&pristine, &["write -P 0xbb 64k 64k"]);
    let old = guest(&pristine, "qcow2");
    let mut new = std::fs::read(&src).unwrap();
    new.extend_from_slice(&old[new.len()..]);
    let tgt = d.join("t.qcow2");
    let args = [
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&src),
        s(&tgt),
    ];
    let mut kills = 0;
    let mut n = 1;
    loop {
        std::fs::copy(&pristine, &tgt).unwrap();
        let killed = run_killed(&args, n);
        let what = format!("convert -n killed before write {n}");
        let got = guest(&tgt, "qcow2");
        assert_old_or_new(&got, &old, &new, 64 << 10, &what);
        check_then_repair(&tgt, "qcow2", &what);
        if !killed {
            assert_eq!(got, new, "{what}: finished run");
            break;
        }
        kills += 1;
        n += if n < 40 { 1 } else { 5 };
        assert!(n < 5000, "no end to the write points");
    }
    assert!(kills > 5, "only {kills} kill points");
}

//! `vimg dd` against `qemu-img dd` (issue 15): the same operands on the same input give the
//! same exit code, the same stderr (prefix aside), and an output with the same bytes (raw)
//! or the same virtual size and guest content (qcow2, which `qemu-img check` finds clean).

mod common;

use std::path::Path;

use common::*;

/// Runs `tool dd ARGS` in `dir`: (exit code, stderr with the program name as `PROG`).
fn dd(tool: &Path, dir: &Path, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(tool)
        .arg("dd")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run dd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr)
            .replace("qemu-img:", "PROG:")
            .replace("vimg:", "PROG:"),
    )
}

/// A 1 MiB raw image of distinct bytes with a hole, and a qcow2 of it with a compressed
/// cluster, a zero cluster and an unallocated tail, over a backing file that shows through.
fn inputs(dir: &Path) {
    let raw = dir.join("in.raw");
    std::fs::write(&raw, pattern(1 << 20, 7)).expect("write");
    let base = dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    qemu_io("qcow2", &base, &["write -P 0x5a 0 1M"]);
    let q = dir.join("in.qcow2");
    qcow2_overlay(&dir.join("in.qcow2"), "base.qcow2", "", None);
    qemu_io(
        "qcow2",
        &q,
        &[
            "write -P 0xab 100k 300k",
            "write -c -P 0x11 512k 64k",
            "write -z 640k 64k",
        ],
    );
    // An input whose size is not a whole number of sectors (qemu-img reads it rounded up).
    std::fs::write(dir.join("odd.raw"), pattern(1000, 3)).expect("write");
}

const CASES: &[&[&str]] = &[
    &[],
    &["bs=4k"],
    &["bs=4k", "count=100"],
    &["bs=4k", "count=100", "skip=10"],
    &["bs=1000", "count=3", "skip=1"],
    &["bs=1000", "skip=1048"],
    // Inside the compressed cluster (512k..576k): the window starts mid-unit.
    &["bs=3000", "skip=175", "count=200"],
    &["bs=513", "skip=999"],
    &["bs=64k", "skip=8"],
    &["bs=1M", "count=1"],
    &["count=0"],
    &["skip=2048"],
    // Past the end: a warning and an empty output.
    &["skip=5000"],
    &["bs=4k", "count=5", "skip=10"],
    // The last of a repeated operand wins; octal and hex as strtoll reads them.
    &["bs=512", "count=1", "count=2"],
    &["count=010", "skip=0x3"],
    &["bs=1.5k", "count=+7"],
];

#[test]
fn dd_output_matches_qemu_img() {
    if !qemu_available("dd_output_matches_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    inputs(d);
    let qemu = Path::new("qemu-img");
    for input in ["in.raw", "in.qcow2", "odd.raw"] {
        for out_fmt in ["raw", "qcow2"] {
            for case in CASES {
                let mut args = vec!["-O", out_fmt, "if=IN"];
                args.extend_from_slice(case);
                let with = |of: &str| -> Vec<String> {
                    args.iter()
                        .map(|a| match *a {
                            "if=IN" => format!("if={input}"),
                            x => x.to_string(),
                        })
                        .chain(std::iter::once(format!("of={of}")))
                        .collect()
                };
                let (qa, va) = (with("q.out"), with("v.out"));
                let qa: Vec<&str> = qa.iter().map(String::as_str).collect();
                let va: Vec<&str> = va.iter().map(String::as_str).collect();
                let rq = dd(qemu, d, &qa);
                let rv = dd(&vimg_bin(), d, &va);
                let what = format!("dd {input} -O {out_fmt} {case:?}");
                assert_eq!(rv, rq, "{what}: vimg (left) vs qemu-img (right)");
                assert_eq!(rq.0, 0, "{what}: qemu-img failed: {}", rq.1);
                let (q, v) = (d.join("q.out"), d.join("v.out"));
                if out_fmt == "raw" {
                    assert_same_file(&v, &q);
                } else {
                    let out = run_cmd("qemu-img", &["check", "-f", "qcow2", s(&v)]);
                    assert_eq!(out.status.code(), Some(0), "{what}: check: {out:?}");
                    let size = |p: &Path| {
                        json(&qemu_img(&["info", "--output=json", s(p)]))["virtual-size"].as_u64()
                    };
                    assert_eq!(size(&v), size(&q), "{what}: virtual size");
                    let out = run_cmd(
                        "qemu-img",
                        &["compare", "-f", "qcow2", "-F", "qcow2", s(&v), s(&q)],
                    );
                    assert_eq!(out.status.code(), Some(0), "{what}: compare: {out:?}");
                }
                std::fs::remove_file(&q).expect("rm");
                std::fs::remove_file(&v).expect("rm");
            }
        }
    }
}

/// Bad operands: the same message and exit code as qemu-img, and nothing written.
#[test]
fn dd_refuses_like_qemu_img() {
    if !qemu_available("dd_refuses_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    inputs(d);
    let qemu = Path::new("qemu-img");
    let cases: &[&[&str]] = &[
        &["bs=0", "if=in.raw", "of=OUT"],
        &["bs=abc", "if=in.raw", "of=OUT"],
        &["bs=3G", "if=in.raw", "of=OUT"],
        &["bs=-1", "if=in.raw", "of=OUT"],
        &["bs=", "if=in.raw", "of=OUT"],
        &["bs=1e3", "if=in.raw", "of=OUT"],
        &["count=-1", "if=in.raw", "of=OUT"],
        &["count=1k", "if=in.raw", "of=OUT"],
        &["count=", "if=in.raw", "of=OUT"],
        &["count=99999999999999999999", "if=in.raw", "of=OUT"],
        &["skip=x", "if=in.raw", "of=OUT"],
        &["skip=-1", "if=in.raw", "of=OUT"],
        &["foo=1", "if=in.raw", "of=OUT"],
        &["xyz", "if=in.raw", "of=OUT"],
        &["conv=notrunc", "if=in.raw", "of=OUT"],
        &["if=in.raw"],
        &["of=OUT"],
        &["-O", "foo", "if=in.raw", "of=OUT"],
        &["if=in.raw", "of=missing/OUT"],
        &["if=in.raw", "of=."],
    ];
    for case in cases {
        let (q, v) = (d.join("q.out"), d.join("v.out"));
        let with = |of: &str| -> Vec<String> {
            case.iter()
                .map(|a| a.replace("OUT", of))
                .collect::<Vec<_>>()
        };
        let (qa, va) = (with("q.out"), with("v.out"));
        let qa: Vec<&str> = qa.iter().map(String::as_str).collect();
        let va: Vec<&str> = va.iter().map(String::as_str).collect();
        let (cq, eq) = dd(qemu, d, &qa);
        let (cv, ev) = dd(&vimg_bin(), d, &va);
        let (rq, rv) = (
            (cq, eq.replace("q.out", "OUT")),
            (cv, ev.replace("v.out", "OUT")),
        );
        assert_eq!(rv, rq, "dd {case:?}: vimg (left) vs qemu-img (right)");
        assert_eq!(rq.0, 1, "dd {case:?}: qemu-img accepted it");
        assert!(!q.exists() && !v.exists(), "dd {case:?} wrote an output");
    }
    // A missing input: refused, nothing written (vimg words the open error its own way).
    let (code, err) = dd(&vimg_bin(), d, &["if=nope", "of=v.out"]);
    assert_eq!(code, 1);
    assert!(err.starts_with("PROG: Could not open 'nope'"), "{err}");
    assert!(!d.join("v.out").exists());
}

/// The output replaces an existing file whole (qemu-img recreates it), keeping nothing of
/// its old content past the new end.
#[test]
fn dd_replaces_an_existing_output() {
    if !qemu_available("dd_replaces_an_existing_output") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    inputs(d);
    for of in ["q.out", "v.out"] {
        std::fs::write(d.join(of), vec![0xeeu8; 8192]).expect("write");
    }
    let args = |of: &'static str| ["bs=1000", "count=3", "skip=1", "if=in.raw", of];
    assert_eq!(dd(Path::new("qemu-img"), d, &args("of=q.out")).0, 0);
    assert_eq!(dd(&vimg_bin(), d, &args("of=v.out")).0, 0);
    assert_same_file(&d.join("v.out"), &d.join("q.out"));
}

/// Real images nobody here wrote (vmdk, vhd, vhdx, vdi, qcow2 from the shared corpus): a
/// window of each, dd'd to raw by both tools, is byte-identical.
#[test]
fn dd_corpus_windows_match_qemu_img() {
    if !qemu_available("dd_corpus_windows_match_qemu_img") {
        return;
    }
    let Some(corpus) = corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let files = [
        "dfvfs/ext2.vmdk.xz",
        "dfvfs/ext2.vhd.xz",
        "dfvfs/ext2.qcow2.xz",
        "dissect-hypervisor/vhdx/dynamic.vhdx.gz",
        "dissect-hypervisor/vdi/basic.vdi.gz",
    ];
    let rows = corpus_rows(&corpus, &[".vmdk", ".vhd", ".qcow2", ".vhdx", ".vdi"]);
    let mut done = 0;
    for f in files {
        let Some(row) = rows.iter().find(|r| r.file == f) else {
            continue;
        };
        let img = corpus_file(&corpus, row, d);
        let input = format!("if={}", s(&img));
        for case in [
            &["bs=64k", "skip=3", "count=40"][..],
            &["bs=1000", "skip=1001", "count=3000"][..],
            &["bs=1M", "skip=1"][..],
        ] {
            let mut q: Vec<&str> = vec![&input, "of=q.out"];
            q.extend_from_slice(case);
            let mut v: Vec<&str> = vec![&input, "of=v.out"];
            v.extend_from_slice(case);
            let rq = dd(Path::new("qemu-img"), d, &q);
            let rv = dd(&vimg_bin(), d, &v);
            assert_eq!(rv, rq, "dd {f} {case:?}");
            assert_same_file(&d.join("v.out"), &d.join("q.out"));
            done += 1;
        }
    }
    eprintln!("{done} corpus windows compared");
    assert!(
        done >= 3 * files.len(),
        "corpus images missing: {done} windows compared"
    );
}

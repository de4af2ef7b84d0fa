//! The qemu-img command lines besides convert: compare, map, measure, check, create, and the
//! progress and help output. Each compared with qemu-img on the same images.

mod common;

use std::fs;

use common::*;

/// (exit code, stdout) of a command.
fn outcome(prog: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = run_cmd(prog, args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn both(args: &[&str]) -> ((Option<i32>, String), (Option<i32>, String)) {
    let v = outcome(vimg_bin().to_str().unwrap(), args);
    let q = outcome("qemu-img", args);
    (v, q)
}

#[test]
fn compare_matches_qemu_messages_and_codes() {
    if !qemu_available("compare_matches_qemu_messages_and_codes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x = d.join("x.raw");
    mixed_raw(&x, 16 << 20);
    let y = d.join("y.raw");
    fs::copy(&x, &y).unwrap();
    // One byte changed inside a data run and one inside a hole.
    let mut data = fs::read(&y).unwrap();
    data[5000] ^= 0xff;
    fs::write(&y, &data).unwrap();
    let z = d.join("z.raw");
    fs::copy(&x, &z).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&z).unwrap();
        f.write_all_at(b"B", 9_000_000).unwrap();
    }
    let longer = d.join("longer.raw");
    fs::copy(&x, &longer).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&longer)
        .unwrap()
        .set_len(17 << 20)
        .unwrap();
    let longer_dirty = d.join("longer-dirty.raw");
    fs::copy(&longer, &longer_dirty).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&longer_dirty)
            .unwrap();
        f.write_all_at(b"C", (16 << 20) + 777).unwrap();
    }
    let cases: Vec<Vec<&str>> = vec![
        vec!["compare", s(&x), s(&x)],
        vec!["compare", s(&x), s(&y)],
        vec!["compare", s(&x), s(&z)],
        vec!["compare", s(&x), s(&longer)],
        vec!["compare", "-s", s(&x), s(&longer)],
        vec!["compare", s(&longer_dirty), s(&x)],
        vec!["compare", "-q", s(&x), s(&y)],
        vec!["compare", "-f", "raw", "-F", "raw", s(&x), s(&z)],
    ];
    for args in &cases {
        let (v, q) = both(args);
        assert_eq!(v, q, "{args:?}");
    }
    // An image that cannot be opened: exit 2, as qemu-img.
    let missing = d.join("missing");
    let (v, q) = both(&["compare", s(&x), s(&missing)]);
    assert_eq!(v.0, Some(2));
    assert_eq!(v.0, q.0);
}

#[test]
fn map_and_measure_match_qemu_on_raw() {
    if !qemu_available("map_and_measure_match_qemu_on_raw") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.raw");
    mixed_raw(&x, 32 << 20);
    for args in [
        vec!["map", "--output=json", s(&x)],
        vec!["map", s(&x)],
        vec![
            "map",
            "--output=json",
            "--start-offset=1M",
            "--max-length=9M",
            s(&x),
        ],
        vec!["measure", "-O", "raw", s(&x)],
        vec!["measure", "--output=json", "-O", "raw", s(&x)],
        vec!["measure", "--size", "10G"],
        vec!["measure", "--output=json", "--size", "3M", "-O", "raw"],
    ] {
        let (v, q) = both(&args);
        assert_eq!(v, q, "{args:?}");
    }
}

#[test]
fn check_unsupported_exit_code() {
    if !qemu_available("check_unsupported_exit_code") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.raw");
    write_sparse_raw(&x, 1 << 20, &[]);
    let v = vimg_raw(&["check", s(&x)]);
    let q = run_cmd("qemu-img", &["check", s(&x)]);
    assert_eq!(v.status.code(), Some(63));
    assert_eq!(v.status.code(), q.status.code());
    assert_eq!(
        String::from_utf8_lossy(&v.stderr).replace("vimg:", "qemu-img:"),
        String::from_utf8_lossy(&q.stderr)
    );
}

#[test]
fn progress_forms() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.raw");
    mixed_raw(&x, 16 << 20);
    // Not a terminal: qemu-img's percentage lines on stdout, ending at 100%.
    let out = vimg_raw(&[
        "convert",
        "-p",
        "-O",
        "raw",
        s(&x),
        s(&dir.path().join("a")),
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("    (0.00/100%)\r"), "{text:?}");
    assert!(text.ends_with("    (100.00/100%)\r\n"), "{text:?}");
    // JSON lines on stderr.
    let out = vimg_raw(&[
        "convert",
        "--progress=json",
        "-O",
        "raw",
        s(&x),
        s(&dir.path().join("b")),
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let last = lines.last().expect("at least one progress line");
    assert_eq!(last["done"], last["total"]);
    assert!(last["total"].as_u64().unwrap() >= 3 << 20);
    assert!(
        last["total"].as_u64().unwrap() < 16 << 20,
        "progress counts allocated bytes"
    );
}

#[test]
fn help_completion_and_man() {
    for sub in [
        "convert", "info", "create", "check", "compare", "measure", "map",
    ] {
        let out = vimg(&[sub, "--help"]);
        assert!(out.contains("Usage: vimg"), "{sub}: {out}");
    }
    for sh in ["bash", "zsh", "fish"] {
        let out = vimg(&["completion", sh]);
        assert!(out.contains("convert"), "{sh}");
    }
    let man = vimg(&["man"]);
    assert!(man.starts_with(".ie") || man.contains(".TH"), "{man}");
}

#[test]
fn options_help_lists_every_format() {
    for fmt in ["raw", "qcow2", "vmdk", "vpc", "vhd", "vhdx", "vdi"] {
        let out = vimg(&["create", "-f", fmt, "-o", "help"]);
        assert!(out.contains("size=<size>"), "{fmt}: {out}");
    }
}

#[test]
fn backing_option_needs_a_format_that_has_backing_files() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.raw");
    write_sparse_raw(&x, 1 << 20, &[]);
    let out = vimg_raw(&[
        "convert",
        "-O",
        "raw",
        "-B",
        "base",
        s(&x),
        s(&dir.path().join("y")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "vimg: Backing file not supported for file format 'raw'"
    );
}

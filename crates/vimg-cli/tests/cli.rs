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
    if !qemu_available("options_help_lists_every_format") {
        return;
    }
    // Where vimg accepts exactly qemu-img's options, the help is qemu-img's text.
    for fmt in ["qcow2", "vmdk", "vpc", "vdi"] {
        assert_eq!(
            vimg(&["create", "-f", fmt, "-o", "help"]),
            qemu_img(&["create", "-f", fmt, "-o", "help"]),
            "{fmt}"
        );
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

/// qemu-img's JSON without vimg's own keys (which all start with `vimg-` or are
/// `image-service`).
fn qemu_keys(mut v: serde_json::Value) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.retain(|k, _| !k.starts_with("vimg-") && k != "image-service");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

/// Runs `args` with both tools in `dir` (relative names, as scripts use them).
fn both_in(dir: &std::path::Path, args: &[&str]) -> ((Option<i32>, String), (Option<i32>, String)) {
    let run = |prog: &std::path::Path| {
        let out = std::process::Command::new(prog)
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    (run(&vimg_bin()), run(std::path::Path::new("qemu-img")))
}

/// A qcow2 chain made by qemu-img: base.raw <- a.qcow2 <- b.qcow2, with data, zero clusters,
/// a partial-cluster write over the backing, a compressed image and a snapshot.
fn qcow2_scene(d: &std::path::Path) {
    qemu_img(&["create", "-q", "-f", "raw", s(&d.join("base.raw")), "8M"]);
    qemu_io(
        "raw",
        &d.join("base.raw"),
        &["write -P 5 0 64k", "write -P 6 5M 128k"],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&d.join("a.qcow2")),
        "64M",
    ]);
    qemu_io(
        "qcow2",
        &d.join("a.qcow2"),
        &["write -P 1 0 1M", "write -z 4M 1M", "write -P 2 10M 64k"],
    );
    qcow2_overlay(&d.join("b.qcow2"), "a.qcow2", "", None);
    qemu_io(
        "qcow2",
        &d.join("b.qcow2"),
        &["write -P 3 512k 1M", "write -z 10M 4k"],
    );
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        s(&d.join("b.qcow2")),
        s(&d.join("c.qcow2")),
    ]);
    qemu_create(&d.join("snap.qcow2"), "qcow2", "", "16M");
    qemu_io("qcow2", &d.join("snap.qcow2"), &["write -P 9 0 64k"]);
    run_ok(
        "qemu-img",
        &["snapshot", "-c", "first", s(&d.join("snap.qcow2"))],
    );
}

#[test]
fn map_info_compare_match_qemu_on_qcow2_chains() {
    if !qemu_available("map_info_compare_match_qemu_on_qcow2_chains") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2_scene(d);
    for img in ["a.qcow2", "b.qcow2", "c.qcow2", "snap.qcow2"] {
        for args in [
            vec!["map", "--output=json", img],
            vec!["compare", img, "b.qcow2"],
            vec!["compare", "-s", img, "a.qcow2"],
        ] {
            let (v, q) = both_in(d, &args);
            assert_eq!(v, q, "{args:?}");
        }
        if img != "c.qcow2" {
            let (v, q) = both_in(d, &["map", img]);
            assert_eq!(v, q, "map {img}");
        }
        for args in [
            vec!["info", "--output=json", img],
            vec!["info", "--output=json", "--backing-chain", img],
        ] {
            let (v, q) = both_in(d, &args);
            assert_eq!(v.0, q.0, "{args:?}");
            let vj: serde_json::Value = serde_json::from_str(&v.1).unwrap();
            let qj: serde_json::Value = serde_json::from_str(&q.1).unwrap();
            assert_eq!(qemu_keys(vj), qj, "{args:?}");
        }
        // Human info: qemu-img's text, then vimg's own lines.
        for args in [vec!["info", img], vec!["info", "--backing-chain", img]] {
            let (v, q) = both_in(d, &args);
            if args.len() == 2 {
                assert!(v.1.starts_with(&q.1), "{args:?}:\n{}\n---\n{}", v.1, q.1);
            } else {
                // Each image of the chain: qemu's block first.
                for (vb, qb) in v.1.split("\n\n").zip(q.1.split("\n\n")) {
                    assert!(vb.starts_with(qb.trim_end()), "{args:?}:\n{vb}\n---\n{qb}");
                }
            }
        }
    }
    // The human map refuses compressed images, as qemu-img does.
    let (v, q) = both_in(d, &["map", "c.qcow2"]);
    assert_eq!((v.0, q.0), (Some(1), Some(1)));
}

#[test]
fn measure_and_check_match_qemu_on_qcow2() {
    if !qemu_available("measure_and_check_match_qemu_on_qcow2") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2_scene(d);
    for args in [
        vec!["measure", "-O", "qcow2", "b.qcow2"],
        vec!["measure", "--output=json", "-O", "qcow2", "b.qcow2"],
        vec!["measure", "-O", "qcow2", "-o", "cluster_size=4k", "c.qcow2"],
        vec!["measure", "-O", "qcow2", "--size", "1T"],
        vec![
            "measure",
            "--output=json",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on",
            "--size",
            "3G",
        ],
        vec!["check", "a.qcow2"],
        vec!["check", "--output=json", "c.qcow2"],
        vec!["check", "snap.qcow2"],
    ] {
        let (v, q) = both_in(d, &args);
        assert_eq!(v, q, "{args:?}");
    }
}

#[test]
fn convert_with_backing_keeps_unallocated_areas_unallocated() {
    if !qemu_available("convert_with_backing_keeps_unallocated_areas_unallocated") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2_scene(d);
    // b.qcow2 over a copy of its backing chain: only b's own clusters are copied.
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "qcow2",
        s(&d.join("a.qcow2")),
        s(&d.join("flat-a.qcow2")),
    ]);
    let args = |out: &str| {
        vec![
            "convert".to_string(),
            "-O".into(),
            "qcow2".into(),
            "-B".into(),
            "flat-a.qcow2".into(),
            "-F".into(),
            "qcow2".into(),
            "b.qcow2".into(),
            out.to_string(),
        ]
    };
    let va = args("v-over.qcow2");
    let qa = args("q-over.qcow2");
    let vr: Vec<&str> = va.iter().map(String::as_str).collect();
    let qr: Vec<&str> = qa.iter().map(String::as_str).collect();
    let (v, _) = both_in(d, &vr);
    let (_, q) = both_in(d, &qr);
    assert_eq!(v.0, Some(0));
    assert_eq!(q.0, Some(0));
    // Same content as the source, same allocation in the top layer as qemu-img's output.
    qemu_img(&["compare", s(&d.join("v-over.qcow2")), s(&d.join("b.qcow2"))]);
    let (vm, _) = both_in(d, &["map", "--output=json", "v-over.qcow2"]);
    let (_, qm) = both_in(d, &["map", "--output=json", "q-over.qcow2"]);
    let strip_offsets = |t: &str| -> Vec<serde_json::Value> {
        serde_json::from_str::<Vec<serde_json::Value>>(t)
            .unwrap()
            .into_iter()
            .map(|mut e| {
                e.as_object_mut().unwrap().remove("offset");
                e
            })
            .collect()
    };
    assert_eq!(strip_offsets(&vm.1), strip_offsets(&qm.1));
    let out = run_cmd("qemu-img", &["check", s(&d.join("v-over.qcow2"))]);
    assert!(out.status.success());
    // create -b: the same header as qemu-img's.
    let (v, q) = both_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            "new.qcow2",
        ],
    );
    assert_eq!(v, q);
    let (v, q) = both_in(d, &["info", "--output=json", "new.qcow2"]);
    let vj: serde_json::Value = serde_json::from_str(&v.1).unwrap();
    let qj: serde_json::Value = serde_json::from_str(&q.1).unwrap();
    let vj = qemu_keys(vj);
    for key in [
        "virtual-size",
        "backing-filename",
        "backing-filename-format",
        "cluster-size",
        "format-specific",
    ] {
        assert_eq!(vj[key], qj[key], "create -b: {key}");
    }
}

#[test]
fn impossible_combinations_fail_like_qemu_before_anything_is_created() {
    if !qemu_available("impossible_combinations_fail_like_qemu_before_anything_is_created") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    mixed_raw(&src, 8 << 20);
    let cases: Vec<Vec<&str>> = vec![
        vec!["-c", "-O", "vpc"],
        vec!["-c", "-O", "vdi"],
        vec!["-c", "-O", "vhdx"],
        vec!["-c", "-O", "raw"],
        vec!["-c", "-O", "qcow2", "-o", "preallocation=full"],
        vec!["-c", "-O", "vmdk", "-o", "subformat=monolithicFlat"],
        vec!["-O", "qcow2", "-o", "cluster_size=3k"],
        vec!["-O", "qcow2", "-o", "compat=0.10,lazy_refcounts=on"],
        vec!["-O", "vpc", "-o", "subformat=sparse"],
        vec!["-O", "vmdk", "-o", "adapter_type=scsi"],
        vec!["-O", "vhdx", "-o", "block_size=3M"],
        vec!["-O", "qcow2", "-o", "nonsense=1"],
        vec!["-O", "raw", "-t", "fast"],
        vec!["-O", "raw", "-T", "fast"],
    ];
    // qemu-img leaves files behind on some of these (a -flat.vmdk); it writes elsewhere.
    let qdir = d.join("q");
    let vdir = d.join("v");
    std::fs::create_dir(&qdir).unwrap();
    std::fs::create_dir(&vdir).unwrap();
    for c in cases {
        let qout = qdir.join("out.img");
        let out = vdir.join("out.img");
        let mut qargs = vec!["convert"];
        qargs.extend(c.iter().copied());
        qargs.extend([s(&src), s(&qout)]);
        let mut args = vec!["convert"];
        args.extend(c.iter().copied());
        args.extend([s(&src), s(&out)]);
        let q = run_cmd("qemu-img", &qargs);
        let v = vimg_raw(&args);
        assert_eq!(v.status.code(), q.status.code(), "{c:?}");
        assert_eq!(
            String::from_utf8_lossy(&v.stderr)
                .replace("vimg:", "qemu-img:")
                .replace(s(&out), "OUT"),
            String::from_utf8_lossy(&q.stderr).replace(s(&qout), "OUT"),
            "{c:?}"
        );
        assert!(!out.exists(), "{c:?}: vimg left {}", out.display());
        assert_eq!(
            std::fs::read_dir(&vdir).unwrap().count(),
            0,
            "{c:?}: files left"
        );
    }
}

/// `create` prints qemu-img's "Formatting" line: its options in QEMU's order, defaults
/// included, sizes in bytes.
#[test]
fn create_formatting_line_matches_qemu() {
    if !qemu_available("create_formatting_line_matches_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(&["create", "-q", "-f", "vmdk", s(&d.join("base.vmdk")), "64M"]);
    qemu_img(&["create", "-q", "-f", "raw", s(&d.join("base.raw")), "64M"]);
    let cases: &[&[&str]] = &[
        &["-f", "qcow2", "OUT.qcow2", "1G"],
        &["-f", "qcow2", "-o", "cluster_size=4k", "OUT.qcow2", "1G"],
        &["-f", "qcow2", "-b", "base.raw", "-F", "raw", "OUT.qcow2"],
        &["-f", "qcow2", "-o", "compat=0.10", "OUT.qcow2", "1.5M"],
        &[
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=8,preallocation=metadata,extended_l2=on,cluster_size=2M",
            "OUT.qcow2",
            "1M",
        ],
        &["-f", "qcow2", "-o", "compat=v3,compression_type=zstd", "OUT.qcow2", "1M"],
        &["-f", "qcow2", "-o", "size=2G", "OUT.qcow2"],
        &["-f", "vmdk", "OUT.vmdk", "1G"],
        &[
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=on,toolsversion=1234,hwversion=6,backing_fmt=vmdk,backing_file=base.vmdk,adapter_type=ide",
            "OUT.vmdk",
            "64M",
        ],
        &["-f", "vmdk", "-o", "subformat=streamOptimized", "OUT.vmdk", "1G"],
        &["-f", "vpc", "-o", "subformat=fixed,force_size=on", "OUT.vhd", "1M"],
        &["-f", "vhdx", "OUT.vhdx", "1G"],
        &["-f", "vhdx", "-o", "block_size=1M,log_size=2M,subformat=fixed", "OUT.vhdx", "8M"],
        &["-f", "vdi", "-o", "static=on", "OUT.vdi", "1M"],
        &["-f", "raw", "-o", "preallocation=falloc", "OUT.raw", "1M"],
    ];
    for c in cases {
        let mut lines = Vec::new();
        for tool in ["qemu-img", vimg_bin().to_str().unwrap()] {
            let args: Vec<String> = std::iter::once("create".to_string())
                .chain(c.iter().map(|a| {
                    if a.starts_with("OUT") || a.starts_with("base") {
                        s(&d.join(a)).to_string()
                    } else {
                        a.to_string()
                    }
                }))
                .collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            lines.push(run_ok(tool, &args));
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.file_name().unwrap().to_string_lossy().starts_with("OUT") {
                    std::fs::remove_file(p).unwrap();
                }
            }
        }
        assert_eq!(lines[1], lines[0], "create {c:?}");
    }
}

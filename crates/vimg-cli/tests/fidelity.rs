//! qemu-img's results where vimg's differed (issue 14, "wrong results"), each checked against
//! qemu-img itself: `-o backing_file=` is `-B` (iotest 019), qcow2 zero clusters with host
//! space keep their offset in `map` (179, 154), data over host-file holes maps as zero (250).

mod common;

use std::fs;
use std::path::Path;

use common::*;

/// iotest 019: `-o backing_file=...,backing_fmt=...` gives the same minimal image as `-B`.
#[test]
fn issue14_backing_file_option_is_dash_b() {
    if !qemu_available("issue14_backing_file_option_is_dash_b") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "8M"]);
    qemu_io("qcow2", &base, &["write -P 1 0 4M"]);
    // Relative backing names (resolved next to the image), so the test does not depend on
    // how absolute names read from an image are gated.
    qcow2_overlay(&top, "base.qcow2", "", None);
    qemu_io("qcow2", &top, &["write -P 2 1M 64k", "write -z 2M 64k"]);
    let with_o = d.path().join("o.qcow2");
    let with_b = d.path().join("b.qcow2");
    let by_qemu = d.path().join("q.qcow2");
    let opt = "backing_file=base.qcow2,backing_fmt=qcow2";
    vimg(&["convert", "-O", "qcow2", "-o", opt, s(&top), s(&with_o)]);
    vimg(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
        s(&with_b),
    ]);
    qemu_img(&["convert", "-O", "qcow2", "-o", opt, s(&top), s(&by_qemu)]);
    assert_same_file(&with_o, &with_b);
    assert_same_file(&with_o, &by_qemu);
    // Only the top image's clusters: far smaller than the 4 MiB the base holds.
    assert!(fs::metadata(&with_o).unwrap().len() < 1 << 20);
}

fn assert_map_like_qemu(img: &Path) {
    for out in [&["--output=json"][..], &[]] {
        let mut args = vec!["map"];
        args.extend_from_slice(out);
        args.push(s(img));
        assert_eq!(
            vimg(&args),
            qemu_img(&args),
            "map {out:?} of {}",
            img.display()
        );
    }
}

/// iotests 179 and 154: zero clusters that keep their host cluster are reported with their
/// offset and not merged into unallocated or differently placed neighbours.
#[test]
fn issue14_map_reports_zero_clusters_with_offset() {
    if !qemu_available("issue14_map_reports_zero_clusters_with_offset") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("z.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 1 0 1M",
            "write -z 64k 192k",
            "write -z -u 512k 64k",
            "write -z 2M 128k",
            "write -P 3 3M 64k",
            "write -z 3M 64k",
        ],
    );
    let json = vimg(&["map", "--output=json", s(&img)]);
    assert!(json.contains("\"zero\": true, \"data\": false, \"compressed\": false, \"offset\""));
    assert_map_like_qemu(&img);
    // Extended L2: zero subclusters of an allocated cluster.
    let ext = d.path().join("x.qcow2");
    qemu_create(&ext, "qcow2", "extended_l2=on", "4M");
    qemu_io("qcow2", &ext, &["write -P 1 0 256k", "write -z 8k 8k"]);
    assert_map_like_qemu(&ext);
}

/// iotest 250: a `preallocation=metadata` qcow2 maps clusters over host-file holes as zero.
#[test]
fn issue14_map_data_over_host_holes_is_zero() {
    if !qemu_available("issue14_map_data_over_host_holes_is_zero") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("p.qcow2");
    qemu_create(&img, "qcow2", "preallocation=metadata", "4M");
    qemu_io("qcow2", &img, &["write -P 1 1M 64k"]);
    assert_map_like_qemu(&img);
    let v = vimg(&["map", "--output=json", s(&img)]);
    assert!(v.contains("\"zero\": true, \"data\": true"), "{v}");
}

/// iotest 086: `convert -p` prints qemu-img's percentage lines, the same ones.
#[test]
fn issue14_progress_lines_as_iotest_086() {
    if !qemu_available("issue14_progress_lines_as_iotest_086") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("t.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "128M"]);
    qemu_io(
        "qcow2",
        &img,
        &["write 0 1M", "write 2M 1M", "write 4M 1M", "write 32M 1M"],
    );
    let out = d.path().join("t.base");
    for m in ["1", "8"] {
        let v = vimg(&[
            "convert",
            "-p",
            "-m",
            m,
            "-O",
            "qcow2",
            "-f",
            "qcow2",
            s(&img),
            s(&out),
        ]);
        let q = qemu_img(&[
            "convert",
            "-p",
            "-O",
            "qcow2",
            "-f",
            "qcow2",
            s(&img),
            s(&out),
        ]);
        assert_eq!(v, q);
        assert_eq!(
            v.replace('\r', "\n"),
            "    (0.00/100%)\n    (25.00/100%)\n    (50.00/100%)\n    (75.00/100%)\n    (100.00/100%)\n    (100.00/100%)\n\n"
        );
    }
}

/// A repeated single-valued option takes the last value, as qemu-img's getopt loop does.
#[test]
fn issue14_repeated_options_take_the_last() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("s.raw");
    write_sparse_raw(&src, 1 << 20, &[(0, &pattern(4096, 3))]);
    let out = d.path().join("o.img");
    vimg(&[
        "convert",
        "-f",
        "qcow2",
        "-f",
        "raw",
        "-O",
        "vdi",
        "-O",
        "qcow2",
        "-q",
        "-q",
        s(&src),
        s(&out),
    ]);
    assert_eq!(&fs::read(&out).unwrap()[..4], b"QFI\xfb");
}

/// `convert -l` reads an internal snapshot, spelled every way qemu-img takes it.
#[test]
fn issue14_convert_from_internal_snapshot() {
    if !qemu_available("issue14_convert_from_internal_snapshot") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("sn.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    qemu_io("qcow2", &img, &["write -P 1 0 1M"]);
    qemu_img(&["snapshot", "-c", "snap1", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 2 0 512k", "write -P 3 2M 64k"]);
    qemu_img(&["snapshot", "-c", "snap2", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 4 3M 64k"]);
    let v = d.path().join("v.raw");
    let q = d.path().join("q.raw");
    for l in [
        "snap1",
        "2",
        "snapshot.name=snap2",
        "snapshot.id=1,snapshot.name=snap1",
    ] {
        vimg(&["convert", "-l", l, "-O", "raw", s(&img), s(&v)]);
        qemu_img(&["convert", "-l", l, "-O", "raw", s(&img), s(&q)]);
        assert_same_file(&v, &q);
    }
    vimg(&["convert", "-l", "snap1", "-O", "qcow2", s(&img), s(&v)]);
    qemu_img(&["convert", "-l", "snap1", "-O", "qcow2", s(&img), s(&q)]);
    assert_same_file(&v, &q);
    let out = vimg_raw(&[
        "convert",
        "-l",
        "snapshot.id=2,snapshot.name=snap1",
        "-O",
        "raw",
        s(&img),
        s(&v),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("Failed to load snapshot: Can't find snapshot"));
}

/// iotest 122: several sources are concatenated into one output, each through its own
/// backing chain, compressed and zero clusters included.
#[test]
fn issue14_convert_concatenates_sources() {
    if !qemu_available("issue14_convert_concatenates_sources") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p("b.qcow2")), "3M"]);
    qemu_io("qcow2", &p("b.qcow2"), &["write -P 7 0 3M"]);
    qcow2_overlay(&p("c1.qcow2"), "b.qcow2", "", None);
    qemu_io("qcow2", &p("c1.qcow2"), &["write -P 1 1M 64k"]);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p("c2.qcow2")), "2M"]);
    qemu_io(
        "qcow2",
        &p("c2.qcow2"),
        &["write -c -P 2 0 64k", "write -z 1M 64k"],
    );
    write_sparse_raw(&p("c3.raw"), 1 << 20, &[(4096, b"hello")]);
    let srcs = [p("c1.qcow2"), p("c2.qcow2"), p("c3.raw")];
    for fmt in ["raw", "qcow2"] {
        let (v, q) = (p("v.out"), p("q.out"));
        let mut args = vec!["convert", "-O", fmt];
        args.extend(srcs.iter().map(|x| s(x)));
        vimg(&[&args[..], &[s(&v)]].concat());
        qemu_img(&[&args[..], &[s(&q)]].concat());
        assert_same_file(&v, &q);
    }
    let out = vimg_raw(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "b.qcow2",
        "-F",
        "qcow2",
        s(&srcs[0]),
        s(&srcs[1]),
        s(&p("x")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("concatenating"));
    assert!(!p("x").exists());
}

/// `create` and `convert` fail with qemu-img's messages, and print "Formatting ..." only
/// when qemu-img does (after the arguments are known valid); `create -b` without a size
/// takes the backing image's.
#[test]
fn issue14_create_messages_and_formatting_line() {
    if !qemu_available("issue14_create_messages_and_formatting_line") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let run = |prog: &str, args: &[&str]| {
        let out = std::process::Command::new(if prog == "vimg" {
            vimg_bin()
        } else {
            "qemu-img".into()
        })
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
        let _ = fs::remove_file(dir.join("t.img"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.code(),
            text.replace("qemu-img: ", "P: ").replace("vimg: ", "P: "),
        )
    };
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.img", "5M"],
    );
    for args in [
        &["create", "-f", "qcow2", "-o", "foo=1", "t.img", "1M"][..],
        &["create", "-f", "qcow2", "-o", "size=abc", "t.img"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3",
            "t.img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=3",
            "t.img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=128",
            "t.img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=-1",
            "t.img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=0x10",
            "t.img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=42",
            "t.img",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=99999999999999999999",
            "t.img",
            "1M",
        ],
        &["create", "-f", "qcow2", "-b", "nonexistent", "t.img", "1M"],
        &["create", "-f", "qcow2", "t.img"],
        &["create", "-f", "foo", "t.img", "1M"],
        &["create", "-f", "qcow2", "-b", "base.img", "t.img"],
        &[
            "create", "-f", "qcow2", "-u", "-b", "base.img", "t.img", "5M",
        ],
        &["create", "-f", "qcow2", "-b", "t.img", "t.img", "1M"],
        &["create", "-f", "vpc", "-b", "base.img", "t.img", "1M"],
        &[
            "create", "-f", "qcow2", "-b", "base.img", "-F", "qcow2", "t.img",
        ],
        &[
            "convert", "-O", "qcow2", "-B", "base.img", "base.img", "t.img",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "backing_file=base.img",
            "base.img",
            "t.img",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=3",
            "base.img",
            "t.img",
        ],
    ] {
        assert_eq!(run("vimg", args), run("qemu-img", args), "{args:?}");
    }
}

/// `-n --target-is-zero` takes effect (zero ranges of the source are not written into the
/// existing target), as in qemu-img; without `-n` it is refused as qemu-img refuses it.
#[test]
fn issue14_target_is_zero_with_n() {
    if !qemu_available("issue14_target_is_zero_with_n") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("s.raw");
    write_sparse_raw(&src, 1 << 20, &[(70_000, b"abc")]);
    let (v, q) = (d.path().join("v.raw"), d.path().join("q.raw"));
    for extra in [&[][..], &["--target-is-zero"]] {
        fs::write(&v, vec![0xffu8; 1 << 20]).unwrap();
        fs::write(&q, vec![0xffu8; 1 << 20]).unwrap();
        let args = |out: &Path| {
            let mut a = vec!["convert", "-n"];
            a.extend_from_slice(extra);
            a.extend_from_slice(&["-f", "raw", "-O", "raw", s(&src)]);
            a.push(s(out));
            a.into_iter().map(String::from).collect::<Vec<_>>()
        };
        let va = args(&v);
        vimg(&va.iter().map(String::as_str).collect::<Vec<_>>());
        let qa = args(&q);
        qemu_img(&qa.iter().map(String::as_str).collect::<Vec<_>>());
        assert_same_file(&v, &q);
    }
    assert_eq!(fs::read(&v).unwrap()[0], 0xff);
    let out = vimg_raw(&["convert", "--target-is-zero", "-O", "raw", s(&src), s(&v)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("requires use of -n flag"));
}

/// `-o help` lists the protocol's options (`extent_size_hint`, `nocow`, `preallocation`)
/// once a target name is given, as qemu-img does; `nocow` and `extent_size_hint` are
/// accepted under every format. `-C`, `-r`, `--salvage`, `--bitmaps` are accepted or
/// refused with qemu-img's messages.
#[test]
fn issue14_protocol_options_and_convert_flags() {
    if !qemu_available("issue14_protocol_options_and_convert_flags") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t.img");
    for f in ["qcow2", "vdi", "vpc", "vmdk", "vhdx"] {
        for with_name in [false, true] {
            let mut args = vec!["create", "-f", f, "-o", "help"];
            if with_name {
                args.push(s(&t));
            }
            assert_eq!(vimg(&args), qemu_img(&args), "{args:?}");
        }
        let args = [
            "create",
            "-f",
            f,
            "-o",
            "extent_size_hint=1M,nocow=on",
            s(&t),
            "1M",
        ];
        assert_eq!(vimg(&args), qemu_img(&args), "{args:?}");
    }
    let src = d.path().join("s.raw");
    write_sparse_raw(&src, 1 << 20, &[(4096, &pattern(8192, 5))]);
    let run = |prog: &str, extra: &[&str]| {
        let mut args = vec!["convert"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[s(&src), s(&t)]);
        let out = run_cmd(
            if prog == "vimg" {
                vimg_bin()
            } else {
                "qemu-img".into()
            },
            &args,
        );
        let _ = fs::remove_file(&t);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).replace("qemu-img:", "vimg:"),
        )
    };
    for extra in [
        &["-C", "-c", "-O", "qcow2"][..],
        &["-C", "-S", "0", "-O", "qcow2"],
        &["-C", "-O", "raw"],
        &["--bitmaps", "-O", "qcow2"],
        &["--skip-broken-bitmaps", "-O", "qcow2"],
        &["-r", "1M", "-O", "raw"],
        &["-r", "abc", "-O", "raw"],
        &["--salvage", "-O", "raw"],
        &["--salvage", "-C", "-O", "raw"],
        &["-O", "qcow2", "-o", "nocow=on,extent_size_hint=0"],
    ] {
        assert_eq!(run("vimg", extra), run("qemu-img", extra), "{extra:?}");
    }
}

/// qemu-img's messages and exit codes: an unknown subcommand, a missing file (no Rust
/// "(os error N)" suffix), an invalid vmdk extent line, a format that cannot be created, a
/// backing loop.
#[test]
fn issue14_messages_as_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let out = vimg_raw(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("vimg: Command not found: frobnicate"));
    let out = vimg_raw(&[]);
    assert_eq!(out.status.code(), Some(1));
    let out = vimg_raw(&["convert", "-Z", "a", "b"]);
    assert_eq!(out.status.code(), Some(1));
    let missing = d.path().join("nonexist");
    let out = vimg_raw(&["info", s(&missing)]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.trim_end().ends_with("No such file or directory"),
        "{err}"
    );
    assert!(!err.contains("os error"), "{err}");
    let bad = d.path().join("bad.vmdk");
    fs::write(
        &bad,
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 10 FOO \"x\" 0\n",
    )
    .unwrap();
    let out = vimg_raw(&["info", s(&bad)]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(": Invalid extent line: RW 10 FOO \"x\" 0")
    );
    let out = vimg_raw(&["create", "-f", "bochs", s(&d.path().join("x")), "1M"]);
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("Format driver 'bochs' does not support image creation"));
    if qemu_available("issue14_messages_as_qemu_img") {
        let (l1, l2) = (d.path().join("l1"), d.path().join("l2"));
        qemu_img(&["create", "-q", "-f", "qcow2", s(&l1), "1M"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "l1",
            "-F",
            "qcow2",
            s(&l2),
            "1M",
        ]);
        qemu_img(&[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "l2",
            "-F",
            "qcow2",
            s(&l1),
        ]);
        let out = vimg_raw(&["info", "--backing-chain", s(&l2)]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("creates an infinite loop."));
    }
}

/// `vimg man --dir` writes the top page and one page per subcommand (the pages the top
/// page's SEE ALSO names); `vimg man convert` prints one, with every flag.
#[test]
fn issue14_man_pages_per_subcommand() {
    let d = tempfile::tempdir().unwrap();
    vimg(&["man", "--dir", s(d.path())]);
    for sub in [
        "", "-convert", "-info", "-create", "-check", "-compare", "-measure", "-map",
    ] {
        let p = d.path().join(format!("vimg{sub}.1"));
        assert!(p.is_file(), "{}", p.display());
    }
    let page = vimg(&["man", "convert"]);
    assert_eq!(
        page,
        fs::read_to_string(d.path().join("vimg-convert.1")).unwrap()
    );
    for flag in [
        "\\-\\-target\\-is\\-zero",
        "\\-\\-salvage",
        "\\-\\-bitmaps",
        "\\fB\\-l\\fR",
        "\\fB\\-n\\fR",
        "\\fB\\-B\\fR",
    ] {
        assert!(page.contains(flag), "{flag}");
    }
}

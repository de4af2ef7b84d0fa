//! qemu-img's own words where vimg runs as qemu-img (issue 14): usage errors, messages for
//! hostile headers, and command-line forms qemu-img refuses. Each case runs qemu-img and
//! vimg (through a link named `qemu-img`) on the same command line and compares the exit
//! status and what each prints.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A link named `qemu-img` to the vimg binary (its compatibility mode) in `dir`.
fn as_qemu_img(dir: &Path) -> PathBuf {
    let link = dir.join("qemu-img");
    std::os::unix::fs::symlink(vimg_bin(), &link).unwrap();
    link
}

/// Runs `args` in `dir` with qemu-img and with vimg as qemu-img; asserts the same exit
/// status, stdout and stderr.
fn assert_same_words(dir: &Path, link: &Path, args: &[&str]) {
    let q = std::process::Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let v = std::process::Command::new(link)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&v.stderr),
        String::from_utf8_lossy(&q.stderr),
        "stderr of {args:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&q.stdout),
        "stdout of {args:?}"
    );
    assert_eq!(v.status.code(), q.status.code(), "exit status of {args:?}");
}

/// Unknown options, a missing option argument, too few or too many file names, a bad
/// `--output`: getopt's and qemu-img's lines and "Try 'qemu-img SUB --help'", exit 1.
#[test]
fn usage_errors_in_qemu_img_words() {
    if !qemu_available("usage_errors_in_qemu_img_words") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let link = as_qemu_img(dir.path());
    qemu_in(dir.path(), &["create", "-f", "qcow2", "a.qcow2", "1M"]);
    let cases: &[&[&str]] = &[
        &["info", "--bogus", "a.qcow2"],
        &["check", "--bogus=1", "a.qcow2"],
        &["info", "-x", "a.qcow2"],
        &["info", "-qx", "a.qcow2"],
        &["convert", "-O", "raw", "--target-bogus", "a.qcow2", "b"],
        &["info", "-f"],
        &["convert", "-O"],
        &["info", "--output"],
        &["info", "--output=xml", "a.qcow2"],
        &["map", "a.qcow2", "b"],
        &["map"],
        &["check"],
        &["info", "a.qcow2", "b"],
        &["compare", "a.qcow2"],
        &["resize", "a.qcow2"],
        &["create", "-f", "qcow2", "x", "1M", "extra"],
        &["frob"],
        &[],
    ];
    for args in cases {
        assert_same_words(dir.path(), &link, args);
    }
    // Under its own name vimg keeps clap's fuller message, with the same exit status.
    let own = vimg_raw(&["info", "--bogus", "a.qcow2"]);
    assert_eq!(own.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&own.stderr).contains("'--bogus'"));
}

/// `rebase` without -b and without -u is a usage error in qemu-img ("Must specify backing
/// file (-b) or use unsafe mode (-u)"); vimg used to read it as "remove the backing file"
/// and did so. The image must be left as it was.
#[test]
fn rebase_without_backing_or_unsafe_is_refused() {
    if !qemu_available("rebase_without_backing_or_unsafe_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let link = as_qemu_img(dir.path());
    qemu_in(dir.path(), &["create", "-f", "qcow2", "b.qcow2", "1M"]);
    qemu_in(
        dir.path(),
        &[
            "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "c.qcow2",
        ],
    );
    let before = std::fs::read(dir.path().join("c.qcow2")).unwrap();
    assert_same_words(dir.path(), &link, &["rebase", "c.qcow2"]);
    assert_eq!(std::fs::read(dir.path().join("c.qcow2")).unwrap(), before);
    let own = vimg_raw(&["rebase", s(&dir.path().join("c.qcow2"))]);
    assert_eq!(own.status.code(), Some(1));
    assert_eq!(std::fs::read(dir.path().join("c.qcow2")).unwrap(), before);
}

/// iotest 084: VDI headers qemu-img refuses (size past the limit, too few or too many
/// blocks, a block size other than 1 MiB, unaligned offsets, a sector size other than
/// 512, a link or parent UUID) are refused in qemu-img's words and qemu-img's order; under
/// its own name vimg adds where it found the value.
#[test]
fn vdi_hostile_headers_in_qemu_img_words() {
    if !qemu_available("vdi_hostile_headers_in_qemu_img_words") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let link = as_qemu_img(dir.path());
    let img = dir.path().join("t.vdi");
    let cases: &[&[(u64, &[u8])]] = &[
        // disk size past qemu's limit
        &[(0x170, &0x1_ffff_f801_0000u64.to_le_bytes())],
        // 64 MiB but 63 blocks
        &[(0x180, &63u32.to_le_bytes())],
        // 64 MiB, blocks past qemu's limit
        &[(0x180, &0x1fff_ff81u32.to_le_bytes())],
        // block size 1 MiB - 1 and 1 MiB + 64 KiB
        &[(0x178, &0xf_ffffu32.to_le_bytes())],
        &[(0x178, &0x11_0000u32.to_le_bytes())],
        // unaligned block map and data offsets, sector size 4096
        &[(0x154, &0x201u32.to_le_bytes())],
        &[(0x158, &0x401u32.to_le_bytes())],
        &[(0x168, &4096u32.to_le_bytes())],
        // a link UUID, a parent UUID
        &[(0x1a8, &[1u8; 16])],
        &[(0x1b8, &[2u8; 16])],
        // two at once: qemu's order decides which is reported
        &[
            (0x178, &0xf_ffffu32.to_le_bytes()),
            (0x180, &63u32.to_le_bytes()),
        ],
        &[(0x180, &0x1fff_ff81u32.to_le_bytes()), (0x1a8, &[1u8; 16])],
    ];
    for (i, pokes) in cases.iter().enumerate() {
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-f", "vdi", s(&img), "64M"]);
        for (off, bytes) in pokes.iter() {
            patch(&img, *off, bytes);
        }
        let q = run_cmd("qemu-img", &["info", s(&img)]);
        assert!(!q.status.success(), "case {i}: qemu-img opened it");
        let v = run_cmd(&link, &["info", s(&img)]);
        assert_eq!(
            String::from_utf8_lossy(&v.stderr),
            String::from_utf8_lossy(&q.stderr),
            "case {i}"
        );
        assert_eq!(v.status.code(), q.status.code(), "case {i}");
        // Under its own name: the same words, then a parenthesised detail.
        let own = vimg_raw(&["info", s(&img)]);
        let own = String::from_utf8_lossy(&own.stderr).into_owned();
        let words =
            String::from_utf8_lossy(&q.stderr)
                .trim_end()
                .replacen("qemu-img: ", "vimg: ", 1);
        assert!(own.starts_with(&format!("{words} (")), "case {i}: {own}");
    }
}

/// iotest 135 (afl5.img): a VHD whose dynamic header runs past the end of the file and
/// whose max table entries is past qemu's limit. qemu reads the header zero-padded and
/// refuses "Max Table Entries too large (N)"; vimg checks the fields qemu checks first,
/// in the same order, and says the same.
#[test]
fn vpc_table_entries_too_large_in_qemu_img_words() {
    if !qemu_available("vpc_table_entries_too_large_in_qemu_img_words") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let link = as_qemu_img(dir.path());
    let img = dir.path().join("t.vpc");
    for truncate in [false, true] {
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-f", "vpc", s(&img), "1M"]);
        // The footer copy at 0 names the dynamic header at 0x200; its max table entries.
        assert_eq!(rd64be(&img, 16), 0x200);
        patch(&img, 0x200 + 0x1c, &0x4000_0001u32.to_be_bytes());
        if truncate {
            // Keep the footer copy at 0 and 0x204 bytes of the header, as afl5.img.
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            f.set_len(0x404).unwrap();
        }
        let q = run_cmd("qemu-img", &["info", s(&img)]);
        let v = run_cmd(&link, &["info", s(&img)]);
        let qerr = String::from_utf8_lossy(&q.stderr);
        assert!(
            qerr.contains("Max Table Entries too large (1073741825)"),
            "{qerr}"
        );
        assert_eq!(
            String::from_utf8_lossy(&v.stderr),
            qerr,
            "truncate={truncate}"
        );
        assert_eq!(v.status.code(), q.status.code());
    }
}

/// iotest 126: `file:image:top.qcow2` names the file `image:top.qcow2`, which without the
/// prefix would read as protocol `image`; qemu-img then calls it `./image:top.qcow2` and its
/// relative backing file `./base.qcow2` ("actual path"), and so does vimg. Without a colon
/// (`file:a.qcow2`) the name stays as given.
#[test]
fn file_prefix_names_with_a_colon_like_qemu_img() {
    if !qemu_available("file_prefix_names_with_a_colon_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let link = as_qemu_img(dir.path());
    qemu_in(dir.path(), &["create", "-f", "qcow2", "base.qcow2", "1M"]);
    qemu_in(
        dir.path(),
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "file:image:top.qcow2",
        ],
    );
    qemu_in(dir.path(), &["create", "-f", "qcow2", "a.qcow2", "1M"]);
    for args in [
        &["info", "--output=json", "file:image:top.qcow2"][..],
        &["info", "--output=json", "file:a.qcow2"],
        &[
            "info",
            "--output=json",
            "--backing-chain",
            "file:image:top.qcow2",
        ],
    ] {
        assert_same_words(dir.path(), &link, args);
    }
    // The human form: the same first lines (vimg adds its own after qemu-img's).
    let q = qemu_in(dir.path(), &["info", "file:image:top.qcow2"]);
    let v = std::process::Command::new(&link)
        .args(["info", "file:image:top.qcow2"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let v = String::from_utf8_lossy(&v.stdout);
    assert!(q.starts_with("image: ./image:top.qcow2\n"), "{q}");
    assert!(q.contains("(actual path: ./base.qcow2)"), "{q}");
    assert!(v.starts_with(&q), "qemu-img:\n{q}\nvimg:\n{v}");
}

/// `convert -n --target-image-opts SRC driver=raw,file.filename=OUT`: the target named by an
/// option string (libvirt's and Cinder's encrypted-volume flows use the form). The output
/// is qemu-img's, with or without `driver` (probed then); without -n, or with -O, refused
/// in qemu-img's words.
#[test]
fn convert_target_image_opts_like_qemu_img() {
    if !qemu_available("convert_target_image_opts_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let link = as_qemu_img(dir.path());
    qemu_in(dir.path(), &["create", "-f", "qcow2", "a.qcow2", "4M"]);
    qemu_io(
        "qcow2",
        &dir.path().join("a.qcow2"),
        &["write -P 7 0 64k", "write -P 9 3M 100k"],
    );
    for opts in ["driver=raw,file.filename=", "file.filename="] {
        for name in ["q.raw", "v.raw"] {
            let _ = std::fs::remove_file(dir.path().join(name));
            qemu_in(dir.path(), &["create", "-f", "raw", name, "4M"]);
        }
        qemu_in(
            dir.path(),
            &[
                "convert",
                "-n",
                "--target-image-opts",
                "a.qcow2",
                &format!("{opts}q.raw"),
            ],
        );
        let v = std::process::Command::new(&link)
            .args(["convert", "-n", "--target-image-opts", "a.qcow2"])
            .arg(format!("{opts}v.raw"))
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
        assert_eq!(
            std::fs::read(dir.path().join("v.raw")).unwrap(),
            std::fs::read(dir.path().join("q.raw")).unwrap(),
            "{opts}"
        );
    }
    for args in [
        &[
            "convert",
            "--target-image-opts",
            "a.qcow2",
            "driver=raw,file.filename=v.raw",
        ][..],
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "-O",
            "raw",
            "a.qcow2",
            "driver=raw,file.filename=v.raw",
        ],
    ] {
        assert_same_words(dir.path(), &link, args);
    }
}

/// iotest 059: hostile sparse VMDK headers and descriptor lines refused in qemu-img's words
/// and order ("L2 table size too big", "L1 size too big", "Invalid granularity, image may
/// be corrupt", "File truncated, expecting at least N bytes", "Invalid extent line: LINE"),
/// vimg's detail after them under its own name.
#[test]
fn vmdk_hostile_headers_in_qemu_img_words() {
    if !qemu_available("vmdk_hostile_headers_in_qemu_img_words") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let link = as_qemu_img(dir.path());
    let img = dir.path().join("t.vmdk");
    let same = |i: &str| {
        let q = run_cmd("qemu-img", &["info", s(&img)]);
        assert!(!q.status.success(), "case {i}: qemu-img opened it");
        let v = run_cmd(&link, &["info", s(&img)]);
        assert_eq!(
            String::from_utf8_lossy(&v.stderr),
            String::from_utf8_lossy(&q.stderr),
            "case {i}"
        );
        assert_eq!(v.status.code(), q.status.code(), "case {i}");
        let own = vimg_raw(&["info", s(&img)]);
        let own = String::from_utf8_lossy(&own.stderr).into_owned();
        let words =
            String::from_utf8_lossy(&q.stderr)
                .trim_end()
                .replacen("qemu-img: ", "vimg: ", 1);
        assert!(own.starts_with(&format!("{words} (")), "case {i}: {own}");
    };
    // numGTEsPerGT at 0x2c, capacity at 0x0c, grainSize at 0x14.
    let cases: &[&[(u64, &[u8])]] = &[
        &[(0x2c, &0xffff_ffffu32.to_le_bytes())],
        &[(0x2c, &513u32.to_le_bytes())],
        &[
            (0x10, &0xffff_ffffu32.to_le_bytes()),
            (0x2c, &1u32.to_le_bytes()),
        ],
        &[(0x0c, &0x1eff_fffc_1b00_0001u64.to_le_bytes())],
        &[(0x14, &0x40_0000u64.to_le_bytes())],
        &[(0x2c, &0u32.to_le_bytes())],
        // 512 entries of 2^23 sectors: 2^32, which qemu keeps in 32 bits (0).
        &[(0x14, &0x80_0000u64.to_le_bytes())],
        // two at once: qemu's order decides
        &[
            (0x2c, &0xffff_ffffu32.to_le_bytes()),
            (0x14, &0x40_0000u64.to_le_bytes()),
        ],
    ];
    for (i, pokes) in cases.iter().enumerate() {
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-q", "-f", "vmdk", s(&img), "64M"]);
        for (off, bytes) in pokes.iter() {
            patch(&img, *off, bytes);
        }
        same(&i.to_string());
    }
    // A sparse image cut short.
    let _ = std::fs::remove_file(&img);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicSparse",
        s(&img),
        "100G",
    ]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(10 << 20)
        .unwrap();
    same("truncated");
    // A VMFS extent line with an offset qemu refuses (VMware writes 0, which vimg reads).
    let flat = dir.path().join("dummy.vmdk");
    std::fs::write(&flat, vec![0u8; 1 << 20]).unwrap();
    for (offset, refused) in [(" 1", true), (" 0", false)] {
        std::fs::write(
            &img,
            format!(
                "# Disk DescriptorFile\nversion=1\nCID=58ab4847\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\nRW 2048 VMFS \"dummy.vmdk\"{offset}\n"
            ),
        )
        .unwrap();
        if refused {
            same("vmfs");
        } else {
            let v = run_cmd(&link, &["info", s(&img)]);
            assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
        }
    }
}

/// `create -o size=N FILE SIZE`: qemu-img refuses the size given twice, before it prints
/// "Formatting" or creates anything; `-o size=` alone sets it.
#[test]
fn create_size_given_twice_refused_like_qemu_img() {
    if !qemu_available("create_size_given_twice_refused_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for fmt in ["raw", "qcow2", "vmdk"] {
        let mut got = Vec::new();
        for tool in [std::path::PathBuf::from("qemu-img"), vimg_bin()] {
            let o = dir.path().join("o.img");
            let _ = std::fs::remove_file(&o);
            let twice = std::process::Command::new(&tool)
                .args(["create", "-f", fmt, "-o", "size=1M", s(&o), "8M"])
                .output()
                .expect("run");
            let exists = o.exists();
            let once = std::process::Command::new(&tool)
                .args(["create", "-q", "-f", fmt, "-o", "size=1M", s(&o)])
                .output()
                .expect("run");
            got.push((
                twice.status.code(),
                String::from_utf8_lossy(&twice.stdout).to_string(),
                String::from_utf8_lossy(&twice.stderr).replace("qemu-img:", "vimg:"),
                exists,
                once.status.code(),
                qemu_img(&["info", "--output=json", "-f", fmt, s(&o)])
                    .lines()
                    .find(|l| l.contains("\"virtual-size\""))
                    .map(str::to_string),
            ));
        }
        assert_eq!(got[1], got[0], "{fmt}: vimg (left) vs qemu-img (right)");
        assert_eq!(got[0].0, Some(1), "{fmt}");
    }
}

/// `convert -o size=N`: qemu-img accepts the option and sets the size to the source's over
/// it; vimg honoured it, cutting (or padding) the copy.
#[test]
fn convert_ignores_size_option_like_qemu_img() {
    if !qemu_available("convert_ignores_size_option_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("s.raw");
    write_sparse_raw(&src, 4 << 20, &[(3 << 20, &pattern(65536, 5)[..])]);
    for (fmt, size) in [("raw", "1M"), ("qcow2", "8M"), ("vmdk", "1M")] {
        let o = format!("size={size}");
        let (q, v) = (dir.path().join("q.img"), dir.path().join("v.img"));
        let _ = std::fs::remove_file(&q);
        let _ = std::fs::remove_file(&v);
        qemu_img(&["convert", "-f", "raw", "-O", fmt, "-o", &o, s(&src), s(&q)]);
        vimg(&["convert", "-f", "raw", "-O", fmt, "-o", &o, s(&src), s(&v)]);
        let vsize = |f: &std::path::Path| {
            qemu_img(&["info", "--output=json", "-f", fmt, s(f)])
                .lines()
                .find(|l| l.contains("\"virtual-size\""))
                .map(str::to_string)
        };
        assert_eq!(vsize(&v), vsize(&q), "{fmt} -o {o}");
        qemu_img(&["compare", "-q", "-f", "raw", "-F", fmt, s(&src), s(&v)]);
    }
}

/// `convert -m N` as qemu-img 10.0.2 reads it: a whole number (C's base 0, leading white
/// space and a sign allowed) from 1 to 16, refused otherwise in its words.
#[test]
fn convert_coroutines_read_like_qemu_img() {
    if !qemu_available("convert_coroutines_read_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("s.raw");
    write_sparse_raw(&src, 1 << 20, &[(0, &pattern(4096, 1)[..])]);
    let out = dir.path().join("o.qcow2");
    for m in [
        "0", "17", "abc", "1k", "4", "16", "-1", "1.5", "0x10", "010", "+3", " 3", "",
    ] {
        let mut got = Vec::new();
        for tool in [std::path::PathBuf::from("qemu-img"), vimg_bin()] {
            let _ = std::fs::remove_file(&out);
            let o = std::process::Command::new(&tool)
                .args(["convert", "-m", m, "-O", "qcow2", s(&src), s(&out)])
                .output()
                .expect("run");
            got.push((
                o.status.code(),
                String::from_utf8_lossy(&o.stderr).replace("qemu-img:", "vimg:"),
            ));
        }
        assert_eq!(got[1], got[0], "-m {m:?}: vimg (left) vs qemu-img (right)");
    }
}

/// `convert -l` from a format without internal snapshots: qemu-img's words.
#[test]
fn convert_snapshot_from_format_without_snapshots_like_qemu_img() {
    if !qemu_available("convert_snapshot_from_format_without_snapshots_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for fmt in ["raw", "vmdk", "qed"] {
        let img = dir.path().join(format!("x.{fmt}"));
        qemu_img(&["create", "-q", "-f", fmt, s(&img), "1M"]);
        let out = dir.path().join("o.raw");
        let q = run_cmd(
            "qemu-img",
            &["convert", "-l", "foo", "-O", "raw", s(&img), s(&out)],
        );
        let v = vimg_raw(&["convert", "-l", "foo", "-O", "raw", s(&img), s(&out)]);
        assert_eq!(v.status.code(), q.status.code(), "{fmt}");
        assert_eq!(
            String::from_utf8_lossy(&v.stderr),
            String::from_utf8_lossy(&q.stderr).replace("qemu-img:", "vimg:"),
            "{fmt}"
        );
    }
}

//! `convert -n` into existing vdi (dynamic and static), vpc (dynamic and fixed) and
//! parallels images (issue 15), through the generic `-n` path and each format's updater:
//! qemu-img and vimg each write the same source into their own copy of the same existing
//! target (old data in some blocks, others unallocated); the two read the same
//! (`qemu-img compare`) and `qemu-img check` finds vimg's clean (vpc: qemu-img has no
//! check for it, exit 63). A smaller target is refused in qemu-img's words and left
//! untouched. A run killed (SIGKILL) before any of its writes leaves every newly allocated
//! block old or new as a whole (every sector of the others) and an image `qemu-img check`
//! accepts: parallels leaks at most (exit 3, never the in-use
//! flag), vdi clean.

mod common;

use std::path::{Path, PathBuf};

use common::kill::{assert_bat_check_after_kill, assert_old_or_new, guest, run_killed};
use common::qemu_check_output as check_code;
use common::*;

const MIB: u64 = 1 << 20;

/// (format, create options, block size) of every target kind.
const TARGETS: &[(&str, &str, usize)] = &[
    ("vdi", "static=off", 1 << 20),
    ("vdi", "static=on", 1 << 20),
    ("vpc", "subformat=dynamic", 2 << 20),
    ("vpc", "subformat=fixed", 2 << 20),
    ("parallels", "cluster_size=1M", 1 << 20),
];

/// A 6 MiB raw source: data, a hole, written zeros over what the target holds, data in a
/// block the target never allocated, a partial block.
fn source(dir: &Path) -> PathBuf {
    let src = dir.join("src.raw");
    let a = pattern(MIB as usize + 4096, 3);
    let b = pattern(200 << 10, 4);
    write_sparse_raw(
        &src,
        6 * MIB,
        &[
            (0, &a[..]),
            (2 * MIB, &[0u8; 512 << 10][..]),
            (3 * MIB + 512, &b[..]),
            (5 * MIB + 4096, &a[..8192]),
        ],
    );
    src
}

/// An existing `fmt` target of `size` bytes with old data in part of it (the rest
/// unallocated where the format allows).
fn target(path: &Path, fmt: &str, opts: &str, size: &str) {
    qemu_img(&["create", "-q", "-f", fmt, "-o", opts, s(path), size]);
    let writes: &[&str] = if size == "8M" {
        &[
            "write -P 0xaa 0 3M",
            "write -P 0xbb 6M 1M",
            "write -P 0xcc 5M 64k",
        ]
    } else {
        &["write -P 0xaa 0 3M"]
    };
    qemu_io(fmt, path, writes);
}

/// `qemu-img check` of vimg's result: clean (vpc: qemu-img has no check for it).
fn assert_check_clean(img: &Path, fmt: &str, what: &str) {
    let (code, text) = check_code(img, fmt);
    let want = if fmt == "vpc" { 63 } else { 0 };
    assert_eq!(code, want, "{what}: qemu-img check:\n{text}");
}

#[test]
fn convert_n_into_vdi_vpc_parallels_like_qemu_img() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    for &(fmt, opts, _) in TARGETS {
        let what = format!("{fmt} {opts}");
        let pristine = d.join(format!("t.{fmt}"));
        target(&pristine, fmt, opts, "8M");
        let old = guest(&pristine, fmt);
        let (q, v) = (d.join(format!("q.{fmt}")), d.join(format!("v.{fmt}")));
        std::fs::copy(&pristine, &q).unwrap();
        std::fs::copy(&pristine, &v).unwrap();
        let args = ["convert", "-n", "-f", "raw", "-O", fmt, s(&src)];
        let mut qa = args.to_vec();
        qa.push(s(&q));
        run_ok("qemu-img", &qa);
        let mut va = args.to_vec();
        va.push(s(&v));
        vimg(&va);
        let out = run_cmd("qemu-img", &["compare", "-f", fmt, "-F", fmt, s(&q), s(&v)]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{what}: qemu-img's and vimg's results differ:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Not vacuous: the source is in, the old data past it kept.
        let got = guest(&v, fmt);
        let mut want = std::fs::read(&src).unwrap();
        want.extend_from_slice(&old[want.len()..]);
        assert!(got == want, "{what}: guest content");
        assert_ne!(got, old, "{what}: nothing written");
        assert_check_clean(&v, fmt, &what);
        vimg(&["info", s(&v)]);

        // A smaller target: refused in qemu-img's words, untouched.
        let small = d.join(format!("small.{fmt}"));
        target(&small, fmt, opts, "4M");
        let before = sha256_file(&small);
        let mut va = args.to_vec();
        va.push(s(&small));
        let out = vimg_raw(&va);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(
            err.contains("output file is smaller than input file"),
            "{what}: {err}"
        );
        assert_eq!(
            sha256_file(&small),
            before,
            "{what}: the small target changed"
        );
        let mut qa = args.to_vec();
        qa.push(s(&small));
        let out = run_cmd("qemu-img", &qa);
        assert_eq!(out.status.code(), Some(1), "{what}: qemu-img");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("output file is smaller than input file")
        );
    }
}

/// SIGKILL before every write, flush and truncation of `convert -n` into each format
/// (dynamic vdi, dynamic vpc, parallels): every block the target did not have old or new
/// as a whole, every sector of the others old or new, the image opens in
/// qemu-img and vimg, and `qemu-img check` finds no corruption at any point (parallels:
/// exit 0 or leaks only, exit 3; never "image was not closed correctly").
#[test]
fn killed_convert_n_into_vdi_vpc_parallels() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    for &(fmt, opts, bs) in TARGETS {
        if opts == "static=on" || opts == "subformat=fixed" {
            continue;
        }
        let pristine = d.join(format!("p.{fmt}"));
        target(&pristine, fmt, opts, "8M");
        let old = guest(&pristine, fmt);
        let mut new = std::fs::read(&src).unwrap();
        new.extend_from_slice(&old[new.len()..]);
        let tgt = d.join(format!("k.{fmt}"));
        let args = ["convert", "-n", "-f", "raw", "-O", fmt, s(&src), s(&tgt)];
        let mut kills = 0;
        for n in 1.. {
            std::fs::copy(&pristine, &tgt).unwrap();
            let killed = run_killed(&args, n);
            let what = format!("{fmt} convert -n killed before write {n}");
            let got = guest(&tgt, fmt);
            // Allocated blocks are overwritten in place, write by write (sector-aligned,
            // as qemu-img does); a block the target did not have is allocated whole, its
            // data flushed before its table entry: old (zeros) or new as one.
            assert_old_or_new(&got, &old, &new, 512, &what);
            for (i, o) in old.chunks(bs).enumerate() {
                if o.iter().all(|b| *b == 0) {
                    let r = i * bs..((i + 1) * bs).min(got.len());
                    assert_old_or_new(&got[r.clone()], o, &new[r], bs, &what);
                }
            }
            assert_bat_check_after_kill(&tgt, fmt, &got, "leaks", &what);
            if !killed {
                assert!(got == new, "{what}: finished run");
                break;
            }
            kills += 1;
            assert!(n < 2000, "{fmt}: no end to the write points");
        }
        assert!(kills > 3, "{fmt}: only {kills} kill points");
    }
}

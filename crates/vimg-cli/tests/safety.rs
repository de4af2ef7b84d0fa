//! What `convert` promises about the files around it (issue 5, docs/security.md):
//! - a destination that is one of the files the source reads (the image, a backing file, an
//!   extent, a data file, a parent; also through a symlink or a hard link) is refused
//!   before anything is written, and so is a further output file (a VMDK extent) that is;
//! - a destination that is a symlink is replaced, the file it points to is not written;
//! - `-n` is the one mode that writes into an existing file;
//! - sources are never written: every command on a read-only (and, where the filesystem
//!   allows, immutable) image of every format leaves its bytes and times unchanged.

mod common;

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `(sha256, mtime, ctime)` of a file: what "not written" means.
fn stamp(p: &Path) -> (String, (i64, i64), (i64, i64)) {
    let m = fs::metadata(p).unwrap();
    (
        sha256_file(p),
        (m.mtime(), m.mtime_nsec()),
        (m.ctime(), m.ctime_nsec()),
    )
}

/// A source image and the file it reads that the destination will try to be.
struct Scene {
    what: &'static str,
    src: PathBuf,
    read: PathBuf,
}

/// Sources that read a second file, each in its own folder of `root`.
fn scenes(root: &Path) -> Vec<Scene> {
    let mut v = Vec::new();
    let mk = |name: &str| {
        let d = root.join(name);
        fs::create_dir(&d).unwrap();
        let raw = d.join("data.raw");
        write_sparse_raw(&raw, 4 << 20, &[(0, &pattern(1 << 20, 5))]);
        d
    };
    // qcow2 over a raw backing file.
    let d = mk("qcow2-backing");
    qemu_in(
        &d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "data.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
    );
    v.push(Scene {
        what: "qcow2 backing file",
        src: d.join("top.qcow2"),
        read: d.join("data.raw"),
    });
    // qcow2 with an external data file.
    let d = mk("qcow2-data-file");
    qemu_in(
        &d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=ext.bin",
            "top.qcow2",
            "4M",
        ],
    );
    // qemu resolves the data file name against its working folder.
    let io = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 7 0 1M", "top.qcow2"])
        .current_dir(&d)
        .output()
        .unwrap();
    assert!(
        io.status.success(),
        "{}",
        String::from_utf8_lossy(&io.stderr)
    );
    v.push(Scene {
        what: "qcow2 data file",
        src: d.join("top.qcow2"),
        read: d.join("ext.bin"),
    });
    // vmdk with a flat extent, and a split sparse one.
    for (sub, ext) in [
        ("monolithicFlat", "d-flat.vmdk"),
        ("twoGbMaxExtentSparse", "d-s001.vmdk"),
    ] {
        let d = mk(sub);
        let o = format!("subformat={sub}");
        qemu_in(
            &d,
            &[
                "convert", "-q", "-O", "vmdk", "-o", &o, "data.raw", "d.vmdk",
            ],
        );
        v.push(Scene {
            what: "vmdk extent",
            src: d.join("d.vmdk"),
            read: d.join(ext),
        });
    }
    // vmdk delta link over its parent.
    let d = mk("vmdk-parent");
    qemu_in(
        &d,
        &["convert", "-q", "-O", "vmdk", "data.raw", "base.vmdk"],
    );
    qemu_in(
        &d,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            "top.vmdk",
        ],
    );
    v.push(Scene {
        what: "vmdk parent",
        src: d.join("top.vmdk"),
        read: d.join("base.vmdk"),
    });
    // Differencing VHD and VHDX over their parents: vimg's own differencing writers do not
    // exist; the hostile suite builds them by patching. Here: qcow2 over a VHD and a VHDX,
    // which exercises the same chain-wide identity list.
    for (fmt, name) in [("vpc", "base.vhd"), ("vhdx", "base.vhdx")] {
        let d = mk(&format!("qcow2-over-{fmt}"));
        qemu_in(&d, &["convert", "-q", "-O", fmt, "data.raw", name]);
        qemu_in(
            &d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                name,
                "-F",
                fmt,
                "top.qcow2",
            ],
        );
        v.push(Scene {
            what: "backing file of another format",
            src: d.join("top.qcow2"),
            read: d.join(name),
        });
    }
    v
}

/// `back` holds `src`'s bytes, then zeros (formats such as vpc round the size up).
fn assert_same_content(src: &Path, back: &Path) {
    let a = fs::read(src).unwrap();
    let b = fs::read(back).unwrap();
    assert!(b.len() >= a.len(), "{} is shorter", back.display());
    assert!(b[..a.len()] == a[..], "{} differs", back.display());
    assert!(
        b[a.len()..].iter().all(|x| *x == 0),
        "{}: tail",
        back.display()
    );
}

#[test]
fn destination_that_is_a_file_the_source_reads_is_refused() {
    if !qemu_available("destination_that_is_a_file_the_source_reads_is_refused") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    for sc in scenes(root.path()) {
        let dir = sc.read.parent().unwrap().to_path_buf();
        let link = dir.join("link.out");
        symlink(&sc.read, &link).unwrap();
        let hard = dir.join("hard.out");
        fs::hard_link(&sc.read, &hard).unwrap();
        let before = stamp(&sc.read);
        let files_before = listing(&dir);
        // The hard link makes the file the source reads one with two links, which the gate
        // refuses by default (it could be a file from outside the folder); trusting the folder
        // lets the destination check below be the one that answers.
        let trust = format!("--allow-external={}", dir.display());
        for dst in [&sc.read, &link, &hard] {
            for fmt in ["raw", "qcow2"] {
                let out = vimg_raw(&["convert", &trust, "-O", fmt, s(&sc.src), s(dst)]);
                let err = String::from_utf8_lossy(&out.stderr);
                assert_eq!(out.status.code(), Some(1), "{}: {err}", sc.what);
                assert!(err.contains("same file"), "{}: {err}", sc.what);
            }
        }
        assert_eq!(stamp(&sc.read), before, "{}: the file was written", sc.what);
        assert_eq!(listing(&dir), files_before, "{}: files left", sc.what);
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }
}

/// A multi-file output whose extent file would land on a file the source reads is refused
/// when that extent is created, before any byte reaches a final name.
#[test]
fn output_extent_that_is_a_source_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (sub, extent) in [
        ("monolithicFlat", "x-flat.vmdk"),
        ("twoGbMaxExtentSparse", "x-s001.vmdk"),
        ("twoGbMaxExtentFlat", "x-f001.vmdk"),
    ] {
        let src = d.join(extent);
        write_sparse_raw(&src, 4 << 20, &[(0, &pattern(1 << 20, 9))]);
        let before = stamp(&src);
        let o = format!("subformat={sub}");
        let dst = d.join("x.vmdk");
        let out = vimg_raw(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &o,
            s(&src),
            s(&dst),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{sub}: {err}");
        assert!(err.contains("same file"), "{sub}: {err}");
        assert_eq!(stamp(&src), before, "{sub}: the source was replaced");
        assert_eq!(listing(d), vec![extent.to_string()], "{sub}: files left");
        fs::remove_file(&src).unwrap();
    }
}

/// DST that is a symlink: the link is replaced by the new image, the file it pointed to is
/// left as it was (qemu-img would write through the link).
#[test]
fn destination_symlink_is_replaced_and_its_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    mixed_raw(&src, 8 << 20);
    let target = d.join("precious");
    fs::write(&target, b"do not overwrite me").unwrap();
    let before = stamp(&target);
    for fmt in ["raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi"] {
        let dst = d.join(format!("out.{fmt}"));
        symlink(&target, &dst).unwrap();
        vimg(&["convert", "-O", fmt, s(&src), s(&dst)]);
        assert!(
            fs::symlink_metadata(&dst).unwrap().file_type().is_file(),
            "{fmt}: DST is still a link"
        );
        assert_eq!(
            stamp(&target),
            before,
            "{fmt}: the link's target was written"
        );
        let back = d.join("back.raw");
        vimg(&["convert", "-O", "raw", s(&dst), s(&back)]);
        assert_same_content(&src, &back);
        fs::remove_file(&back).unwrap();
    }
}

/// `-n` is the in-place mode: it writes into the existing file (same inode; through a
/// symlink, like qemu-img), and refuses formats that cannot be written in place.
#[test]
fn dash_n_is_the_one_in_place_mode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    mixed_raw(&src, 8 << 20);
    let existing = d.join("existing.raw");
    write_sparse_raw(&existing, 8 << 20, &[(4 << 20, b"old bytes")]);
    let link = d.join("link.raw");
    symlink(&existing, &link).unwrap();
    let ino = fs::metadata(&existing).unwrap().ino();
    vimg(&["convert", "-n", "-O", "raw", s(&src), s(&link)]);
    assert_eq!(fs::metadata(&existing).unwrap().ino(), ino, "not in place");
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_same_file(&src, &existing);
    // Without -n the same command replaces the link instead.
    vimg(&["convert", "-O", "raw", s(&src), s(&link)]);
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_file());
    // A format that cannot be written in place says so and leaves the target alone.
    let before = stamp(&existing);
    let out = vimg_raw(&["convert", "-n", "-O", "vdi", s(&src), s(&existing)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stamp(&existing), before);
}

/// Marks a file immutable for the guard's life where the filesystem and privileges allow
/// (root ignores mode bits, not the immutable flag).
struct Immutable(PathBuf, bool);

impl Immutable {
    fn new(p: &Path) -> Immutable {
        let ok = have("chattr")
            && Command::new("chattr")
                .args(["+i", s(p)])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        Immutable(p.to_path_buf(), ok)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        if self.1 {
            let _ = Command::new("chattr").args(["-i", s(&self.0)]).status();
        }
    }
}

/// Every command vimg has, on a read-only source of every format: no byte and no time of
/// the source changes (the source is never opened for writing).
#[test]
fn sources_are_never_written() {
    if !qemu_available("sources_are_never_written") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("src.raw");
    mixed_raw(&raw, 8 << 20);
    let mut sources = vec![("raw", raw.clone())];
    for (fmt, opts) in [
        ("qcow2", ""),
        ("vmdk", "subformat=monolithicSparse"),
        ("vmdk", "subformat=monolithicFlat"),
        ("vpc", ""),
        ("vhdx", ""),
        ("vdi", ""),
    ] {
        let p = d.join(format!("src-{fmt}-{}.img", sources.len()));
        let mut a = vec!["convert", "-q", "-O", fmt];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.extend([s(&raw), s(&p)]);
        qemu_img(&a);
        sources.push((fmt, p));
    }
    // Every file of every source, read-only and (if possible) immutable.
    let mut guards = Vec::new();
    let all: Vec<PathBuf> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let before: Vec<_> = all.iter().map(|p| stamp(p)).collect();
    for p in &all {
        fs::set_permissions(p, fs::Permissions::from_mode(0o444)).unwrap();
        guards.push(Immutable::new(p));
    }
    let out = tempfile::tempdir().unwrap();
    for (fmt, p) in &sources {
        let o = |name: &str| out.path().join(name);
        let cmds: Vec<Vec<&str>> = vec![
            vec!["info", s(p)],
            vec!["info", "--output=json", s(p)],
            vec!["check", "-f", fmt, s(p)],
            vec!["map", "--output=json", s(p)],
            vec!["measure", "-O", "qcow2", s(p)],
            vec!["compare", s(p), s(&raw)],
        ];
        let converts = [o("a.raw"), o("b.qcow2")];
        for c in &cmds {
            let r = vimg_raw(c);
            assert!(
                r.status.code().is_some_and(|c| c == 0 || c == 63),
                "{c:?}: {}",
                String::from_utf8_lossy(&r.stderr)
            );
        }
        vimg(&["convert", "-O", "raw", s(p), s(&converts[0])]);
        vimg(&["convert", "-O", "qcow2", s(p), s(&converts[1])]);
        assert_same_content(&raw, &converts[0]);
        for c in &converts {
            fs::remove_file(c).unwrap();
        }
    }
    let after: Vec<_> = all.iter().map(|p| stamp(p)).collect();
    for ((p, b), a) in all.iter().zip(&before).zip(&after) {
        assert_eq!(a.0, b.0, "{}: content changed", p.display());
        assert_eq!(a.1, b.1, "{}: mtime changed", p.display());
    }
    drop(guards);
    // ctime moves with chmod/chattr; compare it from here on for a second round.
    let ctimes: Vec<_> = all.iter().map(|p| stamp(p).2).collect();
    for (_, p) in &sources {
        vimg(&["convert", "-O", "raw", s(p), s(&out.path().join("c.raw"))]);
    }
    let ctimes_after: Vec<_> = all.iter().map(|p| stamp(p).2).collect();
    assert_eq!(
        ctimes, ctimes_after,
        "a source's ctime changed: it was written"
    );
}

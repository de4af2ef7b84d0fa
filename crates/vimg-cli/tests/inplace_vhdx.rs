//! Guest writes into existing vhdx images, the log, and `check -r` for vhdx (issue 15):
//! `convert -n` into dynamic and fixed images (1 MiB and 32 MiB blocks, 512- and 4096-byte
//! logical sectors) and `commit` into a vhdx base, against qemu-img doing the same on a copy;
//! QEMU's dirty-log sample (iotest 070) replayed by `check -r all` and by a write, as
//! qemu-img does; SIGKILL at every write point, each killed image judged by `qemu-img check`
//! (and `check -r all`, which replays a log the kill left) and by its content; hostile logs
//! refused with the file untouched.

mod common;

use std::path::{Path, PathBuf};

use common::kill::*;
use common::*;
use vimg::formats::vhdx::header::{Guid, Header, HEADER1_OFFSET, HEADER2_OFFSET, HEADER_SIZE};
use vimg::formats::vhdx::log::build_entry;

/// The current header of a vhdx file.
fn current_header(img: &Path) -> Header {
    let f = std::fs::read(img).expect("read image");
    let h1 = Header::parse(&f[HEADER1_OFFSET as usize..][..HEADER_SIZE]).ok();
    let h2 = Header::parse(&f[HEADER2_OFFSET as usize..][..HEADER_SIZE]).ok();
    match (h1, h2) {
        (Some(a), Some(b)) => {
            if a.sequence_number >= b.sequence_number {
                a
            } else {
                b
            }
        }
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => panic!("{}: no valid header", img.display()),
    }
}

/// Makes `img` (as qemu-img creates it: 512-byte sectors, metadata items in creation
/// order at the metadata region's start + 64 KiB) use 4096-byte logical sectors.
fn set_logical_4096(img: &Path) {
    let f = std::fs::read(img).expect("read");
    // Region table 1 at 192 KiB: entries from +16, 32 bytes each; the metadata GUID's
    // first bytes are 06 a2 7c 8b.
    let rt = 192 << 10;
    let n = u32::from_le_bytes(f[rt + 8..rt + 12].try_into().unwrap()) as usize;
    let mut meta = None;
    for i in 0..n {
        let e = rt + 16 + i * 32;
        if f[e..e + 4] == [0x06, 0xa2, 0x7c, 0x8b] {
            meta = Some(u64::from_le_bytes(f[e + 16..e + 24].try_into().unwrap()));
        }
    }
    let meta = meta.expect("metadata region");
    // Logical sector size item: the fourth, 32 bytes into the items.
    let at = meta + (64 << 10) + 32;
    assert_eq!(
        u32::from_le_bytes(read_bytes::<4>(img, at)),
        512,
        "logical sector size item where qemu-img puts it"
    );
    patch(img, at, &4096u32.to_le_bytes());
}

fn check_out(img: &Path, args: &[&str]) -> (i32, String) {
    let mut a = vec!["check"];
    a.extend_from_slice(args);
    a.push(s(img));
    let out = run_cmd("qemu-img", &a);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn assert_clean(img: &Path, what: &str) {
    let (code, text) = check_out(img, &["-f", "vhdx"]);
    assert_eq!(code, 0, "{what}: qemu-img check {}:\n{text}", img.display());
}

fn assert_same_guest(a: &Path, b: &Path, what: &str) {
    let out = run_cmd(
        "qemu-img",
        &["compare", "-f", "vhdx", "-F", "vhdx", s(a), s(b)],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: qemu-img compare:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 40 MiB raw source: data in blocks 0-2, part of block 9, the last MiB; zeros elsewhere.
fn source(dir: &Path) -> PathBuf {
    let src = dir.join("src.raw");
    write_sparse_raw(
        &src,
        40 << 20,
        &[
            (0, &pattern(3 << 20, 1)),
            (9 << 20, &pattern(512 << 10, 2)),
            (39 << 20, &pattern(1 << 20, 3)),
            ((20 << 20) + 4096, &pattern(8192, 4)),
        ],
    );
    src
}

/// The targets: (create options, 4096-byte logical sectors).
const TARGETS: &[(&str, bool)] = &[
    ("block_size=1M", false),
    ("block_size=32M", false),
    ("subformat=fixed,block_size=1M", false),
    ("subformat=fixed,block_size=32M", false),
    ("block_size=1M,block_state_zero=off", false),
    ("block_size=1M", true),
    ("block_size=32M", true),
];

/// A target with old data (blocks 4-6 and part of block 20), written by qemu-io; with
/// 4096-byte logical sectors (which QEMU's vhdx driver does not open) by vimg.
fn target(dir: &Path, name: &str, opts: &str, l4k: bool) -> PathBuf {
    let img = dir.join(name);
    qemu_create(&img, "vhdx", opts, "40M");
    if l4k {
        set_logical_4096(&img);
        let old = dir.join(format!("{name}.old.raw"));
        write_sparse_raw(
            &old,
            40 << 20,
            &[
                (4 << 20, &vec![0x44; 3 << 20]),
                (20 << 20, &vec![0x55; 64 << 10]),
            ],
        );
        vimg(&["convert", "-n", "-f", "raw", "-O", "vhdx", s(&old), s(&img)]);
    } else {
        qemu_io(
            "vhdx",
            &img,
            &["write -P 0x44 4M 3M", "write -P 0x55 20M 64k"],
        );
    }
    img
}

/// The guest content of a 4096-byte-sector image, by vimg (QEMU does not open them).
fn vimg_guest(img: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("vimg-guest.raw");
    let _ = std::fs::remove_file(&raw);
    vimg(&["convert", "-f", "vhdx", "-O", "raw", s(img), s(&raw)]);
    std::fs::read(&raw).unwrap()
}

#[test]
fn convert_n_matches_qemu_img() {
    if !qemu_available("convert_n_matches_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    for (i, &(opts, l4k)) in TARGETS.iter().enumerate() {
        let what = format!("{opts} 4k={l4k}");
        let ours = target(dir.path(), &format!("v{i}.vhdx"), opts, l4k);
        let theirs = dir.path().join(format!("q{i}.vhdx"));
        std::fs::copy(&ours, &theirs).unwrap();
        let before = current_header(&ours);
        vimg(&[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "vhdx",
            s(&src),
            s(&ours),
        ]);
        if l4k {
            assert_eq!(vimg_guest(&ours, dir.path()), std::fs::read(&src).unwrap());
            assert!(current_header(&ours).log_guid.is_zero(), "{what}");
            continue;
        }
        qemu_img(&[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "vhdx",
            s(&src),
            s(&theirs),
        ]);
        assert_clean(&ours, &what);
        assert_same_guest(&ours, &theirs, &what);
        let out = run_cmd("qemu-img", &["compare", "-F", "raw", s(&ours), s(&src)]);
        assert_eq!(out.status.code(), Some(0), "{what}: content");
        // vimg reads it too, and the headers say what changed (§2.2.2).
        assert_eq!(vimg_raw_sha256(&ours, Some("vhdx"), dir.path()), {
            vimg_raw_sha256(&src, Some("raw"), dir.path())
        });
        let after = current_header(&ours);
        assert!(after.log_guid.is_zero(), "{what}: the log is empty after");
        assert_ne!(after.data_write_guid, before.data_write_guid, "{what}");
        assert_ne!(after.file_write_guid, before.file_write_guid, "{what}");
        assert!(after.sequence_number > before.sequence_number, "{what}");
        // Nothing beyond what qemu-img needs: vimg does not allocate blocks of zeros.
        assert!(
            size_of(&ours) <= size_of(&theirs),
            "{what}: {} > {}",
            size_of(&ours),
            size_of(&theirs)
        );
    }
}

/// base.vhdx <- top.qcow2 with data over several blocks, a zero write and the last block.
fn commit_setup(dir: &Path, opts: &str, l4k: bool) -> (PathBuf, PathBuf) {
    let base = target(dir, "base.vhdx", opts, l4k);
    let top = dir.join("top.qcow2");
    let _ = std::fs::remove_file(&top);
    qemu_in(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.vhdx",
            "-F",
            "vhdx",
            "top.qcow2",
        ],
    );
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x33 1M 64k",
            "write -P 0x66 5M 2M",
            "write -z 4M 1M",
            "write -P 0x77 12345k 3k",
            "write -P 0x88 39M 1M",
            "write -P 0x99 26M 3M",
        ],
    );
    (base, top)
}

#[test]
fn commit_matches_qemu_img() {
    if !qemu_available("commit_matches_qemu_img") {
        return;
    }
    for &(opts, l4k) in &[("block_size=1M", false), ("block_size=32M", false)] {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let (base, top) = commit_setup(d1.path(), opts, l4k);
        let (qbase, qtop) = commit_setup(d2.path(), opts, l4k);
        let want = guest(&top, "qcow2");
        vimg(&["commit", "-q", s(&top)]);
        qemu_img(&["commit", "-q", s(&qtop)]);
        assert_clean(&base, opts);
        assert_same_guest(&base, &qbase, opts);
        assert_eq!(guest(&base, "vhdx"), want, "{opts}");
    }
}

/// Every write point of `convert -n` into a dynamic image: each killed image is clean for
/// `qemu-img check`, or holds a log that qemu-img replays (`check -r all`); either way each
/// block is old or new, vimg reads what qemu-img reads after the replay, and vimg's own
/// `check -r all` gives the same image.
#[test]
fn kill_at_every_write_point() {
    if !qemu_available("kill_at_every_write_point") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let pristine = target(dir.path(), "pristine.vhdx", "block_size=1M", false);
    let old = guest(&pristine, "vhdx");
    let new = std::fs::read(&src).unwrap();
    let img = dir.path().join("img.vhdx");
    let copy = dir.path().join("copy.vhdx");
    let mut logs = 0;
    let mut n = 0;
    loop {
        std::fs::copy(&pristine, &img).unwrap();
        let killed = run_killed(
            &["convert", "-n", "-f", "raw", "-O", "vhdx", s(&src), s(&img)],
            n,
        );
        let what = format!("killed at {n}");
        let (code, text) = check_out(&img, &["-f", "vhdx"]);
        std::fs::copy(&img, &copy).unwrap();
        if code != 0 {
            assert!(
                text.contains("contains a log that needs to be replayed"),
                "{what}: qemu-img check exit {code}:\n{text}"
            );
            logs += 1;
            let (c, t) = check_out(&copy, &["-r", "all", "-f", "vhdx"]);
            assert_eq!(c, 0, "{what}: qemu-img check -r all:\n{t}");
            assert!(t.contains("1 corruptions"), "{what}:\n{t}");
        }
        assert_clean(&copy, &what);
        let got = guest(&copy, "vhdx");
        // Blocks allocated before (4-6, 20) are written in place: each write old or new.
        // The others are new blocks: each whole block old or new.
        assert_old_or_new(&got, &old, &new, 4096, &what);
        for b in (0..40usize).filter(|b| ![4, 5, 6, 20].contains(b)) {
            let r = b << 20..(b + 1) << 20;
            assert_old_or_new(&got[r.clone()], &old[r.clone()], &new[r], 1 << 20, &what);
        }
        // vimg reads the killed image (replaying any log in memory) as qemu-img does after
        // its replay, and its own replay writes the same.
        assert_eq!(
            vimg_raw_sha256(&img, Some("vhdx"), dir.path()),
            vimg_raw_sha256(&copy, Some("vhdx"), dir.path()),
            "{what}"
        );
        let out = vimg_raw(&["check", "-r", "all", "-f", "vhdx", s(&img)]);
        assert_eq!(out.status.code(), Some(0), "{what}: vimg check -r all");
        assert_clean(&img, &what);
        assert_same_guest(&img, &copy, &what);
        // The interrupted conversion, run again, completes.
        if killed {
            vimg(&["convert", "-n", "-f", "raw", "-O", "vhdx", s(&src), s(&img)]);
            assert_clean(&img, &what);
            assert_eq!(guest(&img, "vhdx"), new, "{what}: rerun");
        } else {
            assert_eq!(got, new, "completed");
            break;
        }
        n = common::kill::next_point(n);
    }
    assert!(n > 10, "only {n} write points");
    assert!(logs > 0, "no kill left a log to replay");
}

/// QEMU's iotest 070 sample: a 10 GiB image with one unapplied log entry.
fn dirty_sample(dir: &Path, name: &str) -> Option<PathBuf> {
    let corpus = corpus_dir()?;
    let src = corpus.join("qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2");
    if !src.is_file() {
        skipped_line(format_args!("SKIPPED {}: no dirty-log sample", test_name()));
        return None;
    }
    let dst = dir.join(name);
    decompress_sparse(&src, &dst);
    Some(dst)
}

#[test]
fn dirty_log_replayed_like_qemu_img() {
    if !qemu_available("dirty_log_replayed_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(ours) = dirty_sample(dir.path(), "ours.vhdx") else {
        return;
    };
    let Some(theirs) = dirty_sample(dir.path(), "theirs.vhdx") else {
        return;
    };
    // qemu-img refuses to check it read-only; vimg check -r all replays it as qemu-img does.
    let (code, text) = check_out(&ours, &["-f", "vhdx"]);
    assert_eq!(code, 1, "{text}");
    let v = vimg_raw(&["check", "-f", "vhdx", s(&ours)]);
    assert_eq!(v.status.code(), Some(1));
    let vt = String::from_utf8_lossy(&v.stderr);
    assert!(
        vt.contains("contains a log that needs to be replayed") && vt.contains("check -r all"),
        "{vt}"
    );
    let v = vimg_raw(&["check", "-r", "all", s(&ours)]);
    let (qc, qt) = check_out(&theirs, &["-r", "all"]);
    assert_eq!(v.status.code(), Some(qc), "exit codes");
    assert_eq!(String::from_utf8_lossy(&v.stdout), qt, "output");
    assert_clean(&ours, "replayed");
    assert_same_guest(&ours, &theirs, "replayed");
    qemu_io("vhdx", &ours, &["read -P 0xa5 0 18M"]);
    // A second repair finds nothing.
    let again = vimg(&["check", "-r", "all", s(&ours)]);
    assert_eq!(again, "No errors were found on the image.\n");

    // A write replays the log first (QEMU replays on every read-write open).
    let Some(ours) = dirty_sample(dir.path(), "w-ours.vhdx") else {
        return;
    };
    let Some(theirs) = dirty_sample(dir.path(), "w-theirs.vhdx") else {
        return;
    };
    for (img, q) in [(&ours, false), (&theirs, true)] {
        let top = dir.path().join(if q { "qtop.qcow2" } else { "vtop.qcow2" });
        qemu_img(&["create", "-q", "-f", "qcow2", s(&top), "10G"]);
        qemu_io(
            "qcow2",
            &top,
            &["write -P 0x5a 17M 2M", "write -P 0x3c 5G 1M"],
        );
        let name = img.file_name().unwrap().to_str().unwrap();
        qemu_in(
            dir.path(),
            &[
                "rebase",
                "-u",
                "-b",
                name,
                "-F",
                "vhdx",
                "-f",
                "qcow2",
                s(&top),
            ],
        );
        if q {
            // qemu-img cannot open the dirty base read-only to start the commit: its log is
            // replayed first, by qemu-img.
            qemu_img(&["check", "-q", "-r", "all", s(img)]);
            qemu_img(&["commit", "-q", s(&top)]);
        } else {
            vimg(&["commit", "-q", s(&top)]);
        }
    }
    assert_clean(&ours, "committed");
    assert_same_guest(&ours, &theirs, "committed");
    qemu_io(
        "vhdx",
        &ours,
        &["read -P 0xa5 0 17M", "read -P 0x5a 17M 2M"],
    );
}

/// A qemu-created dynamic image with `entry` placed in its log and both headers naming
/// `guid` as the log GUID.
fn with_log(dir: &Path, name: &str, guid: Guid, entry: &[u8]) -> PathBuf {
    let img = dir.join(name);
    qemu_create(&img, "vhdx", "block_size=1M", "8M");
    qemu_io("vhdx", &img, &["write -P 0x21 0 1M"]);
    let h = current_header(&img);
    for (i, off) in [HEADER1_OFFSET, HEADER2_OFFSET].into_iter().enumerate() {
        let mut nh = h.clone();
        nh.sequence_number += 1 + i as u64;
        nh.log_guid = guid;
        let mut buf = vec![0u8; HEADER_SIZE];
        nh.write_to(&mut buf);
        patch(&img, off, &buf);
    }
    patch(&img, h.log_offset, entry);
    img
}

/// The BAT's file offset of a qemu-created image (the first region entry).
fn bat_offset(img: &Path) -> u64 {
    u64::from_le_bytes(read_bytes::<8>(img, (192 << 10) + 16 + 16))
}

#[test]
fn hostile_logs_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    if !qemu_available("hostile_logs_refused_untouched") {
        return;
    }
    let g = Guid::random();
    let probe = dir.path().join("probe.vhdx");
    qemu_create(&probe, "vhdx", "block_size=1M", "8M");
    let bat = bat_offset(&probe);
    let len = size_of(&probe);
    let sector = vec![0x77u8; 4096];
    // A BAT sector whose first entry points past the end of the file.
    let mut bad_bat = vec![0u8; 4096];
    bad_bat[..8].copy_from_slice(&((1u64 << 40) | 6).to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "writes header 1",
            build_entry(g, 1, 0, len, &[(HEADER1_OFFSET, &sector)], &[]),
        ),
        (
            "points a block past the file",
            build_entry(g, 1, 0, len, &[(bat, &bad_bat)], &[]),
        ),
        (
            "grows the file by a terabyte",
            build_entry(g, 1, 0, len, &[], &[(1 << 40, 1 << 20)]),
        ),
    ];
    for (i, (what, entry)) in cases.iter().enumerate() {
        let img = with_log(dir.path(), &format!("h{i}.vhdx"), g, entry);
        let before = sha256_file(&img);
        let t = std::time::Instant::now();
        for args in [
            vec!["check", "-r", "all", "-f", "vhdx", s(&img)],
            vec![
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "vhdx",
                s(&probe),
                s(&img),
            ],
        ] {
            let out = vimg_raw(&args);
            assert_ne!(out.status.code(), Some(0), "{what}: {args:?} accepted it");
            assert_eq!(sha256_file(&img), before, "{what}: {args:?} wrote to it");
        }
        assert!(t.elapsed().as_secs() < 20, "{what}: bounded work");
    }
    // A sound entry vimg builds is replayed by vimg as by qemu-img.
    let data = vec![0x5au8; 4096];
    let bat_sector = {
        let b = std::fs::read(dir.path().join("h0.vhdx")).unwrap();
        let mut s = b[bat as usize..bat as usize + 4096].to_vec();
        // Block 0 stays where it is; write a data sector into it at +8 KiB.
        s.truncate(4096);
        s
    };
    let first = u64::from_le_bytes(bat_sector[..8].try_into().unwrap()) & !((1 << 20) - 1);
    let entry = build_entry(
        g,
        3,
        0,
        len.max(first + (1 << 20)),
        &[(first + 8192, &data), (bat, &bat_sector)],
        &[],
    );
    let ours = with_log(dir.path(), "ok.vhdx", g, &entry);
    let theirs = dir.path().join("ok-q.vhdx");
    std::fs::copy(&ours, &theirs).unwrap();
    let v = vimg_raw(&["check", "-r", "all", s(&ours)]);
    let (qc, qt) = check_out(&theirs, &["-r", "all"]);
    assert_eq!(v.status.code(), Some(qc), "{qt}");
    assert_eq!(String::from_utf8_lossy(&v.stdout), qt);
    assert_clean(&ours, "sound log");
    assert_same_guest(&ours, &theirs, "sound log");
    qemu_io(
        "vhdx",
        &ours,
        &["read -P 0x5a 8k 4k", "read -P 0x21 12k 1012k"],
    );
}

#[test]
fn refusals_are_qemu_img_s() {
    if !qemu_available("refusals_are_qemu_img_s") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.vhdx");
    qemu_create(&img, "vhdx", "", "8M");
    let v = vimg_raw(&["resize", s(&img), "16M"]);
    let q = run_cmd("qemu-img", &["resize", s(&img), "16M"]);
    assert_eq!(v.status.code(), q.status.code());
    let vt = String::from_utf8_lossy(&v.stderr);
    assert!(
        vt.contains("Image format driver does not support resize"),
        "{vt}"
    );
    // Guest writes into a differencing image are refused before anything is written.
    assert!(q.status.code() != Some(0));
}

/// Every write point of the replay (`check -r all` of QEMU's dirty sample): a killed replay
/// leaves the log in place, so qemu-img and vimg replay it again to the same image.
#[test]
fn killed_replay_is_replayed_again() {
    if !qemu_available("killed_replay_is_replayed_again") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(pristine) = dirty_sample(dir.path(), "pristine.vhdx") else {
        return;
    };
    let Some(want) = dirty_sample(dir.path(), "want.vhdx") else {
        return;
    };
    qemu_img(&["check", "-q", "-r", "all", s(&want)]);
    let img = dir.path().join("img.vhdx");
    let copy = dir.path().join("copy.vhdx");
    let mut n = 0;
    loop {
        std::fs::copy(&pristine, &img).unwrap();
        let killed = run_killed(&["check", "-q", "-r", "all", s(&img)], n);
        let what = format!("killed at {n}");
        std::fs::copy(&img, &copy).unwrap();
        let (code, text) = check_out(&copy, &["-r", "all", "-f", "vhdx"]);
        assert_eq!(code, 0, "{what}: qemu-img check -r all:\n{text}");
        assert_clean(&copy, &what);
        assert_same_guest(&copy, &want, &what);
        let out = vimg_raw(&["check", "-q", "-r", "all", s(&img)]);
        assert_eq!(out.status.code(), Some(0), "{what}: vimg check -r all");
        assert_clean(&img, &what);
        assert_same_guest(&img, &want, &what);
        if !killed {
            break;
        }
        n = common::kill::next_point(n);
    }
    assert!(n > 5, "only {n} write points");
}

/// More changed BAT sectors than one log entry holds (a 1 MiB log holds 253): the BAT goes
/// through the log in several entries, and qemu-io reads every piece back.
#[test]
fn bat_changes_span_several_log_entries() {
    if !qemu_available("bat_changes_span_several_log_entries") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB blocks: one BAT sector per 512 blocks; 300 pieces, each in its own BAT sector.
    let size: u64 = (300 * 512) << 20;
    let src = dir.path().join("src.raw");
    let data = vec![0x5au8; 4096];
    let offs: Vec<u64> = (0..300u64).map(|i| (i * 512 + i % 7) << 20).collect();
    let refs: Vec<(u64, &[u8])> = offs.iter().map(|o| (*o, &data[..])).collect();
    write_sparse_raw(&src, size, &refs);
    let img = dir.path().join("img.vhdx");
    qemu_create(&img, "vhdx", "block_size=1M", &size.to_string());
    vimg(&["convert", "-n", "-f", "raw", "-O", "vhdx", s(&src), s(&img)]);
    assert_clean(&img, "several entries");
    assert!(current_header(&img).log_guid.is_zero());
    let mut args: Vec<String> = vec!["-r".into(), "-f".into(), "vhdx".into()];
    for o in &offs {
        args.push("-c".into());
        args.push(format!("read -P 0x5a {o} 4k"));
        args.push("-c".into());
        args.push(format!("read -P 0 {} 4k", o + 4096));
    }
    args.push(s(&img).to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ok("qemu-io", &a);
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(out.matches("read 4096/4096").count(), 600, "{out}");
    // 300 new 1 MiB blocks, nothing more.
    assert!(size_of(&img) < (400 << 20), "{}", size_of(&img));
}

/// A log GUID set in the headers with no valid entry in the log (issue 15). QEMU 10.0.2
/// opens such an image read-write and reads it without replay, but refuses every write
/// that needs a BAT change through the log ("Operation not supported": its log writer
/// requires a flushed log, a zero log GUID); qemu-img's `convert -n` of data into a new
/// block exits 1 so. vimg refuses the same with the same words, before writing anything
/// (QEMU has then already bumped both headers); the image still checks clean and reads
/// as before. QEMU's own convert -n has written into allocated blocks by the time it
/// fails; vimg's refusal comes first.
#[test]
fn log_guid_without_entries_refuses_writes_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let v = with_log(d, "v.vhdx", Guid::random(), &[]);
    let q = d.join("q.vhdx");
    std::fs::copy(&v, &q).unwrap();
    let src = d.join("s.raw");
    qemu_create(&src, "raw", "", "8M");
    qemu_io("raw", &src, &["write -P 0x5a 3M 64k"]);
    let before = sha256_file(&v);
    let old = vimg_guest(&v, d);
    let args = |img: &Path| {
        ["convert", "-n", "-f", "raw", "-O", "vhdx", s(&src), s(img)].map(String::from)
    };
    let vo = vimg_raw(&args(&v).each_ref().map(String::as_str));
    let qo = run_cmd("qemu-img", &args(&q).each_ref().map(String::as_str));
    assert_eq!(qo.status.code(), Some(1), "qemu-img: {}", said(&qo));
    assert_eq!(vo.status.code(), qo.status.code(), "vimg: {}", said(&vo));
    assert!(
        said(&qo).contains("Operation not supported"),
        "{}",
        said(&qo)
    );
    assert!(
        said(&vo).contains("Operation not supported"),
        "{}",
        said(&vo)
    );
    assert_eq!(sha256_file(&v), before, "vimg wrote into the image");
    assert_eq!(vimg_guest(&v, d), old);
    // It checks clean, and QEMU reads it as vimg does. (qemu-img's failed convert -n has
    // already changed its copy: zeros written into the allocated first block.)
    assert_eq!(check_out(&v, &[]).0, 0);
    assert!(guest(&v, "vhdx") == old, "qemu-img reads otherwise");
}

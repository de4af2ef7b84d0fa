//! Hostile images, second round (issue 18): crafted images that made vimg abort, run for
//! hours or paint on the terminal. Each is built at test time (qemu-img makes a valid
//! image, the test patches it) and every command that could be pointed at it runs under
//! an address-space limit with its time and peak RSS measured: no abort or signal, under
//! [`MAX_SECONDS`], under [`MAX_RSS`], and nothing left in the output folder on failure.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use vimg::formats::qcow2::header::{Header as QHeader, L1E_OFFSET_MASK};

const MIB: u64 = 1 << 20;
/// Time one run may take (a debug build on a shared machine).
const MAX_SECONDS: u64 = 10;
/// Peak RSS one run may reach.
const MAX_RSS: u64 = 256 * MIB;
/// RLIMIT_AS of the runs: an allocation sized by how often a corruption repeats fails the
/// run instead of succeeding quietly.
const ADDRESS_SPACE: u64 = 2 * vimg::limits::MAX_METADATA_BYTES + 256 * MIB;

/// Runs `args`, checks the bounds, prints the measurement; returns the run.
fn bounded(what: &str, args: &[&str]) -> LimitedRun {
    let r = run_limited(args, ADDRESS_SPACE);
    eprintln!(
        "{what}: exit {:?}, {:.2} s, {} KiB peak RSS",
        r.code,
        r.elapsed.as_secs_f64(),
        r.max_rss / 1024
    );
    assert!(
        r.code.is_some(),
        "{what}: killed by a signal (abort?)\nstderr: {}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("panicked") && !r.stderr.contains("memory allocation"),
        "{what}: {}",
        r.stderr
    );
    assert!(
        r.elapsed < Duration::from_secs(MAX_SECONDS),
        "{what}: took {:?}",
        r.elapsed
    );
    assert!(
        r.max_rss < MAX_RSS,
        "{what}: peak RSS {} MiB",
        r.max_rss / MIB
    );
    r
}

fn header(p: &Path) -> QHeader {
    let head = fs::read(p).unwrap();
    QHeader::parse(&head[..head.len().min(4096)]).unwrap()
}

fn entries(p: &Path) -> Vec<String> {
    fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// A 4 TiB qcow2 (8192 L1 entries) with one data cluster and one internal snapshot, whose
/// snapshot L1 entries all name one extra L2 table (appended to the file) whose entries
/// all name the data cluster: 67 million references to one cluster.
fn amplified_snapshot(dir: &Path, refcount_bits: u32) -> PathBuf {
    let p = dir.join(format!("amp{refcount_bits}.qcow2"));
    qemu_create(&p, "qcow2", &format!("refcount_bits={refcount_bits}"), "4T");
    qemu_io("qcow2", &p, &["write -P 0x5a 0 64k"]);
    qemu_img(&["snapshot", "-c", "s1", s(&p)]);
    let h = header(&p);
    let cs = h.cluster_size();
    let l2 = rd64be(&p, h.l1_table_offset) & L1E_OFFSET_MASK;
    let data = rd64be(&p, l2);
    // The extra L2 table, at the end of the file.
    let len = fs::metadata(&p).unwrap().len();
    let extra = len.div_ceil(cs) * cs;
    patch(&p, extra, &data.to_be_bytes().repeat((cs / 8) as usize));
    // The snapshot's L1 table: every entry names the extra table.
    let snap = h.snapshots_offset;
    let l1 = rd64be(&p, snap);
    let l1_size = u32::from_be_bytes(
        fs::read(&p).unwrap()[snap as usize + 8..][..4]
            .try_into()
            .unwrap(),
    );
    assert_eq!(l1_size, 8192);
    patch(&p, l1, &extra.to_be_bytes().repeat(l1_size as usize));
    p
}

#[test]
fn check_counts_repeated_corruptions_without_storing_them() {
    if !qemu_available("check_counts_repeated_corruptions_without_storing_them") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = amplified_snapshot(dir.path(), 16);
    let r = bounded("check, 67M overflows", &["check", s(&p)]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("ERROR: overflow cluster offset="));
    assert!(r.stderr.contains("more messages not shown"), "{}", r.stderr);
    // Every overflow is counted: 8192 * 8192 references, 65535 of them fit.
    let n: u64 = r
        .stdout
        .lines()
        .find_map(|l| l.strip_suffix(" errors were found on the image."))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}", r.stdout));
    assert!(n >= 8192 * 8192 - 65535, "{n}");
    let j = bounded("check --output=json", &["check", "--output=json", s(&p)]);
    assert!(j.stdout.contains("\"corruptions\""), "{}", j.stdout);
    // The active image is intact: info, map and convert work.
    bounded("info", &["info", s(&p)]);
    bounded("map", &["map", "--output=json", s(&p)]);
    let out = dir.path().join("out.raw");
    let c = bounded("convert", &["convert", "-O", "raw", s(&p), s(&out)]);
    assert_eq!(c.code, Some(0), "{}", c.stderr);
}

/// 65,536 snapshots sharing one L1 table (itself amplified as above), 64-bit refcounts.
#[test]
fn shared_snapshot_tables_are_walked_once() {
    if !qemu_available("shared_snapshot_tables_are_walked_once") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = amplified_snapshot(dir.path(), 64);
    let h = header(&p);
    let cs = h.cluster_size();
    let img = fs::read(&p).unwrap();
    let at = h.snapshots_offset as usize;
    let be16 = |o: usize| u16::from_be_bytes([img[o], img[o + 1]]) as usize;
    let be32 = |o: usize| u32::from_be_bytes(img[o..o + 4].try_into().unwrap()) as usize;
    let entry_len = (40 + be32(at + 36) + be16(at + 12) + be16(at + 14)).next_multiple_of(8);
    let entry = img[at..at + entry_len].to_vec();
    let table = entry.repeat(65536);
    let off = (img.len() as u64).div_ceil(cs) * cs;
    patch(&p, off, &table);
    patch(&p, 60, &65536u32.to_be_bytes());
    patch(&p, 64, &off.to_be_bytes());
    eprintln!(
        "image: {} bytes, {} snapshots",
        fs::metadata(&p).unwrap().len(),
        65536
    );
    let r = bounded("check, 65536 snapshots", &["check", s(&p)]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    bounded("info", &["info", s(&p)]);
    bounded("map", &["map", s(&p)]);
    let out = dir.path().join("out.raw");
    let c = bounded("convert", &["convert", "-O", "raw", s(&p), s(&out)]);
    assert_eq!(c.code, Some(0), "{}", c.stderr);
}

#[test]
fn writers_refuse_sizes_they_cannot_describe() {
    if !qemu_available("writers_refuse_sizes_they_cannot_describe") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.qcow2");
    qemu_create(&src, "qcow2", "cluster_size=2M", &(1u64 << 54).to_string());
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let cases: &[(&str, &[&str], &str)] = &[
        ("vmdk", &[], "L1 size too big"),
        (
            "vmdk",
            &["-o", "subformat=streamOptimized"],
            "L1 size too big",
        ),
        (
            "vmdk",
            &["-o", "subformat=twoGbMaxExtentSparse"],
            "extent files",
        ),
        (
            "vmdk",
            &["-o", "subformat=twoGbMaxExtentFlat"],
            "extent files",
        ),
        (
            "qcow2",
            &[],
            "The image size is too large for file format 'qcow2'",
        ),
        (
            "vpc",
            &[],
            "The image size is too large for file format 'vpc'",
        ),
        ("vhdx", &[], "Image size too large; max of 64TB"),
        ("vdi", &[], "Unsupported VDI image size"),
    ];
    for (fmt, opts, msg) in cases {
        let dst = out.join(format!("o.{fmt}"));
        let mut args = vec!["convert", "-O", fmt];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&src), s(&dst)]);
        let r = bounded(&format!("convert -O {fmt} {opts:?} of 2^54 bytes"), &args);
        assert_eq!(r.code, Some(1), "{fmt} {opts:?}: {}", r.stderr);
        assert!(r.stderr.contains(msg), "{fmt} {opts:?}: {}", r.stderr);
        assert!(
            entries(&out).is_empty(),
            "{fmt} {opts:?}: left {:?}",
            entries(&out)
        );
    }
    // The same sizes through create.
    let dst = out.join("c.vmdk");
    let r = bounded(
        "create vmdk 2^54",
        &["create", "-f", "vmdk", s(&dst), "16P"],
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(entries(&out).is_empty(), "left {:?}", entries(&out));
}

/// Two L2 tables naming one compressed cluster whose refcount is 1: qemu-img check flags
/// it (refcount=1 reference=2); convert must refuse it too.
#[test]
fn compressed_cluster_shared_across_tables_is_refused() {
    if !qemu_available("compressed_cluster_shared_across_tables_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "1G"]);
    qemu_io(
        "qcow2",
        &p,
        &["write -c -P 0x33 0 64k", "write -z 512M 64k"],
    );
    let h = header(&p);
    let l2a = rd64be(&p, h.l1_table_offset) & L1E_OFFSET_MASK;
    let l2b = rd64be(&p, h.l1_table_offset + 8) & L1E_OFFSET_MASK;
    assert!(l2a != 0 && l2b != 0);
    let compressed = rd64be(&p, l2a);
    assert!(
        compressed & (1 << 62) != 0,
        "not compressed: {compressed:#x}"
    );
    patch(&p, l2b, &compressed.to_be_bytes());
    let q = run_cmd("qemu-img", &["check", s(&p)]);
    assert_eq!(q.status.code(), Some(2), "qemu-img check must flag it");
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let dst = out.join("o.raw");
    let r = bounded(
        "convert shared compressed",
        &["convert", "-O", "raw", s(&p), s(&dst)],
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("shared with another L2 entry"),
        "{}",
        r.stderr
    );
    assert!(entries(&out).is_empty(), "left {:?}", entries(&out));
    let c = bounded("check shared compressed", &["check", s(&p)]);
    assert_eq!(c.code, Some(2), "{}", c.stderr);
    // Well-formed compressed images, several clusters packed per host cluster, still convert.
    let good = dir.path().join("good.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&good), "1G"]);
    qemu_io(
        "qcow2",
        &good,
        &[
            "write -c -P 1 0 64k",
            "write -c -P 2 64k 64k",
            "write -c -P 3 512M 64k",
        ],
    );
    let dst = out.join("good.raw");
    let r = bounded(
        "convert packed compressed",
        &["convert", "-O", "raw", s(&good), s(&dst)],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

/// Names with ESC, BEL, CR and LF are escaped in human info and in errors.
#[test]
fn names_from_images_cannot_paint_the_terminal() {
    if !qemu_available("names_from_images_cannot_paint_the_terminal") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("top.qcow2");
    let name = "b\x1b[2K\rsafe: yes\x07\n.qcow2";
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        name,
        "-F",
        "qcow2",
        s(&p),
        "1M",
    ]);
    for args in [
        vec!["info", s(&p)],
        vec!["info", "--backing-chain", s(&p)],
        vec!["convert", "-O", "raw", s(&p), "/dev/null"],
        vec!["check", s(&p)],
        vec!["map", s(&p)],
    ] {
        let r = bounded(&format!("{args:?}"), &args);
        for out in [&r.stdout, &r.stderr] {
            assert!(
                !out.contains('\x1b') && !out.contains('\x07') && !out.contains('\r'),
                "{args:?}: {out:?}"
            );
            assert!(!out.contains("\nsafe: yes"), "{args:?}: {out:?}");
        }
    }
    let r = bounded("info", &["info", s(&p)]);
    assert!(
        r.stdout.contains("b\\x1b[2K\\x0dsafe: yes\\x07\\x0a.qcow2"),
        "{}",
        r.stdout
    );
}

/// The write side's property: for any virtual size, every writer either refuses up front
/// (exit 1, nothing left behind, within the time and memory bounds) or writes an image
/// `qemu-img check` accepts with at least the size asked for. Sizes: the formats' limits
/// and their neighbours, extremes, and pseudo-random sizes up to 1 TiB (seeded, so a
/// failure repeats).
#[test]
fn writers_refuse_or_write_a_valid_image_for_any_size() {
    if !qemu_available("writers_refuse_or_write_a_valid_image_for_any_size") {
        return;
    }
    let mut sizes: Vec<u64> = vec![
        0,
        1,
        511,
        512,
        (1 << 20) + 1,
        2040 << 30,
        (2040 << 30) + 1,
        (1 << 42) - 1,
        64 << 40,
        (64 << 40) + 1,
        1 << 48,
        256 << 40,
        (256 << 40) + 1,
        1 << 50,
        1 << 54,
        1 << 56,
        1 << 61,
        1 << 63,
        u64::MAX - 511,
        u64::MAX,
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..6 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        sizes.push(x % (1 << 40));
    }
    let formats: &[(&str, &[&str])] = &[
        ("qcow2", &[]),
        ("vmdk", &[]),
        ("vmdk", &["-o", "subformat=streamOptimized"]),
        ("vpc", &[]),
        ("vhdx", &[]),
        ("vdi", &[]),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (fmt, opts) in formats {
        for &size in &sizes {
            let p = dir.path().join(format!("w.{fmt}"));
            let size_s = size.to_string();
            let mut args = vec!["create", "-f", fmt];
            args.extend_from_slice(opts);
            args.extend_from_slice(&[s(&p), &size_s]);
            let r = bounded(&format!("create {fmt} {opts:?} {size}"), &args);
            match r.code {
                Some(0) => {
                    // qemu-img check walks every table: past 1 TiB it takes minutes on
                    // a vmdk, so there the test asks qemu-img to open the image only.
                    let q = if size <= 1 << 40 {
                        run_cmd("qemu-img", &["check", "-f", fmt, s(&p)])
                    } else {
                        run_cmd("qemu-img", &["info", "-f", fmt, s(&p)])
                    };
                    if q.status.code() != Some(0)
                        && qemu_rejects_its_own(dir.path(), fmt, opts, size)
                    {
                        // qemu-img's own image of this size fails its check the same way
                        // (a 0-byte vmdk has no extent line qemu can open).
                        for n in entries(dir.path()) {
                            fs::remove_file(dir.path().join(n)).unwrap();
                        }
                        continue;
                    }
                    assert_eq!(
                        q.status.code(),
                        Some(0),
                        "{fmt} {opts:?} {size}: qemu-img check: {}{}",
                        String::from_utf8_lossy(&q.stdout),
                        String::from_utf8_lossy(&q.stderr)
                    );
                    let info = qemu_img(&["info", "--output=json", "-f", fmt, s(&p)]);
                    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
                    let got = v["virtual-size"].as_u64().unwrap();
                    assert!(got >= size, "{fmt} {opts:?} {size}: qemu-img sees {got}");
                }
                Some(1) => {
                    assert!(r.stderr.starts_with("vimg: "), "{}", r.stderr);
                }
                c => panic!("{fmt} {opts:?} {size}: exit {c:?}: {}", r.stderr),
            }
            assert!(
                entries(dir.path()).iter().all(|n| n == &format!("w.{fmt}")) || r.code == Some(0),
                "{fmt} {opts:?} {size}: left {:?}",
                entries(dir.path())
            );
            for n in entries(dir.path()) {
                fs::remove_file(dir.path().join(n)).unwrap();
            }
        }
    }
}

/// True when qemu-img creates an image of `size` that its own check refuses.
fn qemu_rejects_its_own(dir: &Path, fmt: &str, opts: &[&str], size: u64) -> bool {
    let q = dir.join("qemu-own");
    fs::create_dir_all(&q).unwrap();
    let p = q.join(format!("q.{fmt}"));
    let size_s = size.to_string();
    let mut args = vec!["create", "-q", "-f", fmt];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[s(&p), &size_s]);
    let made = run_cmd("qemu-img", &args).status.success();
    let rejected = made
        && !run_cmd("qemu-img", &["check", "-f", fmt, s(&p)])
            .status
            .success();
    fs::remove_dir_all(&q).unwrap();
    rejected
}

/// A monolithicFlat VMDK whose descriptor names its extent `name`.
fn vmdk_naming(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join("k.vmdk");
    qemu_create(&p, "vmdk", "subformat=monolithicFlat", "1M");
    let text = fs::read_to_string(&p).unwrap();
    assert!(text.contains("\"k-flat.vmdk\""));
    fs::write(&p, text.replace("\"k-flat.vmdk\"", &format!("\"{name}\""))).unwrap();
    p
}

/// Unclear errors: a backslash `..` names the unsafe reference; a CR in an extent name
/// is visible.
#[test]
fn unclear_names_are_named() {
    if !qemu_available("unclear_names_are_named") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("sub")).unwrap();
    // qcow2 backing file.
    let q = dir.path().join("q.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "sub/..\\..\\..\\x",
        "-F",
        "raw",
        s(&q),
        "1M",
    ]);
    let r = bounded(
        "convert backslash backing",
        &["convert", "-O", "raw", s(&q), "/dev/null"],
    );
    assert_eq!(r.code, Some(1));
    // Refused as an unsafe name (by the gate or the backslash rule), never "No such file".
    assert!(
        r.stderr.contains("backslashes") || r.stderr.contains("inside the image's folder"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("No such file"), "{}", r.stderr);
    assert!(r.stderr.contains("sub/..\\\\..\\\\..\\\\x"), "{}", r.stderr);
    // VMDK extent.
    let k = vmdk_naming(dir.path(), "sub/..\\..\\x-flat.vmdk");
    let r = bounded("info backslash extent", &["info", s(&k)]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("backslashes"), "{}", r.stderr);
    // A CR in an extent name.
    let k = vmdk_naming(dir.path(), "k\r-flat.vmdk");
    let r = bounded("info CR extent", &["info", s(&k)]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("k\\x0d-flat.vmdk"), "{}", r.stderr);
    assert!(!r.stderr.contains('\r'), "{:?}", r.stderr);
}

/// A qcow2 with a valid fixed-VHD footer appended (parses as both), then the same bytes
/// in gzip, xz and zstd: refused as ambiguous whichever container is around it.
#[test]
fn polyglot_rule_holds_through_containers() {
    use vimg::formats::vhd::header::Footer;
    if !qemu_available("polyglot_rule_holds_through_containers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vhd = dir.path().join("f.vpc");
    qemu_create(&vhd, "vpc", "subformat=fixed", "1M");
    let v = fs::read(&vhd).unwrap();
    let mut footer = Footer::parse(&v[v.len() - 512..]).unwrap();
    let p = dir.path().join("p.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "8M"]);
    qemu_io("qcow2", &p, &["write -P 7 0 1M"]);
    let mut b = fs::read(&p).unwrap();
    b.resize(b.len().div_ceil(512) * 512, 0);
    footer.current_size = b.len() as u64;
    footer.original_size = b.len() as u64;
    footer.seal();
    b.extend_from_slice(&footer.to_bytes());
    fs::write(&p, &b).unwrap();
    let r = bounded("info polyglot", &["info", s(&p)]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stderr.contains("ambiguous"), "{}", r.stderr);
    for (tool, ext) in [("gzip", "gz"), ("xz", "xz"), ("zstd", "zst")] {
        if !tool_available("polyglot_rule_holds_through_containers", tool) {
            continue;
        }
        run_ok(tool, &["-k", "-q", "-f", s(&p)]);
        let c = dir.path().join(format!("p.qcow2.{ext}"));
        for args in [
            vec!["info", s(&c)],
            vec!["info", "--output=json", s(&c)],
            vec!["convert", "-O", "raw", s(&c), "/dev/null"],
        ] {
            let r = bounded(&format!("{args:?}"), &args);
            assert_eq!(r.code, Some(1), "{args:?}: {}", r.stdout);
            assert!(r.stderr.contains("ambiguous"), "{args:?}: {}", r.stderr);
        }
        // Into a file, the copy starts before the end is decoded (the whole-image probe
        // is settled before commit): still refused, nothing left behind, an existing file
        // untouched.
        let out = dir.path().join(format!("out-{ext}.raw"));
        let args = [
            "convert",
            "-O",
            "raw",
            "--checksum",
            "sha256",
            s(&c),
            s(&out),
        ];
        let r = bounded("convert polyglot to a new file", &args);
        assert_eq!(r.code, Some(1), "{}", r.stdout);
        assert!(r.stderr.contains("ambiguous"), "{}", r.stderr);
        assert!(!out.exists());
        fs::write(&out, b"old").unwrap();
        let r = bounded("convert polyglot over a file", &args);
        assert_eq!(r.code, Some(1), "{}", r.stdout);
        assert!(r.stderr.contains("ambiguous"), "{}", r.stderr);
        assert_eq!(fs::read(&out).unwrap(), b"old");
        fs::remove_file(&out).unwrap();
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // -f says what the bytes are.
        let r = bounded("info -f qcow2", &["info", "-f", "qcow2", s(&c)]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
    }
}

/// A 70-deep chain: the error names the depth limit and the failing link, in a few hundred
/// bytes (it was a 4.7 KB nest of "Could not open backing file").
#[test]
fn deep_chain_error_names_the_failing_link() {
    if !qemu_available("deep_chain_error_names_the_failing_link") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(&["create", "-q", "-f", "qcow2", s(&d.join("c0.qcow2")), "1M"]);
    for i in 1..=70 {
        let b = format!("c{}.qcow2", i - 1);
        let p = d.join(format!("c{i}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &b,
            "-F",
            "qcow2",
            s(&p),
            "1M",
        ]);
    }
    let top = d.join("c70.qcow2");
    let r = bounded(
        "convert 70-deep chain",
        &["convert", "-O", "raw", s(&top), "/dev/null"],
    );
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.len() < 600,
        "{} bytes: {}",
        r.stderr.len(),
        r.stderr
    );
    assert!(r.stderr.contains("longer than 64 images"), "{}", r.stderr);
    assert!(
        r.stderr.contains("layer 65 of the backing chain"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("c5.qcow2"), "{}", r.stderr);
    // A short broken chain names the link that failed, once.
    fs::write(d.join("c0.qcow2"), b"junk").unwrap();
    let r = bounded(
        "convert broken 2-deep",
        &["convert", "-O", "raw", s(&d.join("c2.qcow2")), "/dev/null"],
    );
    assert_eq!(r.code, Some(1));
    assert_eq!(
        r.stderr.matches("Could not open backing file").count(),
        1,
        "{}",
        r.stderr
    );
}

/// Decompression bombs: a .gz of 20 GiB of zeros (gzip members repeated; gzip does not
/// record the size) and a .zst of 1 TiB of zeros (8 Mi RLE blocks, no content size, past
/// the frame walk's block limit). `info` answers within the bounds, saying what it could not
/// determine; with `--source-size` it answers in full.
#[test]
fn info_on_decompression_bombs_is_bounded() {
    if !tool_available("info_on_decompression_bombs_is_bounded", "gzip") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 64 MiB of zeros gzip'd once, the member repeated 320 times.
    let one = dir.path().join("z.raw");
    fs::write(&one, vec![0u8; 64 << 20]).unwrap();
    run_ok("gzip", &["-1", "-q", s(&one)]);
    let member = fs::read(dir.path().join("z.raw.gz")).unwrap();
    let gz = dir.path().join("bomb.raw.gz");
    fs::write(&gz, member.repeat(320)).unwrap();
    // 1 TiB of zeros as one zstd frame of RLE blocks: no content size, window 128 KiB.
    let zst = dir.path().join("bomb.raw.zst");
    let mut z = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x38];
    let blocks = (1u64 << 40) / (128 << 10);
    let block = |last: bool| {
        let h = ((128u32 << 10) << 3) | (1 << 1) | u32::from(last);
        [h as u8, (h >> 8) as u8, (h >> 16) as u8, 0]
    };
    let mid = block(false);
    z.reserve((blocks * 4) as usize);
    for _ in 0..blocks - 1 {
        z.extend_from_slice(&mid);
    }
    z.extend_from_slice(&block(true));
    fs::write(&zst, z).unwrap();
    for (p, size) in [(&gz, 20u64 << 30), (&zst, 1u64 << 40)] {
        for args in [vec!["info", s(p)], vec!["info", "--output=json", s(p)]] {
            let r = bounded(&format!("{args:?}"), &args);
            assert_eq!(r.code, Some(1), "{args:?}: {}", r.stdout);
            assert!(
                r.stderr.contains("virtual size is not determined"),
                "{}",
                r.stderr
            );
            assert!(r.stderr.contains("--source-size"), "{}", r.stderr);
        }
        let size_s = size.to_string();
        let r = bounded(
            "info --source-size",
            &["info", "--output=json", "--source-size", &size_s, s(p)],
        );
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert!(
            r.stdout.contains(&format!("\"virtual-size\": {size}")),
            "{}",
            r.stdout
        );
    }
}

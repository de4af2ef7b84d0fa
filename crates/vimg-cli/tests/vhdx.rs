//! vhdx against qemu-img both ways, vhdiinfo, log replay, differencing chains, hostile
//! images and the shared corpus.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use vimg::formats::vhdx::header::{
    checksum_with_zeroed_field, Guid, Header, MetadataEntry, MetadataTable, ParentLocator,
    RegionTable, BAT_GUID, FILE_PARAMETERS_GUID, HEADER_SIZE, METADATA_GUID, METADATA_TABLE_SIZE,
    META_IS_REQUIRED, PARAM_HAS_PARENT, PARENT_LOCATOR_GUID, PARENT_TYPE_VHDX_GUID,
    REGION_TABLE_SIZE, VIRTUAL_DISK_SIZE_GUID,
};

/// Option sets covering each subformat and option qemu-img documents for vhdx.
const OPTION_SETS: &[&str] = &[
    "",
    "subformat=dynamic",
    "subformat=fixed",
    "subformat=fixed,block_state_zero=off",
    "block_state_zero=off",
    "block_size=1M",
    "block_size=32M,log_size=4M",
    "block_size=256M",
    "log_size=1M,block_size=2M,preallocation=falloc,nocow=off,extent_size_hint=0",
];

fn qemu_info(p: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&["info", "--output=json", s(p)])).unwrap()
}

/// Runs vimg and asserts it fails cleanly (exit 1, a message, no panic).
#[track_caller]
fn vimg_fails(args: &[&str]) -> String {
    let out = vimg_raw(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "vimg {args:?} should fail cleanly, got {:?}: {err}",
        out.status
    );
    assert!(err.starts_with("vimg: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// The corpus digest (see the corpus README): sha256 over each non-zero 64 KiB block of
/// the guest data, as its index (8 bytes, big-endian) and bytes, then the length. Walks the
/// mapping so huge sparse disks cost only their data.
fn digest(img: &Path) -> String {
    use sha2::{Digest, Sha256};
    let image = vimg::Image::open(img, &vimg::OpenOptions::default()).unwrap();
    let size = image.virtual_size();
    const B: u64 = 65536;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; B as usize];
    let mut next_block = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let (e, _, _) = image.map_flat(pos, size - pos).unwrap();
        if e.kind.has_data() {
            let first = (e.start.get() / B).max(next_block);
            let last = (e.end() - 1) / B;
            for blk in first..=last {
                let n = (size - blk * B).min(B) as usize;
                image.read_at(&mut buf[..n], blk * B).unwrap();
                if buf[..n].iter().any(|b| *b != 0) {
                    h.update(blk.to_be_bytes());
                    h.update(&buf[..n]);
                }
            }
            next_block = last + 1;
        }
        pos = e.end();
    }
    h.update(size.to_be_bytes());
    hex(&h.finalize())
}

// ---------------------------------------------------------------- patching helpers

/// `(BAT offset, metadata offset)` from region table 1.
fn regions(b: &[u8]) -> (usize, usize) {
    let t = RegionTable::parse(&b[0x30000..0x30000 + REGION_TABLE_SIZE]).unwrap();
    let off = |g| t.entries.iter().find(|e| e.guid == g).unwrap().file_offset as usize;
    (off(BAT_GUID), off(METADATA_GUID))
}

fn metadata(b: &[u8]) -> MetadataTable {
    let (_, meta) = regions(b);
    MetadataTable::parse(&b[meta..meta + METADATA_TABLE_SIZE]).unwrap()
}

fn item_offset(b: &[u8], g: Guid) -> usize {
    let (_, meta) = regions(b);
    meta + metadata(b)
        .entries
        .iter()
        .find(|e| e.item_id == g)
        .unwrap()
        .offset as usize
}

fn bat_entry(b: &[u8], i: usize) -> u64 {
    let (bat, _) = regions(b);
    u64::from_le_bytes(b[bat + 8 * i..bat + 8 * i + 8].try_into().unwrap())
}

fn set_bat_entry(b: &mut [u8], i: usize, v: u64) {
    let (bat, _) = regions(b);
    b[bat + 8 * i..bat + 8 * i + 8].copy_from_slice(&v.to_le_bytes());
}

fn patch_headers(b: &mut [u8], f: impl Fn(&mut Header)) {
    for off in [0x10000usize, 0x20000] {
        let mut h = Header::parse(&b[off..off + HEADER_SIZE]).unwrap();
        f(&mut h);
        h.write_to(&mut b[off..off + HEADER_SIZE]);
    }
}

fn patch_region_tables(b: &mut [u8], f: impl Fn(&mut RegionTable)) {
    for off in [0x30000usize, 0x40000] {
        let mut t = RegionTable::parse(&b[off..off + REGION_TABLE_SIZE]).unwrap();
        f(&mut t);
        t.write_to(&mut b[off..off + REGION_TABLE_SIZE]);
    }
}

/// Makes `b` a differencing image whose parent locator holds `entries` (key, value): the
/// parent's path and its `parent_linkage`.
fn make_differencing(b: &mut [u8], entries: &[(&str, &str)]) {
    let entries = entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let loc = ParentLocator {
        locator_type: PARENT_TYPE_VHDX_GUID,
        entries,
    }
    .to_bytes();
    let (_, meta) = regions(b);
    let at = 0x11000usize;
    b[meta + at..meta + at + loc.len()].copy_from_slice(&loc);
    let mut t = metadata(b);
    t.entries.push(MetadataEntry {
        item_id: PARENT_LOCATOR_GUID,
        offset: at as u32,
        length: loc.len() as u32,
        flags: META_IS_REQUIRED,
    });
    t.write_to(&mut b[meta..meta + METADATA_TABLE_SIZE]);
    let fp = item_offset(b, FILE_PARAMETERS_GUID);
    b[fp + 4..fp + 8].copy_from_slice(&PARAM_HAS_PARENT.to_le_bytes());
}

// ---------------------------------------------------------------- qemu-img both ways

#[test]
fn qemu_written_images_read_like_qemu() {
    if !qemu_available("qemu_written_images_read_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 64 << 20);
    for o in OPTION_SETS {
        let img = dir.path().join("q.vhdx");
        let _ = fs::remove_file(&img);
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", "vhdx"];
        if !o.is_empty() {
            args.extend(["-o", o]);
        }
        args.extend([s(&src), s(&img)]);
        qemu_img(&args);
        assert_reads_like_qemu(&img, "vhdx", dir.path());
        // vimg's view of the allocation: data only where the source has data.
        let image = vimg::Image::open(&img, &vimg::OpenOptions::default()).unwrap();
        let e = image
            .reader()
            .map(vimg::GuestOffset(8 << 20), 1 << 20)
            .unwrap();
        if !o.contains("fixed,block_state_zero=off") && !o.contains("256M") && !o.contains("32M") {
            assert!(!e.kind.has_data(), "{o}: {e:?}");
        }
    }
    // An image qemu-io wrote in pieces: partial blocks, rewrites, a zero write.
    let img = dir.path().join("io.vhdx");
    qemu_create(&img, "vhdx", "block_size=1M", "16M");
    qemu_io(
        "vhdx",
        &img,
        &[
            "write -P 0x11 0 4k",
            "write -P 0x22 3m 1536",
            "write -P 0x33 5000k 100k",
            "write -P 0x44 2k 4k",
            "write -z 5000k 4k",
            "write -P 0x55 15m 1m",
        ],
    );
    assert_reads_like_qemu(&img, "vhdx", dir.path());
}

#[test]
fn vimg_written_images_are_accepted_by_qemu_and_vhdiinfo() {
    if !qemu_available("vimg_written_images_are_accepted_by_qemu_and_vhdiinfo") {
        return;
    }
    let vhdi = tool_available(
        "vimg_written_images_are_accepted_by_qemu_and_vhdiinfo",
        "vhdiinfo",
    );
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 64 << 20);
    for o in OPTION_SETS {
        let img = dir.path().join("v.vhdx");
        let q = dir.path().join("q.vhdx");
        let _ = fs::remove_file(&img);
        let _ = fs::remove_file(&q);
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", "vhdx"];
        if !o.is_empty() {
            args.extend(["-o", o]);
        }
        args.extend([s(&src), s(&img)]);
        vimg(&args);
        assert_qemu_accepts(&img, "vhdx", &src, "raw");
        // The same block size qemu would choose, and the same virtual size.
        let mut qargs = vec!["create", "-q", "-f", "vhdx"];
        if !o.is_empty() {
            qargs.extend(["-o", o]);
        }
        qargs.extend([s(&q), "64M"]);
        qemu_img(&qargs);
        let (vi, qi) = (qemu_info(&img), qemu_info(&q));
        assert_eq!(vi["cluster-size"], qi["cluster-size"], "{o}");
        assert_eq!(vi["virtual-size"], qi["virtual-size"], "{o}");
        assert_reads_like_qemu(&img, "vhdx", dir.path());
        if vhdi {
            let out = run_ok("vhdiinfo", &[s(&img)]);
            let want = if o.contains("fixed") {
                "Fixed"
            } else {
                "Dynamic"
            };
            assert!(
                out.contains(&format!("Disk type\t\t: {want}")),
                "{o}: {out}"
            );
            assert!(out.contains("Media size\t\t: 64 MiB"), "{o}: {out}");
        }
        // Aligned, empty-log structures.
        let b = fs::read(&img).unwrap();
        let h = Header::parse(&b[0x10000..0x11000]).unwrap();
        assert!(h.log_guid.is_zero());
        let (bat, meta) = regions(&b);
        assert_eq!((bat % (1 << 20), meta % (1 << 20)), (0, 0));
        assert_eq!(b.len() % (1 << 20), 0);
    }
}

#[test]
fn created_images_match_qemu() {
    if !qemu_available("created_images_match_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (size, o) in [
        ("1000", ""),
        ("1G", ""),
        ("1025M", ""),
        ("101G", ""),
        ("33T", ""),
        ("100M", "block_size=100"),
        ("100M", "block_size=512M"),
        ("100M", "subformat=fixed"),
        ("0", ""),
    ] {
        let v = dir.path().join("v.vhdx");
        let q = dir.path().join("q.vhdx");
        let _ = fs::remove_file(&v);
        let _ = fs::remove_file(&q);
        let mut args = vec!["create", "-q", "-f", "vhdx"];
        if !o.is_empty() {
            args.extend(["-o", o]);
        }
        vimg(&[&args[..], &[s(&v), size]].concat());
        qemu_img(&[&args[..], &[s(&q), size]].concat());
        let (vi, qi) = (qemu_info(&v), qemu_info(&q));
        assert_eq!(vi["cluster-size"], qi["cluster-size"], "{size} {o}");
        assert_eq!(vi["virtual-size"], qi["virtual-size"], "{size} {o}");
        let out = run_cmd("qemu-img", &["check", s(&v)]);
        assert!(out.status.success(), "{size} {o}");
        // qemu reads every byte of a vhdx (it has no allocation map for it): compare
        // only the small ones.
        if vi["virtual-size"].as_u64().unwrap() <= 1 << 30 {
            qemu_img(&["compare", s(&v), s(&q)]);
        }
    }
}

#[test]
fn option_errors_match_qemu() {
    if !qemu_available("option_errors_match_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.vhdx");
    for (o, size, msg) in [
        ("block_size=3M", "1G", "Block size must be a power of two"),
        ("log_size=0", "1G", "Log size must be a multiple of 1 MB"),
        ("log_size=5G", "1G", "Log size must be smaller than 4 GB"),
        (
            "subformat=foo",
            "1G",
            "Parameter 'subformat' does not accept value 'foo'",
        ),
        ("", "65T", "Image size too large; max of 64TB"),
        (
            "block_state_zero=maybe",
            "1G",
            "Parameter 'block_state_zero' expects 'on' or 'off'",
        ),
        ("preallocation=foo", "1G", "invalid parameter value: foo"),
    ] {
        let mut args = vec!["create", "-q", "-f", "vhdx"];
        if !o.is_empty() {
            args.extend(["-o", o]);
        }
        args.extend([s(&p), size]);
        let err = vimg_fails(&args);
        assert!(err.contains(msg), "{o}: {err}");
        assert!(!p.exists(), "{o}: nothing is created");
        let q = run_cmd("qemu-img", &args);
        assert!(!q.status.success());
        assert!(String::from_utf8_lossy(&q.stderr).contains(msg), "{o}");
        // (qemu-img leaves an empty file behind.)
        let _ = fs::remove_file(&p);
    }
    let src = dir.path().join("src.raw");
    write_sparse_raw(&src, 1 << 20, &[]);
    let err = vimg_fails(&["convert", "-c", "-O", "vhdx", s(&src), s(&p)]);
    assert!(err.contains("Compression not supported"), "{err}");
    let help = vimg(&["create", "-f", "vhdx", "-o", "help", s(&p), "1G"]);
    for key in [
        "block_size",
        "block_state_zero",
        "extent_size_hint",
        "log_size",
        "nocow",
        "preallocation",
        "size",
        "subformat",
    ] {
        assert!(help.contains(&format!("  {key}=")), "{key}: {help}");
    }
    // Writing into an existing image (tests/inplace_vhdx.rs has the rest).
    vimg(&["create", "-q", "-f", "vhdx", s(&p), "1M"]);
    write_sparse_raw(&src, 1 << 20, &[(4096, &[0x5a; 512])]);
    vimg(&["convert", "-n", "-O", "vhdx", s(&src), s(&p)]);
    qemu_img(&["compare", "-F", "raw", s(&p), s(&src)]);
}

// ---------------------------------------------------------------- log replay

#[test]
fn log_with_entries_is_replayed_in_memory() {
    if !qemu_available("log_with_entries_is_replayed_in_memory") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 64 << 20);
    let img = dir.path().join("dirty.vhdx");
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "vhdx",
        "-o",
        "block_size=1M",
        s(&src),
        s(&img),
    ]);
    let mut b = fs::read(&img).unwrap();
    let (bat, _) = regions(&b);
    // A new block for guest block 20 (empty in the source) at the end of the file.
    let new_block = b.len() as u64;
    b.resize(b.len() + (1 << 20), 0);
    // Payload entry index of block 20: no sector bitmap entry precedes it (chunk ratio 4096).
    let block20 = 20;
    let sector_of_entry = bat + (block20 * 8) / 4096 * 4096;
    let mut bat_sector = b[sector_of_entry..sector_of_entry + 4096].to_vec();
    let at = block20 * 8 % 4096;
    bat_sector[at..at + 8].copy_from_slice(&(new_block | 6).to_le_bytes());
    // A data sector of block 0 replaced, the next 8 KiB zeroed.
    let block0 = bat_entry(&b, 0) & !0xfffff;
    assert_ne!(block0, 0);
    let new_data = vec![0xc3u8; 4096];
    let fresh = vec![0x5au8; 4096];
    let guid = Guid::random();
    let entry = vimg::formats::vhdx::log::build_entry(
        guid,
        1,
        0,
        b.len() as u64,
        &[
            (sector_of_entry as u64, &bat_sector),
            (block0 + 8192, &new_data),
            (new_block + 4096, &fresh),
        ],
        &[(block0 + 16384, 8192)],
    );
    let h = Header::parse(&b[0x10000..0x11000]).unwrap();
    let log = h.log_offset as usize;
    b[log..log + entry.len()].copy_from_slice(&entry);
    patch_headers(&mut b, |h| h.log_guid = guid);
    fs::write(&img, &b).unwrap();
    let before = sha256_file(&img);

    // qemu refuses to read it as it is, and replays it on a copy with check -r all.
    let q = run_cmd("qemu-img", &["convert", "-O", "raw", s(&img), "/dev/null"]);
    assert!(!q.status.success());
    let copy = dir.path().join("copy.vhdx");
    fs::copy(&img, &copy).unwrap();
    let out = run_cmd("qemu-img", &["check", "-r", "all", s(&copy)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let qraw = dir.path().join("q.raw");
    qemu_img(&["convert", "-O", "raw", s(&copy), s(&qraw)]);

    let vraw = dir.path().join("v.raw");
    let out = vimg_raw(&["convert", "-O", "raw", s(&img), s(&vraw)]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("replayed"));
    assert_same_file(&qraw, &vraw);
    assert_eq!(sha256_file(&img), before, "the source is never written");
    let raw = fs::read(&vraw).unwrap();
    assert_eq!(&raw[8192..12288], &new_data[..]);
    assert!(raw[16384..24576].iter().all(|x| *x == 0));
    assert_eq!(&raw[(20 << 20) + 4096..(20 << 20) + 8192], &fresh[..]);

    // A damaged entry is not replayed: the image reads as on disk (qemu: likewise).
    b[log + 5000] ^= 1;
    fs::write(&img, &b).unwrap();
    let vraw2 = dir.path().join("v2.raw");
    let out = vimg_raw(&["convert", "-O", "raw", s(&img), s(&vraw2)]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("without replay"));
    let qraw2 = dir.path().join("q2.raw");
    qemu_img(&["convert", "-O", "raw", s(&img), s(&qraw2)]);
    assert_same_file(&qraw2, &vraw2);
}

// ---------------------------------------------------------------- differencing

/// The DataWriteGuid of `img`'s current header, braced, as a `parent_linkage` names it.
fn data_write_guid(img: &Path) -> String {
    let opts = vimg::OpenOptions::default().open_backing(false);
    let i = vimg::Image::open(img, &opts).unwrap();
    i.reader().link_identity("DataWriteGuid").unwrap()
}

/// A parent and a differencing child next to it, linked to the parent's DataWriteGuid;
/// returns (child, expected raw content).
fn chain(dir: &Path, relative: &str) -> (std::path::PathBuf, Vec<u8>) {
    chain_linked(dir, relative, |g| vec![("parent_linkage", g.to_string())])
}

/// [`chain`] with the linkage entries `link` makes from the parent's DataWriteGuid.
fn chain_linked(
    dir: &Path,
    relative: &str,
    link: impl Fn(&str) -> Vec<(&'static str, String)>,
) -> (std::path::PathBuf, Vec<u8>) {
    let size = 16usize << 20;
    let parent_raw = pattern(size, 3);
    let mut child_raw = vec![0u8; size];
    child_raw[..4 << 20].copy_from_slice(&pattern(4 << 20, 5));
    let (p, c) = (dir.join("p.raw"), dir.join("c.raw"));
    fs::write(&p, &parent_raw).unwrap();
    fs::write(&c, &child_raw).unwrap();
    let parent = dir.join("parent.vhdx");
    let child = dir.join("child.vhdx");
    vimg(&[
        "convert",
        "-q",
        "-O",
        "vhdx",
        "-o",
        "block_size=1M",
        s(&p),
        s(&parent),
    ]);
    vimg(&[
        "convert",
        "-q",
        "-O",
        "vhdx",
        "-o",
        "block_size=1M,block_state_zero=off",
        s(&c),
        s(&child),
    ]);
    let mut b = fs::read(&child).unwrap();
    let links = link(&data_write_guid(&parent));
    let mut entries: Vec<(&str, &str)> = links.iter().map(|(k, v)| (*k, v.as_str())).collect();
    entries.push(("relative_path", relative));
    make_differencing(&mut b, &entries);
    // Block 1: partially present; sector bitmap (chunk 0, entry 4096) appended.
    let bitmap = b.len();
    b.resize(bitmap + (1 << 20), 0);
    let block1 = bat_entry(&b, 1) & !0xfffff;
    set_bat_entry(&mut b, 1, block1 | 7);
    set_bat_entry(&mut b, 4096, bitmap as u64 | 6);
    let bits = bitmap + 2048 / 8; // block 1 = sectors 2048.. of the chunk
    b[bits] = 0xff; // sectors 0-7 of block 1 from the child
    b[bits + 100] = 0x0f; // sectors 800-803 too
    set_bat_entry(&mut b, 2, 2); // block 2: zero, hides the parent
    fs::write(&child, &b).unwrap();
    let mut want = parent_raw;
    want[..1 << 20].copy_from_slice(&child_raw[..1 << 20]);
    want[1 << 20..(1 << 20) + 4096].copy_from_slice(&child_raw[1 << 20..(1 << 20) + 4096]);
    let s800 = (1 << 20) + 800 * 512;
    want[s800..s800 + 2048].copy_from_slice(&child_raw[s800..s800 + 2048]);
    want[2 << 20..3 << 20].fill(0);
    want[3 << 20..4 << 20].copy_from_slice(&child_raw[3 << 20..4 << 20]);
    fs::remove_file(&p).unwrap();
    fs::remove_file(&c).unwrap();
    (child, want)
}

#[test]
fn differencing_image_reads_through_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (child, want) = chain(dir.path(), ".\\parent.vhdx");
    let out = dir.path().join("flat.raw");
    vimg(&["convert", "-O", "raw", s(&child), s(&out)]);
    assert!(fs::read(&out).unwrap() == want, "flattened content differs");
    let info = vimg(&["info", "--output=json", s(&child)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["backing-filename"], "./parent.vhdx");
    assert_eq!(v["backing-filename-format"], "vhdx");
    assert_eq!(
        v["vimg-external-references"][0]["field"],
        "parent locator relative_path"
    );
    assert_eq!(v["vimg-external-references"][0]["name"], ".\\parent.vhdx");
    let chain_info = vimg(&["info", "--backing-chain", s(&child)]);
    assert!(chain_info.contains("parent.vhdx"), "{chain_info}");
    // qemu cannot read differencing VHDX at all.
    if have("qemu-img") {
        assert!(!run_cmd("qemu-img", &["info", s(&child)]).status.success());
    }
    // Without its parent: a clear error naming the parent.
    fs::remove_file(dir.path().join("parent.vhdx")).unwrap();
    let err = vimg_fails(&[
        "convert",
        "-O",
        "raw",
        s(&child),
        s(&dir.path().join("x.raw")),
    ]);
    assert!(
        err.contains("Could not open backing file") && err.contains("parent.vhdx"),
        "{err}"
    );
    assert!(err.contains("cannot be opened"), "{err}");
    assert!(!dir.path().join("x.raw").exists());
}

#[test]
fn differencing_chain_checks_the_parents_data_write_guid() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("flat.raw");
    // parent_linkage2 alone matching is enough ([MS-VHDX] 2.6.2.6.2: either linkage).
    let (child, want) = chain_linked(d, "parent.vhdx", |g| {
        vec![
            (
                "parent_linkage",
                "{ff34003b-11ed-4cf8-a166-b2be05e20b80}".into(),
            ),
            ("parent_linkage2", g.to_uppercase()),
        ]
    });
    vimg(&["convert", "-O", "raw", s(&child), s(&out)]);
    assert!(fs::read(&out).unwrap() == want, "flattened content differs");
    fs::remove_file(&out).unwrap();
    fs::remove_file(&child).unwrap();

    let (child, want) = chain(d, "parent.vhdx");
    vimg(&["convert", "-O", "raw", s(&child), s(&out)]);
    assert!(fs::read(&out).unwrap() == want, "flattened content differs");
    fs::remove_file(&out).unwrap();
    // The parent is modified after the child was made: Hyper-V gives it a new DataWriteGuid
    // (§2.2.2: changed before the first write of user-visible data after open).
    let parent = d.join("parent.vhdx");
    let old = data_write_guid(&parent);
    let mut b = fs::read(&parent).unwrap();
    let g = Guid::random();
    patch_headers(&mut b, |h| h.data_write_guid = g);
    fs::write(&parent, &b).unwrap();
    let new = data_write_guid(&parent);
    assert_ne!(old, new);
    let err = vimg_fails(&["convert", "-O", "raw", s(&child), s(&out)]);
    assert!(err.contains("Backing chain mismatch"), "{err}");
    assert!(
        err.contains("child.vhdx") && err.contains("parent.vhdx"),
        "{err}"
    );
    assert!(err.contains(&format!("parent_linkage {old}")), "{err}");
    assert!(err.contains(&format!("has DataWriteGuid {new}")), "{err}");
    assert!(!out.exists(), "no output from a refused chain");
    let e = vimg::Image::open(&child, &vimg::OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), vimg::ErrorKind::Corrupt, "{e}");
    // The child alone is fine.
    vimg(&["info", s(&child)]);
    // qemu-img cannot open differencing VHDX at all, so it has no answer here.
}

#[test]
fn hostile_parent_locators_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    let marker = b"SECRET-MARKER-vhdx-".repeat(64 * 1024);
    fs::write(&secret, &marker[..1 << 20]).unwrap();
    let sub = dir.path().join("img");
    fs::create_dir(&sub).unwrap();
    for name in ["/etc/passwd", "../secret", "..\\secret", "C:\\secret"] {
        let (child, _) = chain(&sub, name);
        let out = sub.join("out.raw");
        let err = vimg_fails(&["convert", "-O", "raw", s(&child), s(&out)]);
        assert!(
            err.contains("refused") || err.contains("outside"),
            "{name}: {err}"
        );
        assert!(!out.exists(), "{name}: no output may appear");
        // A parent that exists but sits outside the folder stays unread under any name.
        for f in fs::read_dir(&sub).unwrap() {
            let data = fs::read(f.unwrap().path()).unwrap();
            assert!(
                !data.windows(19).any(|w| w == b"SECRET-MARKER-vhdx-"),
                "{name}: secret bytes leaked"
            );
        }
        // info still works and lists the reference.
        let info = vimg(&["info", "--output=json", s(&child)]);
        assert!(info.contains("vimg-external-references"), "{info}");
        fs::remove_file(&child).unwrap();
        fs::remove_file(sub.join("parent.vhdx")).unwrap();
    }
}

// ---------------------------------------------------------------- hostile images

#[test]
fn hostile_images_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 16 << 20);
    let good = dir.path().join("good.vhdx");
    vimg(&[
        "convert",
        "-q",
        "-O",
        "vhdx",
        "-o",
        "block_size=1M",
        s(&src),
        s(&good),
    ]);
    let base = fs::read(&good).unwrap();
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Patch, &str)> = vec![
        (
            "region count 5000",
            Box::new(|b| {
                for off in [0x30000usize, 0x40000] {
                    b[off + 8..off + 12].copy_from_slice(&5000u32.to_le_bytes());
                    let crc = checksum_with_zeroed_field(&b[off..off + REGION_TABLE_SIZE], 4);
                    b[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
                }
            }),
            "5000",
        ),
        (
            "overlapping regions",
            Box::new(|b| {
                patch_region_tables(b, |t| t.entries[1].file_offset = t.entries[0].file_offset)
            }),
            "overlaps",
        ),
        (
            "block size 0",
            Box::new(|b| {
                let o = item_offset(b, FILE_PARAMETERS_GUID);
                b[o..o + 4].copy_from_slice(&0u32.to_le_bytes());
            }),
            "block size",
        ),
        (
            "block size 512 MiB",
            Box::new(|b| {
                let o = item_offset(b, FILE_PARAMETERS_GUID);
                b[o..o + 4].copy_from_slice(&(512u32 << 20).to_le_bytes());
            }),
            "block size",
        ),
        (
            "BAT entry past EOF",
            Box::new(|b| set_bat_entry(b, 3, (1 << 40) | 6)),
            "past the end of the file",
        ),
        (
            "BAT entry on the metadata",
            Box::new(|b| {
                let (_, meta) = regions(b);
                set_bat_entry(b, 3, meta as u64 | 6)
            }),
            "metadata region",
        ),
        (
            "duplicate BAT entries",
            Box::new(|b| {
                let e = bat_entry(b, 0);
                set_bat_entry(b, 5, e)
            }),
            "overlaps",
        ),
        (
            "both headers corrupt",
            Box::new(|b| {
                b[0x10000 + 300] ^= 1;
                b[0x20000 + 300] ^= 1;
            }),
            "No valid VHDX header",
        ),
        (
            "huge virtual size in a tiny file",
            Box::new(|b| {
                let o = item_offset(b, VIRTUAL_DISK_SIZE_GUID);
                b[o..o + 8].copy_from_slice(&(64u64 << 40).to_le_bytes());
            }),
            "needs",
        ),
        ("empty file", Box::new(|b| b.clear()), "vhdx"),
    ];
    for (what, f, needle) in cases {
        let p = dir.path().join("bad.vhdx");
        let mut b = base.clone();
        f(&mut b);
        fs::write(&p, &b).unwrap();
        let out = dir.path().join("out.raw");
        let start = std::time::Instant::now();
        let err = vimg_fails(&["convert", "-f", "vhdx", "-O", "raw", s(&p), s(&out)]);
        assert!(err.contains(needle), "{what}: {err}");
        assert!(!out.exists(), "{what}");
        vimg_fails(&["info", "-f", "vhdx", s(&p)]);
        assert!(start.elapsed().as_secs() < 10, "{what} took too long");
    }
}

// ---------------------------------------------------------------- measure and map

#[test]
fn measure_matches_what_vimg_writes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 64 << 20);
    let image = vimg::Image::open(&src, &vimg::OpenOptions::default()).unwrap();
    let data = vimg::engine::ImageData::new(&image);
    for o in OPTION_SETS {
        let mut opts = vimg::CreateOptions::new();
        opts.parse_into(o).unwrap();
        let m = vimg::Format::Vhdx
            .driver()
            .measure(64 << 20, &opts, Some(&data))
            .unwrap();
        let img = dir.path().join("m.vhdx");
        let _ = fs::remove_file(&img);
        let mut args = vec!["convert", "-q", "-O", "vhdx"];
        if !o.is_empty() {
            args.extend(["-o", o]);
        }
        args.extend([s(&src), s(&img)]);
        vimg(&args);
        let actual = fs::metadata(&img).unwrap().len();
        let block = vimg::Image::open(&img, &vimg::OpenOptions::default())
            .unwrap()
            .reader()
            .cluster_size()
            .unwrap();
        assert!(
            m.required >= actual,
            "{o}: required {} < {actual}",
            m.required
        );
        // The written zeros in the source may save one block.
        assert!(
            m.required - actual <= block,
            "{o}: {} vs {actual}",
            m.required
        );
        assert!(m.fully_allocated >= m.required);
        if o.contains("fixed") {
            assert_eq!(m.required, actual);
        }
        let empty = vimg::Format::Vhdx
            .driver()
            .measure(64 << 20, &opts, None)
            .unwrap();
        assert!(empty.required <= m.required);
    }
}

#[test]
fn map_reports_the_real_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    write_sparse_raw(
        &src,
        8 << 20,
        &[(0, &[1u8; 4096][..]), (5 << 20, &[2u8; 100][..])],
    );
    for (o, empty) in [
        ("block_size=1M", vimg::MapKind::Zero),
        (
            "block_size=1M,block_state_zero=off",
            vimg::MapKind::Unallocated,
        ),
    ] {
        let img = dir.path().join("a.vhdx");
        let _ = fs::remove_file(&img);
        vimg(&["convert", "-q", "-O", "vhdx", "-o", o, s(&src), s(&img)]);
        let image = vimg::Image::open(&img, &vimg::OpenOptions::default()).unwrap();
        let mut data = Vec::new();
        let mut pos = 0;
        while pos < 8 << 20 {
            let e = image
                .reader()
                .map(vimg::GuestOffset(pos), u64::MAX)
                .unwrap();
            if e.kind.has_data() {
                data.push((e.start.get(), e.end()));
            } else if (1 << 20..5 << 20).contains(&pos) {
                // Blocks 1-4 got no data: their BAT state says so.
                assert_eq!(e.kind, empty, "{o} at {pos:#x}");
            }
            pos = e.end();
        }
        // Data only where the source has some: the written 4 KiB at 0 and the 100 bytes
        // at 5 MiB (holes of the host file inside an allocated block read as zeros and are
        // reported as such, as far as the filesystem tracks holes).
        assert_eq!(data[0].0, 0, "{o}: {data:?}");
        assert!(data[0].1 >= 4096, "{o}: {data:?}");
        assert!(data
            .iter()
            .any(|d| d.0 <= 5 << 20 && d.1 >= (5 << 20) + 100));
        for (s, e) in &data {
            assert!(
                *e <= 1 << 20 || (*s >= 5 << 20 && *e <= 6 << 20),
                "{o}: {data:?}"
            );
        }
    }
}

// ---------------------------------------------------------------- fixtures and corpus

#[test]
fn committed_fixture_and_its_truncations() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata");
    let xz = root.join("small.vhdx.xz");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("small.vhdx");
    let out = Command::new("xz")
        .args(["-dc", s(&xz)])
        .output()
        .expect("xz");
    assert!(out.status.success());
    fs::write(&img, &out.stdout).unwrap();
    let raw = dir.path().join("small.raw");
    vimg(&["convert", "-O", "raw", s(&img), s(&raw)]);
    let want = fs::read_to_string(root.join("small.raw.sha256")).unwrap();
    assert_eq!(sha256_file(&raw), want.trim());
    let len = out.stdout.len() as u64;
    let cuts: Vec<u64> = (0..10).map(|k| len / 10 * k + k * 4099 % 65536).collect();
    assert_cuts_fail_or_read(&img, "vhdx", &cuts, None);
}

/// Decompresses a corpus file (bz2, gz or xz) sparsely into `dir`.
fn unpack(file: &Path, dir: &Path) -> std::path::PathBuf {
    let name = file.file_name().unwrap().to_string_lossy();
    let (tool, stem) = if let Some(x) = name.strip_suffix(".bz2") {
        ("bzip2", x)
    } else if let Some(x) = name.strip_suffix(".gz") {
        ("gzip", x)
    } else {
        ("xz", name.strip_suffix(".xz").unwrap())
    };
    let dst = dir.join(stem);
    let mut dec = Command::new(tool)
        .args(["-dc", s(file)])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let dd = Command::new("dd")
        .args([
            &format!("of={}", s(&dst)),
            "conv=sparse",
            "bs=64k",
            "status=none",
        ])
        .stdin(dec.stdout.take().unwrap())
        .status()
        .unwrap();
    assert!(dec.wait().unwrap().success() && dd.success());
    dst
}

#[test]
fn corpus_vhdx_rows() {
    let Some(corpus) = corpus_dir() else { return };
    let manifest = fs::read_to_string(corpus.join("MANIFEST.tsv")).unwrap();
    let digests = fs::read_to_string(corpus.join("DIGESTS.tsv")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for row in manifest.lines().skip(1) {
        let cols: Vec<&str> = row.split('\t').collect();
        let file = cols[0];
        if !(file.contains(".vhdx") || file.contains(".avhdx")) {
            continue;
        }
        seen += 1;
        let img = unpack(&corpus.join(file), dir.path());
        let expected = cols[6];
        let digest_row = digests
            .lines()
            .find(|l| l.split('\t').next() == Some(file))
            .map(|l| l.split('\t').nth(1).unwrap().to_string());
        if file.ends_with("differencing.avhdx.gz") {
            // Its parent is not in the corpus: a clear error naming it.
            let err = vimg_fails(&["convert", "-O", "raw", s(&img), s(&dir.path().join("o"))]);
            assert!(
                err.contains("Could not open backing file") && err.contains("Generation 1_"),
                "{err}"
            );
            let info = vimg(&["info", s(&img)]);
            assert!(info.contains("backing file: ./Generation 1_"), "{info}");
            // Hyper-V's parent_linkage parses into the check the parent would face.
            let opts = vimg::OpenOptions::default().open_backing(false);
            let i = vimg::Image::open(&img, &opts).unwrap();
            let link = i.reader().backing().unwrap().link.clone().unwrap();
            assert_eq!(link.identity, "DataWriteGuid");
            assert_eq!(
                link.expected,
                [(
                    "parent_linkage".to_string(),
                    "{ff34003b-11ed-4cf8-a166-b2be05e20b80}".to_string()
                )]
            );
            assert!(
                i.reader().warnings().is_empty(),
                "{:?}",
                i.reader().warnings()
            );
        } else if expected.starts_with("ERROR") {
            // The dirty-log image: qemu refuses it read-only; the answer after replay is the
            // digest.
            let d = digest_row.unwrap_or_else(|| panic!("{file}: no digest"));
            assert!(expected.contains("after replay: "), "{file}");
            assert_eq!(digest(&img), d, "{file}");
            let out = vimg_raw(&["info", s(&img)]);
            assert!(out.status.success(), "{file}");
        } else {
            assert_eq!(digest(&img), digest_row.unwrap(), "{file}");
            let vsize: u64 = cols[5].parse().unwrap();
            if vsize <= 1 << 30 {
                let raw = dir.path().join("out.raw");
                vimg(&["convert", "-O", "raw", s(&img), s(&raw)]);
                assert_eq!(sha256_file(&raw), expected, "{file}");
                fs::remove_file(&raw).unwrap();
            }
            let info = vimg(&["info", "--output=json", s(&img)]);
            let v: serde_json::Value = serde_json::from_str(&info).unwrap();
            assert_eq!(v["format"], "vhdx");
            assert_eq!(v["virtual-size"].as_u64(), Some(vsize), "{file}");
        }
        fs::remove_file(&img).unwrap();
    }
    assert_eq!(seen, 6, "every vhdx row of the manifest");
    let _ = std::io::stderr().flush();
}

//! Reader and writer tests on images built in memory: one failing image per validation
//! rule (each patched from a valid vimg-written image), the block-state mapping, log replay
//! and differencing images.

use std::sync::Arc;

use byteorder::{ByteOrder, LittleEndian as LE};

use super::header::*;
use super::read::VhdxReader;
use super::write::VhdxWriter;
use crate::error::ErrorKind;
use crate::formats::OpenContext;
use crate::gate::ExternalPolicy;
use crate::mapping::{FileId, GuestOffset, HostOffset, ImageReader, MapKind};
use crate::options::CreateOptions;
use crate::output::Output;
use crate::storage::{MemStorage, Storage};
use crate::writer::ImageWriter;

const M: u64 = 1 << 20;
/// Layout of the base image: 16 MiB disk, 1 MiB blocks, log at 1 MiB, BAT at 2 MiB,
/// metadata at 3 MiB, block 0 at 4 MiB and block 3 at 5 MiB; the file is 6 MiB.
const BAT: usize = 2 << 20;
const META: usize = 3 << 20;

fn base_with(opts: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("base.vhdx");
    let out = Output::new(&p);
    let mut o = CreateOptions::new();
    o.parse_into(opts).unwrap();
    let w = VhdxWriter::create(&out, 16 * M, &o).unwrap();
    w.write(0, &vec![0x11u8; 4096], &[]).unwrap();
    w.write(3 * M + 512, &vec![0x33u8; 1024], &[]).unwrap();
    Box::new(w).finish().unwrap();
    out.commit().unwrap();
    std::fs::read(&p).unwrap()
}

fn base() -> Vec<u8> {
    base_with("block_size=1M")
}

fn open(buf: &[u8]) -> crate::Result<VhdxReader> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::new(buf.to_vec()));
    VhdxReader::open(s, &OpenContext::new(None, ExternalPolicy::SameFolder))
}

/// Asserts that opening fails with `kind` and a message containing `needle`.
#[track_caller]
fn refuses(buf: &[u8], kind: ErrorKind, needle: &str) {
    match open(buf) {
        Ok(_) => panic!("opened an image that should fail with {needle:?}"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains(needle), "{needle:?} not in: {e}");
        }
    }
}

fn patch_header(buf: &mut [u8], which: u64, f: impl FnOnce(&mut Header)) {
    let off = which as usize * KIB64 as usize;
    let mut h = Header::parse(&buf[off..off + HEADER_SIZE]).unwrap();
    f(&mut h);
    h.write_to(&mut buf[off..off + HEADER_SIZE]);
}

fn patch_both_headers(buf: &mut [u8], f: impl Fn(&mut Header)) {
    patch_header(buf, 1, &f);
    patch_header(buf, 2, &f);
}

fn patch_regions(buf: &mut [u8], f: impl Fn(&mut RegionTable)) {
    for off in [REGION_TABLE1_OFFSET, REGION_TABLE2_OFFSET] {
        let off = off as usize;
        let mut t = RegionTable::parse(&buf[off..off + REGION_TABLE_SIZE]).unwrap();
        f(&mut t);
        t.write_to(&mut buf[off..off + REGION_TABLE_SIZE]);
    }
}

fn patch_metadata(buf: &mut [u8], f: impl FnOnce(&mut MetadataTable)) {
    let mut t = MetadataTable::parse(&buf[META..META + METADATA_TABLE_SIZE]).unwrap();
    f(&mut t);
    t.write_to(&mut buf[META..META + METADATA_TABLE_SIZE]);
}

/// Offset in the file of the item `g`.
fn item(buf: &[u8], g: Guid) -> usize {
    let t = MetadataTable::parse(&buf[META..META + METADATA_TABLE_SIZE]).unwrap();
    let e = t.entries.iter().find(|e| e.item_id == g).unwrap();
    META + e.offset as usize
}

fn bat(buf: &[u8], i: usize) -> u64 {
    LE::read_u64(&buf[BAT + 8 * i..])
}

fn set_bat(buf: &mut [u8], i: usize, v: u64) {
    LE::write_u64(&mut buf[BAT + 8 * i..], v);
}

#[test]
fn base_image_maps_its_blocks() {
    let r = open(&base()).unwrap();
    assert_eq!(r.virtual_size(), 16 * M);
    assert_eq!(r.cluster_size(), Some(M));
    let e = r.map(GuestOffset(100), u64::MAX).unwrap();
    assert_eq!(e.len, M - 100);
    assert_eq!(
        e.kind,
        MapKind::Data {
            file: FileId(0),
            offset: HostOffset(4 * M + 100)
        }
    );
    // Blocks 1 and 2 were never written: state ZERO (block_state_zero defaults on), merged.
    let e = r.map(GuestOffset(M), u64::MAX).unwrap();
    assert_eq!((e.len, e.kind), (2 * M, MapKind::Zero));
    let e = r.map(GuestOffset(3 * M), 10).unwrap();
    assert_eq!(e.len, 10);
    assert_eq!(
        e.kind,
        MapKind::Data {
            file: FileId(0),
            offset: HostOffset(5 * M)
        }
    );
    let e = r.map(GuestOffset(15 * M), u64::MAX).unwrap();
    assert_eq!((e.len, e.kind), (M, MapKind::Zero));
    assert!(r.map(GuestOffset(16 * M), 1).is_err());
    assert!(r.check().unwrap().messages.is_empty());
}

/// check() reports a damaged or different redundant region table (open uses table 2 only
/// when table 1 is damaged).
#[test]
fn check_compares_the_two_region_tables() {
    let clean = open(&base()).unwrap().check().unwrap();
    assert_eq!(clean.corruptions, 0);
    for (which, needle) in [
        (REGION_TABLE1_OFFSET, "region table 1"),
        (REGION_TABLE2_OFFSET, "region table 2"),
    ] {
        let mut b = base();
        b[which as usize + 100] ^= 1;
        let r = open(&b).unwrap().check().unwrap();
        assert_eq!(r.corruptions, 1, "{:?}", r.messages);
        assert!(r.messages[0].contains(needle), "{:?}", r.messages);
    }
    // Both valid, but different: table 2 says the BAT region is 2 MiB long.
    let mut b = base();
    let off = REGION_TABLE2_OFFSET as usize;
    let mut t = RegionTable::parse(&b[off..off + REGION_TABLE_SIZE]).unwrap();
    let bat = t.entries.iter_mut().find(|e| e.guid == BAT_GUID).unwrap();
    bat.length *= 2;
    t.write_to(&mut b[off..off + REGION_TABLE_SIZE]);
    let r = open(&b).unwrap().check().unwrap();
    assert_eq!(r.corruptions, 1, "{:?}", r.messages);
    assert!(r.messages[0].contains("differ"), "{:?}", r.messages);
}

#[test]
fn payload_states_of_a_dynamic_image() {
    let mut b = base();
    for (i, state) in [(1, 0u64), (2, 1), (4, 3), (5, 5), (6, 2)] {
        set_bat(&mut b, i, state);
    }
    // Block 7 continues block 0 on disk: 4 MiB and 5 MiB are blocks 0 and 3, so put a
    // second run at 6-7 MiB for blocks 8 and 9 and check they merge.
    let mut b2 = b.clone();
    b2.resize(8 * M as usize, 0);
    set_bat(&mut b2, 8, (6 * M) | 6);
    set_bat(&mut b2, 9, (7 * M) | 6);
    let r = open(&b2).unwrap();
    let kind = |blk: u64| r.map(GuestOffset(blk * M), M).unwrap().kind;
    assert_eq!(kind(1), MapKind::Unallocated);
    assert_eq!(kind(2), MapKind::Unallocated);
    assert_eq!(kind(4), MapKind::Unallocated);
    assert_eq!(kind(5), MapKind::Unallocated);
    assert_eq!(kind(6), MapKind::Zero);
    let e = r.map(GuestOffset(8 * M), u64::MAX).unwrap();
    assert_eq!(e.len, 2 * M);
}

#[test]
fn writer_options_shape_the_bat() {
    let b = base_with("block_size=1M,block_state_zero=off");
    assert_eq!(bat(&b, 1), 0);
    let b = base_with("block_size=1M,subformat=fixed");
    // Written blocks sit in their reserved slots; unwritten ones are ZERO.
    assert_eq!(bat(&b, 0), (4 * M) | 6);
    assert_eq!(bat(&b, 3), (7 * M) | 6);
    assert_eq!(bat(&b, 1), 2);
    assert_eq!(b.len() as u64, 20 * M);
    let b = base_with("block_size=1M,subformat=fixed,block_state_zero=off");
    assert_eq!(bat(&b, 1), (5 * M) | 6);
    let p = FileParameters::parse(&b[item(&b, FILE_PARAMETERS_GUID)..]).unwrap();
    assert!(p.leave_blocks_allocated());
    let r = open(&b).unwrap();
    assert_eq!(
        r.map(GuestOffset(0), u64::MAX).unwrap().len,
        16 * M,
        "a fixed image is one contiguous data run"
    );
}

#[test]
fn file_identifier_rule() {
    let mut b = base();
    b[0] = b'X';
    refuses(&b, ErrorKind::Invalid, "vhdxfile");
    // Headers that cannot be read count as invalid headers, and the message says why.
    refuses(&base()[..100], ErrorKind::Invalid, "too short");
}

#[test]
fn header_rules() {
    // One damaged header: the other one is used.
    let mut b = base();
    b[HEADER2_OFFSET as usize + 200] ^= 1;
    let r = open(&b).unwrap();
    assert_eq!(r.parsed().header_index, 1);
    // Both damaged.
    b[HEADER1_OFFSET as usize + 200] ^= 1;
    refuses(&b, ErrorKind::Invalid, "No valid VHDX header");
    // Same sequence number, different content.
    let mut b = base();
    patch_header(&mut b, 1, |h| h.sequence_number = 2);
    patch_header(&mut b, 2, |h| h.data_write_guid = Guid::random());
    refuses(&b, ErrorKind::Invalid, "both have sequence number 0x2");
    // ... identical copies (as Disk2vhd writes) are fine.
    let mut b = base();
    patch_header(&mut b, 1, |h| h.sequence_number = 2);
    assert!(open(&b).is_ok());
    // The higher sequence number wins.
    let mut b = base();
    patch_header(&mut b, 1, |h| h.sequence_number = 9);
    assert_eq!(open(&b).unwrap().parsed().header_index, 1);
    let mut b = base();
    patch_both_headers(&mut b, |h| h.log_version = 1);
    refuses(&b, ErrorKind::Invalid, "log version");
    let mut b = base();
    patch_both_headers(&mut b, |h| h.log_offset = M + 4096);
    refuses(&b, ErrorKind::Invalid, "log offset");
    let mut b = base();
    patch_both_headers(&mut b, |h| h.log_offset = 0);
    refuses(&b, ErrorKind::Invalid, "log offset");
    let mut b = base();
    patch_both_headers(&mut b, |h| h.log_length = 4096);
    refuses(&b, ErrorKind::Invalid, "log length");
}

#[test]
fn region_table_rules() {
    // Table 1 damaged: table 2 is used.
    let mut b = base();
    b[REGION_TABLE1_OFFSET as usize + 1000] ^= 1;
    assert!(open(&b).is_ok());
    b[REGION_TABLE2_OFFSET as usize + 1000] ^= 1;
    refuses(&b, ErrorKind::Invalid, "No valid VHDX region table");

    // 5000 entries (checksums valid): the count alone is refused, in both copies.
    let mut b = base();
    for off in [REGION_TABLE1_OFFSET as usize, REGION_TABLE2_OFFSET as usize] {
        LE::write_u32(&mut b[off + 8..], 5000);
        let crc = checksum_with_zeroed_field(&b[off..off + REGION_TABLE_SIZE], 4);
        LE::write_u32(&mut b[off + 4..], crc);
    }
    refuses(&b, ErrorKind::Invalid, "5000");

    type Patch = Box<dyn Fn(&mut RegionTable)>;
    let cases: Vec<(&str, Patch, ErrorKind, &str)> = vec![
        (
            "unaligned offset",
            Box::new(|t| t.entries[1].file_offset += 4096),
            ErrorKind::Invalid,
            "file offset",
        ),
        (
            "in the header section",
            Box::new(|t| t.entries[1].file_offset = 0),
            ErrorKind::Invalid,
            "past the header section",
        ),
        (
            "unaligned length",
            Box::new(|t| t.entries[0].length = 4096),
            ErrorKind::Invalid,
            "length",
        ),
        (
            "metadata on the BAT",
            Box::new(|t| t.entries[1].file_offset = 2 * M),
            ErrorKind::Corrupt,
            "overlaps",
        ),
        (
            "BAT on the log",
            Box::new(|t| t.entries[0].file_offset = M),
            ErrorKind::Corrupt,
            "overlaps",
        ),
        (
            "reserved flags",
            Box::new(|t| t.entries[0].flags = 2),
            ErrorKind::Invalid,
            "reserved",
        ),
        (
            "unknown required region",
            Box::new(|t| {
                t.entries.push(RegionEntry {
                    guid: Guid::random(),
                    file_offset: 40 * M,
                    length: M as u32,
                    flags: REGION_REQUIRED,
                })
            }),
            ErrorKind::Unsupported,
            "unknown region",
        ),
        (
            "no BAT",
            Box::new(|t| {
                t.entries.remove(0);
            }),
            ErrorKind::Invalid,
            "no BAT region",
        ),
        (
            "two metadata regions",
            Box::new(|t| {
                let mut e = t.entries[1];
                e.file_offset = 40 * M;
                t.entries.push(e)
            }),
            ErrorKind::Invalid,
            "appears twice",
        ),
        (
            "metadata region too short",
            Box::new(|t| t.entries[1].length = 0),
            ErrorKind::Invalid,
            "64 KiB",
        ),
    ];
    for (what, f, kind, needle) in cases {
        let mut b = base();
        patch_regions(&mut b, f);
        match open(&b) {
            Ok(_) => panic!("{what}: opened"),
            Err(e) => {
                assert_eq!(e.kind(), kind, "{what}: {e}");
                assert!(e.to_string().contains(needle), "{what}: {e}");
            }
        }
    }
    // An unknown region that is not required is ignored (but still may not overlap).
    let mut b = base();
    patch_regions(&mut b, |t| {
        t.entries.push(RegionEntry {
            guid: Guid::random(),
            file_offset: 40 * M,
            length: M as u32,
            flags: 0,
        })
    });
    assert!(open(&b).is_ok());
}

#[test]
fn metadata_table_rules() {
    let mut b = base();
    b[META] = b'M';
    refuses(&b, ErrorKind::Invalid, "metadata");
    let mut b = base();
    LE::write_u16(&mut b[META + 10..], 2048);
    refuses(&b, ErrorKind::Invalid, "2048");

    type Patch = Box<dyn Fn(&mut MetadataTable)>;
    let cases: Vec<(&str, Patch, ErrorKind, &str)> = vec![
        (
            "item inside the table",
            Box::new(|t| t.entries[0].offset = 100),
            ErrorKind::Invalid,
            "at least 64 KiB",
        ),
        (
            "item past the region",
            Box::new(|t| t.entries[0].offset = M as u32 - 4),
            ErrorKind::Invalid,
            "past the end of the metadata region",
        ),
        (
            "item longer than 1 MiB",
            Box::new(|t| t.entries[0].length = M as u32 + 1),
            ErrorKind::Invalid,
            "at most 1 MiB",
        ),
        (
            "empty item with an offset",
            Box::new(|t| t.entries[2].length = 0),
            ErrorKind::Invalid,
            "empty item",
        ),
        (
            "overlapping items",
            Box::new(|t| t.entries[1].offset = t.entries[0].offset + 4),
            ErrorKind::Corrupt,
            "overlaps",
        ),
        (
            "reserved flags",
            Box::new(|t| t.entries[0].flags |= 8),
            ErrorKind::Invalid,
            "reserved",
        ),
        (
            "unknown required item",
            Box::new(|t| {
                t.entries.push(MetadataEntry {
                    item_id: Guid::random(),
                    offset: 0x20000,
                    length: 8,
                    flags: META_IS_REQUIRED,
                })
            }),
            ErrorKind::Unsupported,
            "unknown item",
        ),
        (
            "missing page 83",
            Box::new(|t| {
                t.entries.remove(2);
            }),
            ErrorKind::Invalid,
            "page 83",
        ),
        (
            "duplicate virtual size",
            Box::new(|t| {
                let mut e = t.entries[1];
                e.offset = 0x20000;
                t.entries.push(e)
            }),
            ErrorKind::Invalid,
            "appears twice",
        ),
        (
            "short item",
            Box::new(|t| t.entries[1].length = 4),
            ErrorKind::Invalid,
            "shorter",
        ),
    ];
    for (what, f, kind, needle) in cases {
        let mut b = base();
        patch_metadata(&mut b, f);
        match open(&b) {
            Ok(_) => panic!("{what}: opened"),
            Err(e) => {
                assert_eq!(e.kind(), kind, "{what}: {e}");
                assert!(e.to_string().contains(needle), "{what}: {e}");
            }
        }
    }
    // Unknown items that are not required, and user items, are ignored.
    let mut b = base();
    patch_metadata(&mut b, |t| {
        t.entries.push(MetadataEntry {
            item_id: Guid::random(),
            offset: 0x20000,
            length: 8,
            flags: META_IS_USER | META_IS_REQUIRED,
        })
    });
    assert!(open(&b).is_ok());
}

#[test]
fn metadata_value_rules() {
    let fp = |v: u32, flags: u32| {
        move |b: &mut Vec<u8>| {
            let o = item(b, FILE_PARAMETERS_GUID);
            LE::write_u32(&mut b[o..], v);
            LE::write_u32(&mut b[o + 4..], flags);
        }
    };
    let u32_at = |g: Guid, v: u32| {
        move |b: &mut Vec<u8>| {
            let o = item(b, g);
            LE::write_u32(&mut b[o..], v);
        }
    };
    let vsize = |v: u64| {
        move |b: &mut Vec<u8>| {
            let o = item(b, VIRTUAL_DISK_SIZE_GUID);
            LE::write_u64(&mut b[o..], v);
        }
    };
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(Patch, ErrorKind, &str)> = vec![
        (Box::new(fp(0, 0)), ErrorKind::Invalid, "block size"),
        (Box::new(fp(512 << 20, 0)), ErrorKind::Invalid, "block size"),
        (Box::new(fp(3 << 20, 0)), ErrorKind::Invalid, "block size"),
        (Box::new(fp(1 << 19, 0)), ErrorKind::Invalid, "block size"),
        (Box::new(fp(1 << 20, 4)), ErrorKind::Invalid, "reserved"),
        (
            Box::new(fp(1 << 20, PARAM_HAS_PARENT)),
            ErrorKind::Invalid,
            "no parent locator",
        ),
        (
            Box::new(u32_at(LOGICAL_SECTOR_SIZE_GUID, 1024)),
            ErrorKind::Invalid,
            "logical sector size",
        ),
        (
            Box::new(u32_at(PHYSICAL_SECTOR_SIZE_GUID, 1000)),
            ErrorKind::Invalid,
            "physical sector size",
        ),
        (
            Box::new(vsize(1000)),
            ErrorKind::Invalid,
            "virtual disk size",
        ),
        (
            Box::new(vsize((64 << 40) + 512)),
            ErrorKind::Invalid,
            "virtual disk size",
        ),
        // 64 TiB of 1 MiB blocks needs a 512 MiB BAT; the region holds 1 MiB.
        (Box::new(vsize(64 << 40)), ErrorKind::Invalid, "needs"),
        // Fits the region but needs more entries than the 1 MiB BAT holds.
        (Box::new(vsize(200 << 30)), ErrorKind::Invalid, "needs"),
    ];
    for (f, kind, needle) in cases {
        let mut b = base();
        f(&mut b);
        refuses(&b, kind, needle);
    }
    // A BAT beyond vimg's table limit (1 TiB BAT region claimed): unsupported, not read.
    let mut b = base();
    vsize(32 << 40)(&mut b);
    patch_regions(&mut b, |t| {
        t.entries[0].file_offset = 8 * M;
        t.entries[0].length = 0xfff0_0000;
    });
    refuses(&b, ErrorKind::Unsupported, "too large");
}

#[test]
fn bat_rules() {
    let cases: Vec<(usize, u64, ErrorKind, &str)> = vec![
        (1, 4, ErrorKind::Corrupt, "reserved"),
        (1, 7 | (8 * M), ErrorKind::Corrupt, "differencing"),
        (0, (4 * M) | 6 | 0x100, ErrorKind::Corrupt, "reserved bits"),
        (
            1,
            (100 * M) | 6,
            ErrorKind::Corrupt,
            "past the end of the file",
        ),
        (1, (1 << 60) | 6, ErrorKind::Corrupt, "past the end"),
        (1, (3 * M) | 6, ErrorKind::Corrupt, "metadata region"),
        (1, (2 * M) | 6, ErrorKind::Corrupt, "BAT region"),
        (1, M | 6, ErrorKind::Corrupt, "log"),
        (1, 6, ErrorKind::Corrupt, "header section"),
        (1, (4 * M) | 6, ErrorKind::Corrupt, "BAT entry 0"),
    ];
    for (i, v, kind, needle) in cases {
        let mut b = base();
        set_bat(&mut b, i, v);
        refuses(&b, kind, needle);
    }
    // A dynamic image's sector bitmap entries are never used, whatever they hold (qemu
    // ignores them too). Entry 4096 is the first one (chunk ratio 4096); extend the disk
    // so that it exists.
    let mut b = base();
    let o = item(&b, VIRTUAL_DISK_SIZE_GUID);
    LE::write_u64(&mut b[o..], 4097 * M);
    set_bat(&mut b, 4096, 0xdead_beef);
    assert!(open(&b).is_ok());
    // The last block may end past the end of the file beyond the virtual size (qemu made
    // such fixed images), but not inside it.
    let mut b = base();
    let o = item(&b, VIRTUAL_DISK_SIZE_GUID);
    LE::write_u64(&mut b[o..], 3 * M + 4096);
    let len = b.len();
    b.truncate(len - M as usize + 4096);
    assert!(open(&b).is_ok());
    b.truncate(b.len() - 512);
    refuses(&b, ErrorKind::Corrupt, "past the end of the file");
}

#[test]
fn log_is_replayed_over_metadata_and_data() {
    let mut b = base();
    let g = Guid::random();
    // One entry: block 3 becomes ZERO (a BAT sector), a sector of block 0 is replaced and
    // the next 8 KiB of it zeroed.
    let mut bat_sector = b[BAT..BAT + 4096].to_vec();
    LE::write_u64(&mut bat_sector[24..], 2);
    let new_data = vec![0x77u8; 4096];
    let entry = super::log::build_entry(
        g,
        1,
        0,
        b.len() as u64,
        &[(BAT as u64, &bat_sector), (4 * M + 4096, &new_data)],
        &[(4 * M, 4096)],
    );
    b[M as usize..M as usize + entry.len()].copy_from_slice(&entry);
    patch_both_headers(&mut b, |h| h.log_guid = g);
    let before = b.clone();
    let r = open(&b).unwrap();
    assert_eq!(b, before, "the source bytes are untouched");
    assert_eq!(r.map(GuestOffset(3 * M), M).unwrap().kind, MapKind::Zero);
    assert!(r.warnings()[0].contains("replayed"));
    // check refuses it as qemu-img does (read-only, the log needs replay).
    let err = r.check().unwrap_err().to_string();
    assert!(err.contains("needs to be replayed"), "{err}");
    let e = r.map(GuestOffset(0), 8192).unwrap();
    let MapKind::Data { file, offset } = e.kind else {
        panic!("block 0 should be data")
    };
    let f = r.file(file).unwrap();
    let mut got = vec![0u8; 8192];
    f.read_exact_at(&mut got, offset.get()).unwrap();
    assert_eq!(&got[..4096], &[0u8; 4096][..], "zeroed by the log");
    assert_eq!(&got[4096..], &new_data[..], "written by the log");

    // The same entry with a bad checksum: not replayed, read as on disk, with a warning.
    let mut b2 = b.clone();
    b2[M as usize + 5000] ^= 1;
    let r = open(&b2).unwrap();
    assert!(r.map(GuestOffset(3 * M), M).unwrap().kind.has_data());
    assert!(r.warnings()[0].contains("without replay"));
}

/// Turns the base image into a differencing one naming `paths` (key, value).
fn differencing(b: Vec<u8>, paths: &[(&str, &str)]) -> Vec<u8> {
    let mut entries = vec![("parent_linkage", "{ff34003b-11ed-4cf8-a166-b2be05e20b80}")];
    entries.extend_from_slice(paths);
    differencing_with(b, &entries)
}

/// Turns the base image into a differencing one whose locator holds exactly `entries`.
fn differencing_with(mut b: Vec<u8>, entries: &[(&str, &str)]) -> Vec<u8> {
    let entries = entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let loc = ParentLocator {
        locator_type: PARENT_TYPE_VHDX_GUID,
        entries,
    }
    .to_bytes();
    let at = 0x11000u32;
    b[META + at as usize..META + at as usize + loc.len()].copy_from_slice(&loc);
    patch_metadata(&mut b, |t| {
        t.entries.push(MetadataEntry {
            item_id: PARENT_LOCATOR_GUID,
            offset: at,
            length: loc.len() as u32,
            flags: META_IS_REQUIRED,
        })
    });
    let o = item(&b, FILE_PARAMETERS_GUID);
    LE::write_u32(&mut b[o + 4..], PARAM_HAS_PARENT);
    b
}

#[test]
fn differencing_image_maps_through_the_sector_bitmap() {
    let mut b = differencing(base(), &[("relative_path", ".\\parent.vhdx")]);
    // Block 1: partially present at 6 MiB, sector bitmap at 7 MiB. Bits: sectors 0-7
    // present, 8-15 not, 16 present; the rest not.
    b.resize(8 * M as usize, 0);
    set_bat(&mut b, 1, (6 * M) | 7);
    set_bat(&mut b, 4096, (7 * M) | 6);
    let bits = 7 * M as usize + 2048 / 8; // block 1 starts at sector 2048 of the chunk
    b[bits] = 0xff;
    b[bits + 2] = 0x01;
    set_bat(&mut b, 2, 2); // zero: hides the parent
    set_bat(&mut b, 4, 1); // undefined: zero in a differencing image
    set_bat(&mut b, 5, 0); // not present: the parent
    let r = open(&b).unwrap();
    let bk = r.backing().unwrap();
    assert_eq!(bk.name, "./parent.vhdx");
    assert_eq!(bk.format, Some(crate::Format::Vhdx));
    assert_eq!(r.external_refs()[0].name, ".\\parent.vhdx");
    let m = |off: u64, len: u64| {
        let e = r.map(GuestOffset(off), len).unwrap();
        (e.len, e.kind)
    };
    assert_eq!(
        m(M, M),
        (
            4096,
            MapKind::Data {
                file: FileId(0),
                offset: HostOffset(6 * M)
            }
        )
    );
    assert_eq!(m(M + 4096, M), (4096, MapKind::Unallocated));
    assert_eq!(
        m(M + 8192 + 100, M),
        (
            412,
            MapKind::Data {
                file: FileId(0),
                offset: HostOffset(6 * M + 8192 + 100)
            }
        )
    );
    assert_eq!(m(M + 8704, 10 * M), (M - 8704, MapKind::Unallocated));
    assert_eq!(m(2 * M, M).1, MapKind::Zero);
    assert_eq!(m(4 * M, M).1, MapKind::Zero);
    assert_eq!(m(5 * M, M).1, MapKind::Unallocated);
    // Partially present without a present sector bitmap.
    set_bat(&mut b, 4096, 0);
    refuses(&b, ErrorKind::Corrupt, "sector bitmap");
    // A sector bitmap block past the end of the file.
    set_bat(&mut b, 4096, (9 * M) | 6);
    refuses(&b, ErrorKind::Corrupt, "past the end");
    set_bat(&mut b, 1, 0);
    set_bat(&mut b, 4096, (7 * M) | 3);
    refuses(&b, ErrorKind::Corrupt, "sector bitmap state 3");
}

#[test]
fn parent_locator_rules() {
    let b = differencing(base(), &[("volume_path", "\\\\?\\Volume{x}\\p.vhdx")]);
    let r = open(&b).unwrap();
    assert_eq!(r.backing().unwrap().name, "\\\\?\\Volume{x}\\p.vhdx");
    let b = differencing(
        base(),
        &[
            ("absolute_win32_path", "C:\\p.vhdx"),
            ("relative_path", "p.vhdx"),
        ],
    );
    let r = open(&b).unwrap();
    let bk = r.backing().unwrap();
    assert_eq!(
        (bk.name.as_str(), bk.alternatives.as_slice()),
        ("p.vhdx", &["C:\\p.vhdx".to_string()][..])
    );
    refuses(
        &differencing(base(), &[]),
        ErrorKind::Invalid,
        "no relative_path",
    );
    refuses(
        &differencing(base(), &[("relative_path", "a"), ("relative_path", "b")]),
        ErrorKind::Invalid,
        "twice",
    );
    let mut b = differencing(base(), &[("relative_path", "a")]);
    let o = item(&b, PARENT_LOCATOR_GUID);
    b[o] ^= 1;
    refuses(&b, ErrorKind::Invalid, "locator type");
    let mut b = differencing(base(), &[("relative_path", "a")]);
    LE::write_u16(&mut b[o + 18..], 500);
    refuses(&b, ErrorKind::Invalid, "parent locator");
}

#[test]
fn parent_linkage_becomes_the_chain_check() {
    let link = |b: &[u8]| open(b).unwrap().backing().unwrap().link.clone();
    // As Hyper-V writes it (braced); any case and surrounding spaces parse to one spelling.
    let b = differencing(base(), &[("relative_path", "p.vhdx")]);
    let l = link(&b).unwrap();
    assert_eq!(l.identity, "DataWriteGuid");
    assert_eq!(
        l.expected,
        [(
            "parent_linkage".to_string(),
            "{ff34003b-11ed-4cf8-a166-b2be05e20b80}".to_string()
        )]
    );
    let b = differencing_with(
        base(),
        &[
            ("relative_path", "p.vhdx"),
            ("parent_linkage", " FF34003B-11ED-4CF8-A166-B2BE05E20B80"),
            ("parent_linkage2", "{00000000-0000-0000-0000-000000000001}"),
        ],
    );
    let l = link(&b).unwrap();
    assert_eq!(l.expected[0].1, "{ff34003b-11ed-4cf8-a166-b2be05e20b80}");
    assert_eq!(
        l.expected[1],
        (
            "parent_linkage2".to_string(),
            "{00000000-0000-0000-0000-000000000001}".to_string()
        )
    );
    // Hyper-V writes a zero parent_linkage2 when it has none: not a value to accept.
    let b = differencing(
        base(),
        &[
            ("relative_path", "p.vhdx"),
            ("parent_linkage2", "{00000000-0000-0000-0000-000000000000}"),
        ],
    );
    assert_eq!(link(&b).unwrap().expected.len(), 1);
    // The reader's own identity is spelled the same way.
    let r = open(&base()).unwrap();
    let g = r.parsed().header.data_write_guid;
    assert_eq!(r.link_identity("DataWriteGuid"), Some(format!("{{{g}}}")));
    assert_eq!(r.link_identity("CID"), None);
    // No parent_linkage: nothing to check against, said as a warning.
    let b = differencing_with(base(), &[("relative_path", "p.vhdx")]);
    let r = open(&b).unwrap();
    assert_eq!(r.backing().unwrap().link, None);
    assert!(r.warnings().iter().any(|w| w.contains("parent_linkage")));
    // A value that is no GUID is refused, naming the entry.
    for key in ["parent_linkage", "parent_linkage2"] {
        let mut e = vec![
            ("relative_path", "p.vhdx"),
            ("parent_linkage", "{ff34003b-11ed-4cf8-a166-b2be05e20b80}"),
        ];
        e.retain(|(k, _)| *k != key);
        e.push((key, "{ff34003b-11ed-4cf8-a166}"));
        refuses(&differencing_with(base(), &e), ErrorKind::Invalid, key);
    }
}

#[test]
fn truncated_images_fail_cleanly() {
    let b = base();
    for cut in [
        0,
        7,
        600,
        70_000,
        200_000,
        300_000,
        M as usize + 5,
        2 * M as usize + 8,
        3 * M as usize + 100,
        b.len() - 1,
    ] {
        assert!(open(&b[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn logical_sectors_of_4096_bytes() {
    let mut b = base();
    let o = item(&b, LOGICAL_SECTOR_SIZE_GUID);
    LE::write_u32(&mut b[o..], 4096);
    let r = open(&b).unwrap();
    assert_eq!(r.parsed().geometry.chunk_ratio, 32768);
    assert!(r.map(GuestOffset(3 * M), M).unwrap().kind.has_data());
    // The virtual size must then be a multiple of 4096.
    let o = item(&b, VIRTUAL_DISK_SIZE_GUID);
    LE::write_u64(&mut b[o..], 16 * M - 512);
    refuses(&b, ErrorKind::Invalid, "virtual disk size");
}

//! Unit tests: header round trip on an annotated fixture, one failing image per validation
//! rule, the writer's layout.

use std::sync::Arc;

use super::header::*;
use super::*;
use crate::error::ErrorKind;
use crate::mapping::{GuestOffset, MapKind};
use crate::storage::MemStorage;

/// The header `qemu-img create -f parallels x 10M` writes, field by field.
fn qemu_header_10m() -> [u8; 64] {
    let mut b = [0u8; 64];
    b[..16].copy_from_slice(b"WithouFreSpacExt"); // magic
    b[0x10..0x14].copy_from_slice(&2u32.to_le_bytes()); // version
    b[0x14..0x18].copy_from_slice(&16u32.to_le_bytes()); // heads
    b[0x18..0x1c].copy_from_slice(&40u32.to_le_bytes()); // cylinders = 20480 / 16 / 32
    b[0x1c..0x20].copy_from_slice(&2048u32.to_le_bytes()); // tracks: 1 MiB clusters
    b[0x20..0x24].copy_from_slice(&10u32.to_le_bytes()); // bat_entries
    b[0x24..0x2c].copy_from_slice(&20480u64.to_le_bytes()); // nb_sectors
    b[0x30..0x34].copy_from_slice(&2048u32.to_le_bytes()); // data_off: 1 MiB
    b
}

#[test]
fn header_round_trip_and_writer_layout() {
    let b = qemu_header_10m();
    let h = Header::parse(&b).unwrap();
    assert_eq!(
        (h.tracks, h.bat_entries, h.nb_sectors, h.data_off),
        (2048, 10, 20480, 2048)
    );
    let mut out = [0u8; 64];
    h.write_to(&mut out);
    assert_eq!(out, b);
    let l = layout(10 << 20, DEFAULT_CLUSTER_SIZE).unwrap();
    assert_eq!(l.header, h);
    assert_eq!(l.data_start, 1 << 20);
}

#[test]
fn layout_follows_qemu_limits() {
    // Sizes and clusters round up to sectors.
    let l = layout(1000, 1000).unwrap();
    assert_eq!(
        (l.size, l.cluster_size, l.header.bat_entries),
        (1024, 1024, 1)
    );
    assert!(layout(10 << 20, 0).is_err());
    assert!(layout(10 << 20, 4 << 30).is_err());
    assert!(layout(5 << 50, 1 << 20).is_err());
}

/// A small valid image: 4 clusters of 4 KiB, clusters 0 and 2 allocated.
fn small() -> Vec<u8> {
    let l = layout(16 << 10, 4096).unwrap();
    let mut img = vec![0u8; l.data_start as usize + 2 * 4096];
    l.header.write_to(&mut img);
    let first = (l.data_start / 4096) as u32;
    img[64..68].copy_from_slice(&first.to_le_bytes());
    img[72..76].copy_from_slice(&(first + 1).to_le_bytes());
    let ds = l.data_start as usize;
    img[ds..ds + 4096].fill(0xaa);
    img[ds + 4096..].fill(0xbb);
    img
}

fn open(img: Vec<u8>) -> crate::Result<ParallelsReader> {
    ParallelsReader::open(Arc::new(MemStorage::new(img)))
}

fn set_bat(img: &mut [u8], i: usize, v: u32) {
    img[64 + 4 * i..68 + 4 * i].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn small_image_maps() {
    let r = open(small()).unwrap();
    let e = r.map(GuestOffset(0), 16 << 10).unwrap();
    assert_eq!(e.len, 4096);
    assert!(matches!(e.kind, MapKind::Data { .. }));
    let e = r.map(GuestOffset(4096), 12 << 10).unwrap();
    assert_eq!((e.len, e.kind), (4096, MapKind::Unallocated));
    assert!(r.check().unwrap().corruptions == 0);
}

fn kind(img: Vec<u8>) -> ErrorKind {
    match open(img) {
        Ok(_) => panic!("opened a bad image"),
        Err(e) => e.kind(),
    }
}

#[test]
fn bat_entry_past_eof_is_corrupt() {
    let mut img = small();
    set_bat(&mut img, 1, 1000);
    assert_eq!(kind(img), ErrorKind::Corrupt);
}

#[test]
fn bat_entry_inside_header_is_corrupt() {
    // In clusters: cluster 0 holds the header and BAT.
    let mut img = small();
    set_bat(&mut img, 3, 0);
    set_bat(&mut img, 1, 0);
    assert!(open(img.clone()).is_ok());
    let mut img = small();
    img[..16].copy_from_slice(&MAGIC_V1);
    // In sectors: clusters at sectors 8 and 16 are the same data; sector 1 is in the BAT.
    set_bat(&mut img, 0, 8);
    set_bat(&mut img, 2, 16);
    assert!(open(img.clone()).is_ok());
    set_bat(&mut img, 3, 1);
    assert_eq!(kind(img), ErrorKind::Corrupt);
}

#[test]
fn overlapping_entries_are_corrupt() {
    let mut img = small();
    let first = u32::from_le_bytes(img[64..68].try_into().unwrap());
    set_bat(&mut img, 3, first);
    assert_eq!(kind(img), ErrorKind::Corrupt);
    // Sector-granular entries that overlap without being equal.
    let mut img = small();
    img[..16].copy_from_slice(&MAGIC_V1);
    set_bat(&mut img, 0, 8);
    set_bat(&mut img, 2, 9);
    assert_eq!(kind(img), ErrorKind::Corrupt);
}

#[test]
fn bat_past_eof_and_bad_header_fields() {
    let mut img = small();
    img[0x20..0x24].copy_from_slice(&100_000u32.to_le_bytes());
    assert_eq!(kind(img), ErrorKind::Corrupt);
    let mut img = small();
    img[0x1c..0x20].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(kind(img), ErrorKind::Invalid);
    let mut img = small();
    img[0x1c..0x20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(kind(img), ErrorKind::Unsupported);
    let mut img = small();
    img[0x30..0x34].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(kind(img), ErrorKind::Invalid);
    let mut img = small();
    img[0x30..0x34].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(kind(img), ErrorKind::Invalid);
    let mut img = small();
    img[0x10] = 3;
    assert_eq!(kind(img), ErrorKind::Invalid);
    assert_eq!(kind(small()[..63].to_vec()), ErrorKind::Invalid);
}

#[test]
fn extension_outside_file_or_bad_magic() {
    let mut img = small();
    img[0x38..0x40].copy_from_slice(&1000u64.to_le_bytes());
    assert_eq!(kind(img), ErrorKind::Invalid);
    let mut img = small();
    img.extend_from_slice(&[0u8; 4096]);
    img[0x38..0x40].copy_from_slice(&24u64.to_le_bytes()); // 3 * 4096 / 512
    assert_eq!(kind(img), ErrorKind::Corrupt);
}

/// `small()` with a Format Extension cluster holding one dirty bitmap whose L1 entry
/// points at `l1` (in sectors).
fn with_bitmap(l1: u64) -> Vec<u8> {
    let mut img = small();
    let ext_at = img.len();
    img.extend_from_slice(&[0u8; 2 * 4096]);
    let bitmap_at = ext_at + 4096;
    let _ = bitmap_at;
    img[0x38..0x40].copy_from_slice(&((ext_at / 512) as u64).to_le_bytes());
    let mut ext = vec![0u8; 4096];
    let mut f = vec![0u8; FEATURE_HEADER_SIZE];
    FeatureHeader {
        magic: FEATURE_DIRTY_BITMAP,
        flags: 0,
        data_size: 40,
        unused: 0,
    }
    .write_to(&mut f);
    ext[24..48].copy_from_slice(&f);
    DirtyBitmap {
        size: 32,
        id: [7; 16],
        granularity: 8,
        l1_size: 1,
    }
    .write_to(&mut ext[48..80]);
    ext[80..88].copy_from_slice(&l1.to_le_bytes());
    use md5::Digest;
    let sum: [u8; 16] = md5::Md5::digest(&ext[24..]).into();
    ExtHeader {
        magic: EXT_MAGIC,
        checksum: sum,
    }
    .write_to(&mut ext);
    img[ext_at..ext_at + 4096].copy_from_slice(&ext);
    img
}

#[test]
fn dirty_bitmap_is_tolerated_and_listed() {
    let img = with_bitmap(((small().len() + 4096) / 512) as u64);
    let r = open(img).unwrap();
    assert_eq!(r.bitmaps().len(), 1);
    assert!(r.format_specific().is_some());
}

#[test]
fn dirty_bitmap_cluster_overlapping_data_is_corrupt() {
    // The bitmap's L1 entry names the first data cluster.
    let l = layout(16 << 10, 4096).unwrap();
    assert_eq!(kind(with_bitmap(l.data_start / 512)), ErrorKind::Corrupt);
    assert_eq!(kind(with_bitmap(1 << 40)), ErrorKind::Corrupt);
}

#[test]
fn extension_checksum_is_checked() {
    let mut img = with_bitmap(0);
    let n = img.len();
    img[n - 2 * 4096 + 200] = 1;
    assert_eq!(kind(img), ErrorKind::Corrupt);
}

#[test]
fn a_disk_far_larger_than_its_bat_maps_in_one_step() {
    // The header claims 2^52 bytes; the BAT covers 16 KiB. Mapping past the BAT must not
    // walk the claimed size cluster by cluster.
    let mut img = small();
    img[0x24..0x2c].copy_from_slice(&(1u64 << 43).to_le_bytes());
    let r = open(img).unwrap();
    let size = r.virtual_size();
    let e = r.map(GuestOffset(3 * 4096), size - 3 * 4096).unwrap();
    assert_eq!((e.kind, e.end()), (MapKind::Unallocated, size));
}

//! Unit tests: header round trip, one failing image per validation rule, bitmap mapping.

use std::sync::Arc;

use super::header::*;
use super::*;
use crate::error::ErrorKind;
use crate::mapping::{GuestOffset, MapKind};
use crate::storage::MemStorage;

/// A version 2 image of `extents` 4 KiB extents; extent 1 allocated (data slot 0) with
/// sectors 0 and 2 present (filled with 0x11 and 0x33).
fn image(extents: u32) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[..22].copy_from_slice(b"Bochs Virtual HD Image"); // magic
    b[32..39].copy_from_slice(b"Redolog"); // type
    b[48..55].copy_from_slice(b"Growing"); // subtype
    b[0x40..0x44].copy_from_slice(&VERSION_2.to_le_bytes()); // version
    b[0x44..0x48].copy_from_slice(&512u32.to_le_bytes()); // header size
    b[0x48..0x4c].copy_from_slice(&extents.to_le_bytes()); // catalog entries
    b[0x4c..0x50].copy_from_slice(&1u32.to_le_bytes()); // bitmap: 1 byte, 8 sectors
    b[0x50..0x54].copy_from_slice(&4096u32.to_le_bytes()); // extent size
    b[0x58..0x60].copy_from_slice(&(u64::from(extents) * 4096).to_le_bytes()); // disk
    let mut cat = vec![0xffu8; extents as usize * 4];
    cat[4..8].copy_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&cat);
    let mut ext = vec![0u8; 512 + 4096];
    ext[0] = 0b101;
    ext[512..1024].fill(0x11);
    ext[1024..1536].fill(0x22); // not in the bitmap: reads as zero
    ext[1536..2048].fill(0x33);
    b.extend_from_slice(&ext);
    b
}

fn open(b: Vec<u8>) -> crate::Result<BochsReader> {
    BochsReader::open(Arc::new(MemStorage::new(b)))
}

fn kind(b: Vec<u8>) -> ErrorKind {
    match open(b) {
        Ok(_) => panic!("opened a bad image"),
        Err(e) => e.kind(),
    }
}

#[test]
fn header_round_trip() {
    let b = image(4);
    let h = Header::parse(&b).unwrap();
    assert_eq!((h.catalog, h.bitmap, h.extent, h.disk), (4, 1, 4096, 16384));
    let mut again = vec![0u8; 512];
    h.write_to(&mut again);
    assert_eq!(again, b[..512]);
}

#[test]
fn maps_by_bitmap() {
    let r = open(image(4)).unwrap();
    let e = r.map(GuestOffset(0), 16384).unwrap();
    assert_eq!((e.len, e.kind), (4096, MapKind::Unallocated));
    let e = r.map(GuestOffset(4096), 12288).unwrap();
    assert_eq!(e.len, 512);
    assert!(matches!(e.kind, MapKind::Data { offset, .. } if offset.get() == 512 + 16 + 512));
    let e = r.map(GuestOffset(4608), 12288).unwrap();
    assert_eq!((e.len, e.kind), (512, MapKind::Unallocated));
    let e = r.map(GuestOffset(5120), 12288).unwrap();
    assert!(matches!(e.kind, MapKind::Data { .. }));
    let e = r.map(GuestOffset(5632), 12288).unwrap();
    assert_eq!((e.len, e.kind), (8192 - 5632, MapKind::Unallocated));
}

#[test]
fn bad_fields_are_refused() {
    let set = |at: usize, v: u32| {
        let mut b = image(4);
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        b
    };
    assert_eq!(kind(set(0x40, 0x30000)), ErrorKind::Invalid); // version
    assert_eq!(kind(set(0x44, 100)), ErrorKind::Invalid); // header size
    assert_eq!(kind(set(0x48, MAX_CATALOG + 1)), ErrorKind::Invalid);
    assert_eq!(kind(set(0x48, 2)), ErrorKind::Invalid); // too small for the disk
    assert_eq!(kind(set(0x50, 256)), ErrorKind::Invalid);
    assert_eq!(kind(set(0x50, 3000)), ErrorKind::Invalid);
    assert_eq!(kind(set(0x50, MAX_EXTENT * 2)), ErrorKind::Invalid);
    assert_eq!(kind(set(0x4c, 0)), ErrorKind::Invalid); // bitmap cannot cover 8 sectors
    let mut b = image(4);
    b[32] = b'X';
    assert_eq!(kind(b), ErrorKind::Invalid);
}

#[test]
fn catalog_past_eof_is_corrupt() {
    let mut b = image(4);
    b.truncate(512 + 8);
    assert_eq!(kind(b), ErrorKind::Corrupt);
}

#[test]
fn entry_past_eof_or_duplicate_is_corrupt() {
    let mut b = image(4);
    b[512 + 8..512 + 12].copy_from_slice(&5u32.to_le_bytes());
    assert_eq!(kind(b), ErrorKind::Corrupt);
    let mut b = image(4);
    b[512 + 8..512 + 12].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(kind(b), ErrorKind::Corrupt);
    let mut b = image(4);
    b.truncate(b.len() - 1);
    assert_eq!(kind(b), ErrorKind::Corrupt);
}

//! Unit tests: header round trip and one failing image per validation rule.

use std::sync::Arc;

use super::header::*;
use super::*;
use crate::error::ErrorKind;
use crate::mapping::{GuestOffset, MapKind};
use crate::storage::MemStorage;

const CS: usize = 4096;

/// 4 KiB clusters, 1-cluster tables (512 entries): header, L1 at cluster 1, L2 at 2,
/// data at 3 for guest cluster 0, guest cluster 1 a zero cluster; 8 MiB disk.
fn image() -> Vec<u8> {
    let h = Header {
        magic: MAGIC,
        cluster_size: CS as u32,
        table_size: 1,
        header_size: 1,
        features: 0,
        compat_features: 0,
        autoclear_features: 0,
        l1_table_offset: CS as u64,
        image_size: 8 << 20,
        backing_filename_offset: 0,
        backing_filename_size: 0,
    };
    let mut b = vec![0u8; 4 * CS];
    h.write_to(&mut b);
    b[CS..CS + 8].copy_from_slice(&(2 * CS as u64).to_le_bytes());
    b[2 * CS..2 * CS + 8].copy_from_slice(&(3 * CS as u64).to_le_bytes());
    b[2 * CS + 8..2 * CS + 16].copy_from_slice(&ZERO_CLUSTER.to_le_bytes());
    b[3 * CS..].fill(0x42);
    b
}

fn open(b: Vec<u8>) -> crate::Result<QedReader> {
    QedReader::open(Arc::new(MemStorage::new(b)))
}

fn kind(b: Vec<u8>) -> ErrorKind {
    match open(b) {
        Ok(_) => panic!("opened a bad image"),
        Err(e) => e.kind(),
    }
}

fn set64(at: usize, v: u64) -> Vec<u8> {
    let mut b = image();
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    b
}

fn set32(at: usize, v: u32) -> Vec<u8> {
    let mut b = image();
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    b
}

#[test]
fn round_trip_and_map() {
    let b = image();
    let h = Header::parse(&b).unwrap();
    let mut again = vec![0u8; HEADER_SIZE];
    h.write_to(&mut again);
    assert_eq!(again, b[..HEADER_SIZE]);
    let r = open(b).unwrap();
    let e = r.map(GuestOffset(0), 8 << 20).unwrap();
    assert!(matches!(e.kind, MapKind::Data { offset, .. } if offset.get() == 3 * CS as u64));
    assert_eq!(
        r.map(GuestOffset(CS as u64), 8 << 20).unwrap().kind,
        MapKind::Zero
    );
    let e = r.map(GuestOffset(2 * CS as u64), 8 << 20).unwrap();
    assert_eq!((e.kind, e.end()), (MapKind::Unallocated, 8 << 20));
}

#[test]
fn bad_header_fields() {
    assert_eq!(kind(set32(0, 0)), ErrorKind::Invalid);
    assert_eq!(kind(set32(4, 1000)), ErrorKind::Invalid);
    assert_eq!(kind(set32(4, 2048)), ErrorKind::Invalid);
    assert_eq!(kind(set32(8, 3)), ErrorKind::Invalid);
    assert_eq!(kind(set32(8, 32)), ErrorKind::Invalid);
    assert_eq!(kind(set32(12, 0)), ErrorKind::Invalid);
    assert_eq!(kind(set64(0x10, 0x8)), ErrorKind::Unsupported);
    assert_eq!(kind(set64(0x30, 1000)), ErrorKind::Invalid);
    assert_eq!(kind(set64(0x30, 1 << 40)), ErrorKind::Invalid);
    // A backing file name outside the header.
    let mut b = set64(0x10, F_BACKING_FILE);
    b[0x38..0x3c].copy_from_slice(&4090u32.to_le_bytes());
    b[0x3c..0x40].copy_from_slice(&10u32.to_le_bytes());
    assert_eq!(kind(b), ErrorKind::Invalid);
}

#[test]
fn bad_tables_are_corrupt() {
    assert_eq!(kind(set64(0x28, 0)), ErrorKind::Corrupt); // L1 in the header
    assert_eq!(kind(set64(0x28, 100)), ErrorKind::Corrupt); // misaligned
    assert_eq!(kind(set64(0x28, 1 << 30)), ErrorKind::Corrupt); // past EOF
    assert_eq!(kind(set64(CS, CS as u64)), ErrorKind::Corrupt); // L2 = L1
    assert_eq!(kind(set64(CS + 8, 2 * CS as u64)), ErrorKind::Corrupt); // two L1 entries, one L2
    assert_eq!(kind(set64(2 * CS, 9 * CS as u64)), ErrorKind::Corrupt); // data past EOF
    assert_eq!(kind(set64(2 * CS, 2 * CS as u64)), ErrorKind::Corrupt); // data = L2
    assert_eq!(kind(set64(2 * CS + 16, 3 * CS as u64)), ErrorKind::Corrupt); // data twice
    assert_eq!(kind(set64(2 * CS, 3 * CS as u64 + 512)), ErrorKind::Corrupt); // misaligned
}

#[test]
fn unallocated_tables_are_skipped_whole() {
    // 2^36 bytes of disk (the most 4 KiB clusters and one-cluster tables address) with one
    // L2 table: mapping the rest takes one step per L1 entry, not per cluster.
    let mut b = image();
    b[0x30..0x38].copy_from_slice(&(512u64 * 512 * 4096).to_le_bytes());
    let r = open(b).unwrap();
    let size = r.virtual_size();
    let e = r.map(GuestOffset(2 * CS as u64), size).unwrap();
    assert_eq!((e.kind, e.end()), (MapKind::Unallocated, size));
}

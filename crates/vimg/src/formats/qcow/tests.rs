//! Unit tests: header round trip and one failing image per validation rule.

use std::sync::Arc;

use super::header::*;
use super::*;
use crate::error::ErrorKind;
use crate::mapping::{GuestOffset, MapKind};
use crate::storage::MemStorage;

/// 4 KiB clusters, 512-entry L2 tables, 4 MiB disk: L1 (2 entries) at 48, L2 at 4096,
/// guest cluster 0 at 8192, guest cluster 1 compressed at 12288.
fn image() -> Vec<u8> {
    let h = Header {
        magic: MAGIC,
        version: VERSION,
        backing_file_offset: 0,
        backing_file_size: 0,
        mtime: 0,
        size: 4 << 20,
        cluster_bits: 12,
        l2_bits: 9,
        padding: 0,
        crypt_method: CRYPT_NONE,
        l1_table_offset: 48,
    };
    let mut b = vec![0u8; 12288];
    h.write_to(&mut b);
    b[48..56].copy_from_slice(&4096u64.to_be_bytes());
    b[4096..4104].copy_from_slice(&8192u64.to_be_bytes());
    b[8192..12288].fill(0x77);
    let z = crate::codec::deflate(&[0x66u8; 4096], 6, 12, false, 4096).unwrap();
    let e = COMPRESSED | ((z.len() as u64) << (63 - 12)) | 12288;
    b[4104..4112].copy_from_slice(&e.to_be_bytes());
    b.extend_from_slice(&z);
    b
}

fn open(b: Vec<u8>) -> crate::Result<QcowReader> {
    QcowReader::open(Arc::new(MemStorage::new(b)))
}

fn kind(b: Vec<u8>) -> ErrorKind {
    match open(b) {
        Ok(_) => panic!("opened a bad image"),
        Err(e) => e.kind(),
    }
}

fn set(at: usize, v: &[u8]) -> Vec<u8> {
    let mut b = image();
    b[at..at + v.len()].copy_from_slice(v);
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
    let e = r.map(GuestOffset(0), 4 << 20).unwrap();
    assert!(matches!(e.kind, MapKind::Data { offset, .. } if offset.get() == 8192));
    let e = r.map(GuestOffset(4096), 4 << 20).unwrap();
    assert!(matches!(e.kind, MapKind::Compressed { unit_len: 4096, .. }));
    let e = r.map(GuestOffset(8192), 4 << 20).unwrap();
    assert_eq!((e.kind, e.end()), (MapKind::Unallocated, 4 << 20));
}

#[test]
fn bad_header_fields() {
    assert_eq!(kind(set(4, &2u32.to_be_bytes())), ErrorKind::Invalid);
    assert_eq!(kind(set(0x18, &1u64.to_be_bytes())), ErrorKind::Invalid);
    assert_eq!(kind(set(0x18, &u64::MAX.to_be_bytes())), ErrorKind::Invalid);
    assert_eq!(kind(set(0x20, &[8])), ErrorKind::Invalid);
    assert_eq!(kind(set(0x20, &[17])), ErrorKind::Invalid);
    assert_eq!(kind(set(0x21, &[14])), ErrorKind::Invalid);
    assert_eq!(kind(set(0x24, &1u32.to_be_bytes())), ErrorKind::Unsupported);
    assert_eq!(kind(set(0x24, &2u32.to_be_bytes())), ErrorKind::Invalid);
    let mut b = set(8, &100u64.to_be_bytes());
    b[0x10..0x14].copy_from_slice(&2000u32.to_be_bytes());
    assert_eq!(kind(b), ErrorKind::Invalid);
}

#[test]
fn bad_tables_are_corrupt() {
    assert_eq!(
        kind(set(0x28, &(1u64 << 40).to_be_bytes())),
        ErrorKind::Corrupt
    );
    assert_eq!(kind(set(0x28, &0u64.to_be_bytes())), ErrorKind::Corrupt); // L1 on the header
    assert_eq!(
        kind(set(48, &(1u64 << 40).to_be_bytes())),
        ErrorKind::Corrupt
    ); // L2 past EOF
    assert_eq!(kind(set(48, &8192u64.to_be_bytes())), ErrorKind::Corrupt); // L2 on data
    assert_eq!(
        kind(set(4096, &(1u64 << 40).to_be_bytes())),
        ErrorKind::Corrupt
    );
    assert_eq!(kind(set(4096, &4096u64.to_be_bytes())), ErrorKind::Corrupt); // data on L2
    assert_eq!(kind(set(4112, &10000u64.to_be_bytes())), ErrorKind::Corrupt); // overlapping data
                                                                              // A backing name over the L1 table.
    let mut b = set(8, &40u64.to_be_bytes());
    b[0x10..0x14].copy_from_slice(&16u32.to_be_bytes());
    assert_eq!(kind(b), ErrorKind::Corrupt);
}

#[test]
fn unallocated_tables_are_skipped_whole() {
    // 500 L1 entries of 2 MiB (they still fit between the header and the L2 table at 4096),
    // one allocated: mapping the rest takes one step per L1 entry, not per cluster.
    let mut b = image();
    b[0x18..0x20].copy_from_slice(&(500u64 << 21).to_be_bytes());
    let r = open(b).unwrap();
    let size = r.virtual_size();
    let e = r.map(GuestOffset(2 << 20), size - (2 << 20)).unwrap();
    assert_eq!((e.kind, e.end()), (MapKind::Unallocated, size));
}

//! Unit tests: header round trip, one failing image per validation rule, block mapping.

use std::sync::Arc;

use super::header::*;
use super::*;
use crate::error::ErrorKind;
use crate::formats::unread::CLOOP_MAGIC;
use crate::mapping::{GuestOffset, MapKind};
use crate::storage::MemStorage;

/// Two 512-byte blocks: zeros and 0x5a, zlib-compressed.
fn image() -> Vec<u8> {
    let mut b = vec![0u8; 136];
    b[..CLOOP_MAGIC.len()].copy_from_slice(CLOOP_MAGIC);
    b[128..132].copy_from_slice(&512u32.to_be_bytes()); // block size
    b[132..136].copy_from_slice(&2u32.to_be_bytes()); // blocks
    let z0 = crate::codec::zlib_compress(&[0u8; 512], 6, 4096).unwrap();
    let z1 = crate::codec::zlib_compress(&[0x5au8; 512], 6, 4096).unwrap();
    let first = 136 + 3 * 8;
    for o in [first, first + z0.len(), first + z0.len() + z1.len()] {
        b.extend_from_slice(&(o as u64).to_be_bytes());
    }
    b.extend_from_slice(&z0);
    b.extend_from_slice(&z1);
    b
}

fn open(b: Vec<u8>) -> crate::Result<CloopReader> {
    CloopReader::open(Arc::new(MemStorage::new(b)))
}

fn kind(b: Vec<u8>) -> ErrorKind {
    match open(b) {
        Ok(_) => panic!("opened a bad image"),
        Err(e) => e.kind(),
    }
}

#[test]
fn header_round_trip_and_map() {
    let b = image();
    let h = Header::parse(&b).unwrap();
    let mut again = vec![0u8; HEADER_SIZE];
    h.write_to(&mut again);
    assert_eq!(again, b[..HEADER_SIZE]);
    let r = open(b).unwrap();
    assert_eq!(r.virtual_size(), 1024);
    let e = r.map(GuestOffset(600), 1000).unwrap();
    assert_eq!(e.len, 424);
    assert!(matches!(e.kind, MapKind::Compressed { unit_len: 512, .. }));
}

fn set(at: usize, v: &[u8]) -> Vec<u8> {
    let mut b = image();
    b[at..at + v.len()].copy_from_slice(v);
    b
}

#[test]
fn bad_header_fields() {
    assert_eq!(kind(set(0, b"X")), ErrorKind::Invalid);
    let mut b = image();
    b[3] = b'X';
    assert_eq!(kind(b), ErrorKind::Invalid);
    assert_eq!(kind(set(128, &0u32.to_be_bytes())), ErrorKind::Invalid);
    assert_eq!(kind(set(128, &1000u32.to_be_bytes())), ErrorKind::Invalid);
    assert_eq!(
        kind(set(128, &(128u32 << 20).to_be_bytes())),
        ErrorKind::Invalid
    );
    assert_eq!(kind(set(132, &u32::MAX.to_be_bytes())), ErrorKind::Invalid);
}

#[test]
fn bad_offsets_are_corrupt() {
    assert_eq!(kind(set(132, &1000u32.to_be_bytes())), ErrorKind::Corrupt); // table past EOF
    assert_eq!(kind(set(136, &8u64.to_be_bytes())), ErrorKind::Corrupt); // inside the table
    assert_eq!(kind(set(144, &159u64.to_be_bytes())), ErrorKind::Corrupt); // backwards
    assert_eq!(
        kind(set(152, &(1u64 << 40).to_be_bytes())),
        ErrorKind::Corrupt
    ); // past EOF
}

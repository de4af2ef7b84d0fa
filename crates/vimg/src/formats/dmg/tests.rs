//! Unit tests: base64 as GLib decodes it, trailer round trip, one failing image per rule.

use std::sync::Arc;

use super::header::*;
use super::*;
use crate::error::ErrorKind;
use crate::mapping::{GuestOffset, MapKind};
use crate::storage::MemStorage;

#[test]
fn base64_skips_whitespace_and_stops_at_padding() {
    assert_eq!(base64_decode(b"bWlz\n\taA=="), b"mish");
    assert_eq!(base64_decode(b"TWFu"), b"Man");
    assert_eq!(base64_decode(b"TWE="), b"Ma");
}

fn b64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = c.len();
        let v = u32::from(c[0]) << 16
            | u32::from(*c.get(1).unwrap_or(&0)) << 8
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= n {
                s.push(A[(v >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// A dmg of 8 sectors: 0..2 raw (0x11), 2..4 zero, 4..8 zlib (0x22). `chunks` overrides
/// the chunk list as (type, sector, count, offset, length).
/// A chunk entry: type, sector, count, offset, length.
type Entry = (u32, u64, u64, u64, u64);

fn image(chunks: Option<Vec<Entry>>) -> Vec<u8> {
    let mut data = vec![0x11u8; 1024];
    let z = crate::codec::zlib_compress(&[0x22u8; 2048], 6, 4096).unwrap();
    data.extend_from_slice(&z);
    let chunks = chunks.unwrap_or(vec![
        (CHUNK_RAW, 0, 2, 0, 1024),
        (CHUNK_IGNORE, 2, 2, 0, 0),
        (CHUNK_ZLIB, 4, 4, 1024, z.len() as u64),
        (CHUNK_END, 8, 0, 0, 0),
    ]);
    let mut mish = vec![0u8; MISH_HEADER_SIZE];
    mish[..4].copy_from_slice(b"mish");
    for (t, s, n, o, l) in chunks {
        let mut c = vec![0u8; CHUNK_SIZE];
        c[..4].copy_from_slice(&t.to_be_bytes());
        c[8..16].copy_from_slice(&s.to_be_bytes());
        c[16..24].copy_from_slice(&n.to_be_bytes());
        c[24..32].copy_from_slice(&o.to_be_bytes());
        c[32..40].copy_from_slice(&l.to_be_bytes());
        mish.extend_from_slice(&c);
    }
    let plist = format!("<plist><dict><key>blkx</key><array><dict><key>Data</key><data>\n\t{}\n\t</data></dict></array></dict></plist>", b64(&mish));
    let mut f = data.clone();
    let plist_at = f.len() as u64;
    f.extend_from_slice(plist.as_bytes());
    let mut k = vec![0u8; KOLY_SIZE];
    k[..4].copy_from_slice(b"koly");
    k[0x20..0x28].copy_from_slice(&(data.len() as u64).to_be_bytes());
    k[0xd8..0xe0].copy_from_slice(&plist_at.to_be_bytes());
    k[0xe0..0xe8].copy_from_slice(&(plist.len() as u64).to_be_bytes());
    k[0x1ec..0x1f4].copy_from_slice(&8u64.to_be_bytes());
    f.extend_from_slice(&k);
    f
}

fn open(b: Vec<u8>) -> crate::Result<DmgReader> {
    DmgReader::open(Arc::new(MemStorage::new(b)))
}

fn kind(b: Vec<u8>) -> ErrorKind {
    match open(b) {
        Ok(_) => panic!("opened a bad image"),
        Err(e) => e.kind(),
    }
}

#[test]
fn maps_chunks() {
    let b = image(None);
    let n = b.len();
    let k = Koly::parse(&b[n - 512..]).unwrap();
    let mut again = vec![0u8; 512];
    k.write_to(&mut again);
    assert_eq!(again, b[n - 512..]);
    let r = open(b).unwrap();
    assert_eq!(r.virtual_size(), 4096);
    assert!(
        matches!(r.map(GuestOffset(512), 4096).unwrap().kind, MapKind::Data { offset, .. } if offset.get() == 512)
    );
    assert_eq!(r.map(GuestOffset(1024), 4096).unwrap().kind, MapKind::Zero);
    let e = r.map(GuestOffset(3000), 4096).unwrap();
    assert!(matches!(e.kind, MapKind::Compressed { unit_len: 2048, .. }));
    assert_eq!(e.end(), 4096);
}

#[test]
fn bad_chunks() {
    // lzfse is refused by name.
    assert_eq!(
        kind(image(Some(vec![(
            super::header::CHUNK_LZFSE,
            0,
            8,
            0,
            100
        )]))),
        ErrorKind::Unsupported
    );
    // Overlap, gap, past EOF, raw length mismatch, too long.
    assert_eq!(
        kind(image(Some(vec![
            (CHUNK_ZERO, 0, 5, 0, 0),
            (CHUNK_ZERO, 4, 4, 0, 0)
        ]))),
        ErrorKind::Corrupt
    );
    assert_eq!(
        kind(image(Some(vec![
            (CHUNK_ZERO, 0, 4, 0, 0),
            (CHUNK_ZERO, 5, 3, 0, 0)
        ]))),
        ErrorKind::Corrupt
    );
    assert_eq!(
        kind(image(Some(vec![(CHUNK_RAW, 0, 8, 1 << 40, 4096)]))),
        ErrorKind::Corrupt
    );
    assert_eq!(
        kind(image(Some(vec![(CHUNK_RAW, 0, 8, 0, 1000)]))),
        ErrorKind::Corrupt
    );
    assert_eq!(
        kind(image(Some(vec![(CHUNK_ZLIB, 0, 8, 0, 1 << 30)]))),
        ErrorKind::Corrupt
    );
    assert_eq!(
        kind(image(Some(vec![(CHUNK_ZLIB, 0, 1 << 20, 0, 10)]))),
        ErrorKind::Corrupt
    );
    // Comments and unknown types are skipped (and then the sectors are in no chunk).
    assert_eq!(
        kind(image(Some(vec![(CHUNK_COMMENT, 0, 8, 0, 0)]))),
        ErrorKind::Corrupt
    );
}

#[test]
fn bad_trailer() {
    let mut b = image(None);
    let n = b.len();
    b[n - 512] = b'x';
    assert_eq!(kind(b), ErrorKind::Invalid);
    let mut b = image(None);
    b[n - 512 + 0xe0..n - 512 + 0xe8].copy_from_slice(&(1u64 << 40).to_be_bytes());
    assert_eq!(kind(b), ErrorKind::Invalid);
    let mut b = image(None);
    b[n - 512 + 0x30..n - 512 + 0x38].copy_from_slice(&16u64.to_be_bytes());
    assert_eq!(kind(b), ErrorKind::Unsupported);
    assert_eq!(kind(vec![0u8; 100]), ErrorKind::Invalid);
}

/// Found by the `dmg` fuzz target (2026-12-03): a zero chunk is not held to the sector-count
/// limit, so one covering the disk and running on to sector 2^63 made map() compute its end
/// in bytes, `(sector + count) * 512`, with a wrap: an extent past the disk's end. Such a
/// chunk is now refused at open.
#[test]
fn zero_chunk_whose_end_overflows_in_bytes_is_refused() {
    let b = image(Some(vec![(CHUNK_ZERO, 0, 1 << 63, 0, 0)]));
    assert_eq!(kind(b), ErrorKind::Corrupt);
    // The largest end that is still a byte offset opens, and maps inside the disk.
    let r = open(image(Some(vec![(CHUNK_ZERO, 0, u64::MAX / 512, 0, 0)]))).unwrap();
    let e = r.map(GuestOffset(0), u64::MAX).unwrap();
    assert_eq!((e.kind, e.end()), (MapKind::Zero, 4096));
}

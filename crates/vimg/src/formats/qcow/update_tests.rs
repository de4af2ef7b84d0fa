//! Unit tests of [`super::QcowUpdate`]: sub-cluster writes into a compressed cluster and
//! into new clusters and tables, AES-encrypted writes read back through the decrypting
//! reader, the empty image after `make_empty`, and refusals that leave the file unchanged.

use std::path::Path;

use super::super::header::*;
use super::QcowUpdate;
use crate::image::{Image, OpenOptions};
use crate::Format;

/// 4 KiB clusters, 512-entry L2 tables, 4 MiB disk (two L1 entries at 48): guest cluster
/// 0 plain (0x77) at 8192, cluster 1 compressed (0x66), L2 table 0 at 4096; `crypt` as
/// given.
fn image(crypt: u32) -> Vec<u8> {
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
        crypt_method: crypt,
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

fn guest(p: &Path, key: Option<&str>) -> Vec<u8> {
    let mut o = OpenOptions::with_format(Some(Format::Qcow));
    o.key_secret = key.map(str::to_string);
    let img = Image::open(p, &o).unwrap();
    let mut v = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn writes_land_in_place_in_new_clusters_and_over_compressed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow");
    std::fs::write(&p, image(CRYPT_NONE)).unwrap();
    let mut want = guest(&p, None);
    let mut u = QcowUpdate::open(&p, None).unwrap();
    let len0 = std::fs::metadata(&p).unwrap().len();
    // In place into cluster 0; part of compressed cluster 1 (the rest decompressed); a new
    // cluster in table 0; a new table (L1 entry 1) with a cluster written in part.
    let writes: &[(u64, usize, u8)] = &[
        (512, 1024, 0x11),
        (4096 + 512, 512, 0x22),
        (40960, 8192, 0x33),
        ((2 << 20) + 1536, 1024, 0x44),
    ];
    for &(off, n, v) in writes {
        u.write_at(off, &vec![v; n], None).unwrap();
        want[off as usize..off as usize + n].fill(v);
    }
    u.finish().unwrap();
    drop(u);
    assert_eq!(guest(&p, None), want);
    // Two new data clusters and one new cluster for the partial compressed one, one new
    // table and its cluster: all at the cluster-aligned end, nothing in place grew it.
    let len = std::fs::metadata(&p).unwrap().len();
    assert_eq!(len, len0.next_multiple_of(4096) + 5 * 4096);
    let b = std::fs::read(&p).unwrap();
    let l2_1 = u64::from_be_bytes(b[56..64].try_into().unwrap());
    assert_eq!(l2_1 % 4096, 0);
    let e1 = u64::from_be_bytes(b[4104..4112].try_into().unwrap());
    assert_eq!(e1 & COMPRESSED, 0, "cluster 1 is plain now");
    // Zero writes: an unallocated cluster stays so, an allocated one reads zeros.
    let mut u = QcowUpdate::open(&p, None).unwrap();
    u.write_zeroes(0, 2 << 20, None).unwrap();
    want[..2 << 20].fill(0);
    u.finish().unwrap();
    drop(u);
    assert_eq!(guest(&p, None), want);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), len);
    // make_empty: every cluster unallocated, the file cut after the L1 table.
    let mut u = QcowUpdate::open(&p, None).unwrap();
    u.make_empty().unwrap();
    drop(u);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 48 + 16);
    assert!(guest(&p, None).iter().all(|b| *b == 0));
}

#[test]
fn aes_writes_read_back_through_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.qcow");
    // An encrypted image with no data yet (the fixture's clusters are not encrypted).
    let mut b = image(CRYPT_AES);
    b[48..56].fill(0);
    b.truncate(4096);
    std::fs::write(&p, &b).unwrap();
    crate::secret::define("qcow-update-test", b"123456");
    // Without the key: qemu-img's words, nothing written.
    let e = QcowUpdate::open(&p, None).unwrap_err();
    assert!(e.to_string().contains("encrypt.key-secret"), "{e}");
    let mut u = QcowUpdate::open(&p, Some("qcow-update-test")).unwrap();
    u.write_at(4096 + 1024, &[0x5a; 1024], None).unwrap();
    u.write_at(4096 + 1536, &[0x6b; 512], None).unwrap();
    // Not whole sectors: refused before anything is written.
    let len = std::fs::metadata(&p).unwrap().len();
    assert!(u.write_at(100, &[1; 10], None).is_err());
    assert_eq!(std::fs::metadata(&p).unwrap().len(), len);
    u.finish().unwrap();
    drop(u);
    let g = guest(&p, Some("qcow-update-test"));
    let mut want = vec![0u8; 4 << 20];
    want[4096 + 1024..4096 + 1536].fill(0x5a);
    want[4096 + 1536..4096 + 2048].fill(0x6b);
    assert!(g == want);
    // On disk the data is not in clear.
    let raw = std::fs::read(&p).unwrap();
    assert!(!raw.windows(512).any(|w| w.iter().all(|x| *x == 0x5a)));
}

#[test]
fn writes_past_the_end_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow");
    std::fs::write(&p, image(CRYPT_NONE)).unwrap();
    let before = std::fs::read(&p).unwrap();
    let mut u = QcowUpdate::open(&p, None).unwrap();
    assert!(u.write_at((4 << 20) - 512, &[1; 1024], None).is_err());
    assert!(u.write_at(u64::MAX - 10, &[1; 512], None).is_err());
    assert!(u.write_zeroes(4 << 20, 1, None).is_err());
    drop(u);
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

//! Regression tests for what the `qcow2_update` fuzz target (fuzz/fuzz_targets/qcow2_update.rs)
//! found in the in-place updater: each input is a small image built here by hand.

use super::{Qcow2Update, Repair};
use crate::gate::ExternalPolicy;

/// A version 3 qcow2 image of 1 KiB clusters and a 256 KiB disk: header (cluster 0),
/// refcount table (cluster 1, one cluster, `reftable` as its first entries), an empty
/// cluster 2 and the L1 table (cluster 3, two entries, `l1`).
fn image(reftable: &[u64], l1: &[u64; 2]) -> Vec<u8> {
    let mut f = vec![0u8; 4 << 10];
    f[0..4].copy_from_slice(b"QFI\xfb");
    f[4..8].copy_from_slice(&3u32.to_be_bytes());
    f[20..24].copy_from_slice(&10u32.to_be_bytes()); // cluster_bits
    f[24..32].copy_from_slice(&(256u64 << 10).to_be_bytes()); // size
    f[36..40].copy_from_slice(&2u32.to_be_bytes()); // l1_size
    f[40..48].copy_from_slice(&0xc00u64.to_be_bytes()); // l1_table_offset
    f[48..56].copy_from_slice(&0x400u64.to_be_bytes()); // refcount_table_offset
    f[56..60].copy_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
    f[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order
    f[100..104].copy_from_slice(&104u32.to_be_bytes()); // header_length
    for (i, e) in reftable.iter().enumerate() {
        f[0x400 + 8 * i..0x408 + 8 * i].copy_from_slice(&e.to_be_bytes());
    }
    for (i, e) in l1.iter().enumerate() {
        f[0xc00 + 8 * i..0xc08 + 8 * i].copy_from_slice(&e.to_be_bytes());
    }
    f
}

/// Found by `qcow2_update` (`check -r all`): a refcount table entry pointing far past the
/// end of the file reads as a block of zeros, so every used cluster looked too low, and
/// the repair wrote the fixed refcounts at that offset, growing the (sparse) file to
/// 8 PiB. The repair now rebuilds the refcount structure from the tables, as qemu-img ends
/// up doing when it cannot grow the file to reach the block: the file stays within a few
/// clusters of its size and checks clean afterwards.
#[test]
fn repair_of_a_refcount_block_past_the_end_of_the_file_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    let bytes = image(&[0x1ff3_4000_0000_0000], &[0, 0]);
    std::fs::write(&p, &bytes).unwrap();
    let mut up = Qcow2Update::open(&p, ExternalPolicy::Deny).unwrap();
    let rep = up.repair(Repair::All).unwrap();
    assert!(rep.needs_rebuild, "{rep:?}");
    drop(up);
    let len = std::fs::metadata(&p).unwrap().len();
    assert!(
        len <= bytes.len() as u64 + (64 << 10),
        "the file grew to {len} bytes"
    );
    let img =
        crate::image::Image::open(&p, &crate::OpenOptions::default().open_backing(false)).unwrap();
    let check = crate::image::check(&img).unwrap();
    assert_eq!(check.corruptions + check.leaks, 0, "{:?}", check.messages);
}

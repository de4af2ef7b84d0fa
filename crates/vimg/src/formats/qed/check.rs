//! QED's consistency check as QEMU's block/qed-check.c defines it: every cluster from the
//! end of the header to the end of the file must be the L1 table, an L2 table or a data
//! cluster named by one; any other cluster is leaked (harmless: QED allocates at the end
//! of the file and never reuses space, so a leak is only wasted space and no repair frees
//! it). Offsets outside the file, misaligned, inside the header or named twice are
//! corruptions, which [`super::QedReader::open`] refuses before a check can count them.

use super::header::ZERO_CLUSTER;
use super::read::QedReader;

/// Leaked clusters of the image open in `r`, whose file is `file_len` bytes: clusters past
/// the header that no table names.
/// Work and memory are bounded by the file's size (one bit per cluster).
pub(super) fn leaks(r: &QedReader, file_len: u64) -> u64 {
    let cs = r.cluster_size;
    // QEMU rounds the file down to whole clusters at open, and its qed_bytes_to_clusters
    // divides by `cluster_size - 1`: one cluster more per 65535 on a 64 KiB image, each
    // counted as leaked. Reproduced so the counts match qemu-img's.
    let clusters = (file_len / cs * cs) / (cs - 1);
    let mut used = vec![0u64; clusters.div_ceil(64) as usize];
    let mut mark = |c: u64| {
        if let Some(w) = used.get_mut((c / 64) as usize) {
            *w |= 1 << (c % 64);
        }
    };
    let ts = u64::from(r.header.table_size);
    for c in 0..ts {
        mark(r.header.l1_table_offset / cs + c);
    }
    for (i, t) in r.l2.iter().enumerate() {
        let Some(t) = t else { continue };
        if let Some(&off) = r.l1.get(i) {
            for c in 0..ts {
                mark(off / cs + c);
            }
        }
        for &e in t.iter().filter(|e| **e > ZERO_CLUSTER) {
            mark(e / cs);
        }
    }
    let first = u64::from(r.header.header_size);
    (first..clusters)
        .filter(|c| used[(c / 64) as usize] & (1 << (c % 64)) == 0)
        .count() as u64
}

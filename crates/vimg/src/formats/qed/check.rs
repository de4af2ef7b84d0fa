//! QED's consistency check as QEMU's block/qed-check.c defines it: every cluster from the
//! end of the header to the end of the file must be the L1 table, an L2 table or a data
//! cluster named by one; any other cluster is leaked (harmless: QED allocates at the end
//! of the file and never reuses space, so a leak is only wasted space and no repair frees
//! it). Offsets outside the file, misaligned, inside the header or named twice are
//! corruptions, which [`super::QedReader::open`] refuses before a check can count them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::error::QedError;
use super::header::{parse_table, write_table, Header, ZERO_CLUSTER};
use super::read::QedReader;
use crate::check::CheckReport;
use crate::error::{Error, Result};
use crate::limits;

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

/// What [`scan`] found, and the table writes that fix what it can.
#[derive(Debug, Default)]
pub(super) struct Scan {
    /// The counts, as qemu-img reports them (`corruptions` are those left unfixed).
    pub report: CheckReport,
    /// Whole L2 tables, then the L1 table, with invalid entries cleared: (offset, bytes).
    pub fixes: Vec<(u64, Vec<u8>)>,
}

/// QEMU's qed_check over the tables on disk, without the reader (which refuses what this
/// counts): every L1 entry and every L2 table it names, in order. An L1 or L2 entry that
/// is misaligned, inside the header or past the end of the file is a corruption, cleared
/// when `fix` (and then counted as fixed); a cluster named twice is a corruption nobody
/// fixes (that table is skipped). Work is bounded by the file: each L2 table read is
/// inside it and claimed once.
pub(super) fn scan(file: &File, path: &Path, h: &Header, file_len: u64, fix: bool) -> Result<Scan> {
    let cs = u64::from(h.cluster_size);
    let ts = u64::from(h.table_size);
    let fsize = file_len / cs * cs;
    let header_end = u64::from(h.header_size) * cs;
    let cluster_ok = |o: u64| o.is_multiple_of(cs) && o >= header_end && o < fsize;
    let table_ok = |o: u64| {
        let end = o.checked_add((ts - 1) * cs);
        end.is_some_and(|e| e > o) && cluster_ok(o) && end.is_some_and(cluster_ok)
    };
    if !table_ok(h.l1_table_offset) {
        return Err(QedError::Offset {
            what: "L1 table offset (at 0x28)".into(),
            value: h.l1_table_offset,
            why: "not a valid table offset; QEMU cannot open the image either".into(),
        }
        .into());
    }
    let table_bytes = limits::check_table_bytes("QED L1 table", ts * cs)?;
    let read = |off: u64| -> Result<Vec<u8>> {
        let mut b = vec![0u8; table_bytes];
        file.read_exact_at(&mut b, off).map_err(|e| {
            Error::io(
                format_args!("read the QED table at {off:#x} of '{}'", path.display()),
                e,
            )
        })?;
        Ok(b)
    };
    let mut l1 = parse_table(&read(h.l1_table_offset)?);
    let nclusters = fsize / (cs - 1);
    let mut used = vec![0u64; nclusters.div_ceil(64) as usize + 1];
    let mut r = CheckReport::default();
    let mut set_used = |o: u64, n: u64, r: &mut CheckReport| -> bool {
        let mut bad = 0;
        for c in o / cs..o / cs + n {
            if let Some(w) = used.get_mut((c / 64) as usize) {
                if *w & (1 << (c % 64)) != 0 {
                    bad += 1;
                }
                *w |= 1 << (c % 64);
            }
        }
        r.corruptions += bad;
        bad == 0
    };
    set_used(h.l1_table_offset, ts, &mut r);
    let (mut allocated, mut fragmented, mut fixed) = (0u64, 0u64, 0u64);
    let mut fixes = Vec::new();
    let mut l1_invalid = false;
    for e in l1.iter_mut() {
        let off = *e;
        if off == 0 {
            continue;
        }
        if !table_ok(off) {
            if fix {
                *e = 0;
                fixed += 1;
            } else {
                r.corruptions += 1;
            }
            l1_invalid = true;
            continue;
        }
        if !set_used(off, ts, &mut r) {
            continue;
        }
        let mut t = parse_table(&read(off)?);
        let mut invalid = false;
        let mut last = 0u64;
        for v in t.iter_mut() {
            let o = *v;
            if o == 0 || o == ZERO_CLUSTER {
                continue;
            }
            allocated += 1;
            // QEMU's unsigned arithmetic: an entry near 2^64 wraps, never panics.
            if last != 0 && last.wrapping_add(cs) != o {
                fragmented += 1;
            }
            last = o;
            if !cluster_ok(o) {
                if fix {
                    *v = 0;
                    fixed += 1;
                } else {
                    r.corruptions += 1;
                }
                invalid = true;
                continue;
            }
            set_used(o, 1, &mut r);
        }
        if invalid && fix {
            let mut b = vec![0u8; table_bytes];
            write_table(&t, &mut b);
            fixes.push((off, b));
        }
    }
    if l1_invalid && fix {
        let mut b = vec![0u8; table_bytes];
        write_table(&l1, &mut b);
        fixes.push((h.l1_table_offset, b));
    }
    r.leaks = (u64::from(h.header_size)..nclusters)
        .filter(|c| {
            used.get((c / 64) as usize)
                .is_some_and(|w| w & (1 << (c % 64)) == 0)
        })
        .count() as u64;
    r.corruptions_fixed = fixed;
    let some = |n: u64| (n != 0).then_some(n);
    r.total_clusters = some(h.image_size.div_ceil(cs));
    r.allocated_clusters = some(allocated);
    r.fragmented_clusters = some(fragmented);
    Ok(Scan { report: r, fixes })
}

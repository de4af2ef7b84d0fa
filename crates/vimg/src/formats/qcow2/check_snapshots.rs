//! The snapshot table as `qemu-img check` reads it (QEMU's check mode of its snapshot
//! table reader): the limits an ordinary open refuses with (more than 65536 entries, an
//! entry with more than 1024 bytes of extra data, a table of more than 64 MiB) are the
//! check's findings, with QEMU's lines and hints, and `check -r all` repairs two of them
//! as QEMU does:
//!
//! - too many entries, or a table too big: the entries past the limit are dropped by
//!   lowering the header's snapshot count ("Discarding N overhanging snapshots"); what they
//!   held becomes leaked clusters, which the refcount repair then frees;
//! - too much extra data: left to the table rewrite of `check -r all`, which keeps 1024
//!   bytes (update/snapshot_table.rs). vimg does not do this one yet; such an image is
//!   reported, not repaired.
//!
//! The scan reads only the fixed part of each entry, one entry at a time: nothing it
//! allocates depends on the image's numbers, and an entry past the end of the file is an
//! error (QEMU reads zeros there; vimg does not make up entries).

use std::path::Path;
use std::sync::Arc;

use super::header::*;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// A snapshot ID or name as QEMU reads it: a C string, so it ends at its first NUL byte
/// (an entry of 65535 zero bytes names the empty string).
pub(crate) fn snapshot_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Offset of the header's snapshot count (followed by the table's offset).
pub(crate) const NB_SNAPSHOTS_AT: u64 = 60;

/// What the scan found.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// The "Discarding ..." lines of a repair, in QEMU's order.
    pub lines: Vec<String>,
    /// Entries dropped off the end of the table.
    pub reduced: u64,
    /// Entries whose extra data is too long.
    pub dropped: u64,
    /// The snapshot count after the repair.
    pub count: u32,
    /// Where the last entry kept ends in the file (QEMU reads any part of it past the end
    /// of the file as zeros).
    pub end: u64,
}

/// A check that cannot go on: the lines QEMU prints (its "ERROR" line and hint).
#[derive(Debug)]
pub(crate) struct Failed(pub Vec<String>);

fn read_at(storage: &dyn Storage, buf: &mut [u8], at: u64, what: &str) -> Result<()> {
    let end = at.checked_add(buf.len() as u64);
    if end.is_none_or(|e| e > storage.len()) {
        return Err(Error::corrupt(format!(
            "{what} at {at:#x} runs past the end of the file ({} bytes)",
            storage.len()
        )));
    }
    storage
        .read_exact_at(buf, at)
        .map_err(|e| Error::io(format_args!("read {what} at {at:#x}"), e))
}

/// Reads the table as QEMU's check does; `repair` is `check -r all`.
pub(crate) fn scan(
    storage: &dyn Storage,
    repair: bool,
) -> Result<std::result::Result<Scan, Failed>> {
    let mut head = vec![0u8; storage.len().min(4096) as usize];
    read_at(storage, &mut head, 0, "qcow2 header")?;
    let h = Header::parse(&head)?;
    let mut out = Scan::default();
    let mut n = u64::from(h.nb_snapshots);
    if n > MAX_SNAPSHOTS && repair {
        out.lines.push(format!(
            "Discarding {} overhanging snapshots",
            n - MAX_SNAPSHOTS
        ));
        out.reduced += n - MAX_SNAPSHOTS;
        n = MAX_SNAPSHOTS;
    }
    if n > MAX_SNAPSHOTS {
        return Ok(Err(Failed(vec![
            "ERROR snapshot table too large".into(),
            format!(
                "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                n - MAX_SNAPSHOTS
            ),
        ])));
    }
    let start = h.snapshots_offset;
    let cs = h.cluster_size();
    if !start.is_multiple_of(cs) || (i64::MAX as u64) - n * (SNAPSHOT_HEADER_LEN as u64) < start {
        return Ok(Err(Failed(vec![
            "ERROR snapshot table offset invalid".into()
        ])));
    }
    let read_fail = |why: String, hint: String| {
        Ok(Err(Failed(vec![
            format!("ERROR failed to read the snapshot table: {why}"),
            hint,
        ])))
    };
    // `offset`: where the next entry starts on disk; `length`: the table's length with
    // extra data cut to the limit (what QEMU holds to 64 MiB).
    let mut offset = start;
    let mut length = 0u64;
    let mut kept = n;
    for i in 0..n {
        length = length.div_ceil(8) * 8;
        offset = offset.div_ceil(8) * 8;
        let mut raw = [0u8; SNAPSHOT_HEADER_LEN];
        read_at(
            storage,
            &mut raw,
            offset,
            &format!("snapshot table entry {i}"),
        )?;
        let sh = SnapshotHeader::parse(&raw)?;
        let mut extra = u64::from(sh.extra_data_size);
        if extra > MAX_SNAPSHOT_EXTRA {
            if !repair {
                return read_fail(
                    format!("Too much extra metadata in snapshot table entry {i}"),
                    "You can force-remove this extra metadata with qemu-img check -r all".into(),
                );
            }
            out.lines.push(format!(
                "Discarding too much extra metadata in snapshot table entry {i} ({extra} > {MAX_SNAPSHOT_EXTRA})"
            ));
            out.dropped += 1;
            extra = MAX_SNAPSHOT_EXTRA;
        }
        let names = u64::from(sh.id_str_size) + u64::from(sh.name_size);
        let on_disk = SNAPSHOT_HEADER_LEN as u64 + u64::from(sh.extra_data_size) + names;
        length += SNAPSHOT_HEADER_LEN as u64 + extra + names;
        if length > MAX_SNAPSHOTS_BYTES || (offset + on_disk) - start > i32::MAX as u64 {
            if !repair {
                return read_fail(
                    "Snapshot table is too big".into(),
                    format!(
                        "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                        n - i
                    ),
                );
            }
            out.lines.push(format!(
                "Discarding {} overhanging snapshots (snapshot table is too big)",
                n - i
            ));
            out.reduced += n - i;
            kept = i;
            break;
        }
        offset += on_disk;
        out.end = offset;
    }
    // `kept` <= MAX_SNAPSHOTS, which fits in the header's 32 bits.
    out.count = kept as u32;
    Ok(Ok(out))
}

/// For `check` of a qcow2 image that did not open: the lines QEMU's check prints when it
/// cannot read the snapshot table (then "Check failed: File too large"), or `None` when
/// the table is not why.
pub fn check_failure(path: &Path) -> Option<Vec<String>> {
    let s = crate::storage::FileStorage::open(path).ok()?;
    let padded = crate::storage::SectorPadded::new(Arc::new(s));
    match scan(&padded, false) {
        Ok(Err(Failed(lines))) => Some(lines),
        _ => None,
    }
}

/// The file with the header's snapshot count replaced: what the reader sees of an image
/// whose count a repair is about to lower, so that the image is known to open before the
/// count is written.
#[derive(Debug)]
pub(crate) struct CountPatched {
    pub inner: Arc<dyn Storage>,
    pub count: u32,
}

impl Storage for CountPatched {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let n = self.inner.read_at(buf, offset)?;
        let field = self.count.to_be_bytes();
        for (i, b) in field.iter().enumerate() {
            let at = NB_SNAPSHOTS_AT + i as u64;
            if at >= offset && at < offset + n as u64 {
                buf[(at - offset) as usize] = *b;
            }
        }
        Ok(n)
    }

    fn next_data(&self, offset: u64) -> std::io::Result<Option<(u64, u64)>> {
        self.inner.next_data(offset)
    }

    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }

    fn disk_usage(&self) -> Option<u64> {
        self.inner.disk_usage()
    }
}

//! The snapshot table rewritten with every entry in the layout QEMU writes (spec:
//! "Snapshots"; a version-3 entry carries at least the 64-bit VM state size and the disk
//! size in its extra data).
//!
//! QEMU writes all the extra data it knows whenever it writes the table: 24 bytes
//! (64-bit VM state size, virtual disk size, icount), then the extra data it does not know,
//! kept as it was. An entry of a version-2 image may have less: the VM state size then
//! comes from the entry's 32-bit field, the disk size is the image's virtual size, and the
//! icount is "not recorded" (all ones). Three operations write such a table:
//!
//! - `amend -o compat=1.1` of a version-2 image any of whose entries lacks the disk size
//!   (QEMU writes the table, then the header with the new version);
//! - `check -r all` of a version-3 image with such entries ("Repairing snapshot table
//!   entry N is incomplete");
//! - `snapshot -c` and `-d` (the shadow switch writes the normalised table).
//!
//! In place, the table goes where QEMU puts it (the first run of free clusters): the
//! clusters are allocated (refcounts raised and flushed), the table is written and
//! flushed, one write inside the header's first sector points at it (the count and the
//! offset are adjacent fields), and only then is the old table freed. A crash leaves the
//! old table or the new one, with at worst the other one's clusters leaked.

use super::*;

/// Bytes of extra data QEMU knows and always writes.
const KNOWN_EXTRA: usize = 24;

/// Extra data a version-3 entry must have (64-bit VM state size and disk size).
const V3_MIN_EXTRA: u32 = 16;

/// One entry (`raw`, as stored from its first byte; at least its own length) rewritten
/// with QEMU's 24 bytes of known extra data; `disk_size` is the image's virtual size, for
/// an entry that does not record its own. The result is padded to 8 bytes.
pub(super) fn normalized_entry(raw: &[u8], disk_size: u64) -> Result<Vec<u8>> {
    let h = SnapshotHeader::parse(raw)?;
    let x = SNAPSHOT_HEADER_LEN;
    let extra_len = h.extra_data_size as usize;
    let names_len = usize::from(h.id_str_size) + usize::from(h.name_size);
    let Some(extra) = raw.get(x..x + extra_len) else {
        return Err(Error::corrupt(
            "snapshot table entry shorter than its extra data",
        ));
    };
    let Some(names) = raw.get(x + extra_len..x + extra_len + names_len) else {
        return Err(Error::corrupt(
            "snapshot table entry shorter than its names",
        ));
    };
    let word = |i: usize| {
        extra
            .get(i..i + 8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let vm_state = word(0).unwrap_or(u64::from(h.vm_state_size));
    let disk = word(8).unwrap_or(disk_size);
    let icount = word(16).unwrap_or(u64::MAX);
    let unknown = extra.get(KNOWN_EXTRA..).unwrap_or(&[]);
    let new_extra = KNOWN_EXTRA + unknown.len();
    let mut out = vec![0u8; x + new_extra + names_len];
    SnapshotHeader {
        // Too large for 32 bits: older readers see a disk-only snapshot (QEMU's rule).
        vm_state_size: u32::try_from(vm_state).unwrap_or(0),
        extra_data_size: new_extra as u32,
        ..h
    }
    .write_to(&mut out);
    out[x..x + 8].copy_from_slice(&vm_state.to_be_bytes());
    out[x + 8..x + 16].copy_from_slice(&disk.to_be_bytes());
    out[x + 16..x + 24].copy_from_slice(&icount.to_be_bytes());
    out[x + KNOWN_EXTRA..x + new_extra].copy_from_slice(unknown);
    out[x + new_extra..].copy_from_slice(names);
    out.resize(out.len().div_ceil(8) * 8, 0);
    Ok(out)
}

/// Whether an entry (its fixed part) lacks what version 3 requires.
fn incomplete(raw: &[u8]) -> bool {
    SnapshotHeader::parse(raw).is_ok_and(|h| h.extra_data_size < V3_MIN_EXTRA)
}

impl Qcow2Update {
    /// The snapshot table with every entry as QEMU writes it.
    pub(super) fn normalized_snapshot_table(&self) -> Result<Vec<u8>> {
        let size = self.header.size;
        let mut out = Vec::new();
        for raw in self.snapshot_entries_raw()? {
            out.extend(normalized_entry(&raw, size)?);
        }
        Ok(out)
    }

    /// Indexes of the entries without the 16 bytes of extra data version 3 requires.
    fn incomplete_entries(&self) -> Result<Vec<usize>> {
        Ok(self
            .snapshot_entries_raw()?
            .iter()
            .enumerate()
            .filter(|(_, raw)| incomplete(raw))
            .map(|(i, _)| i)
            .collect())
    }

    /// `amend -o compat=1.1` of a version-2 image: when an entry lacks the disk size, the
    /// table is rewritten first (still version 2, valid either way), as QEMU does. The
    /// caller then writes the header with the new version.
    pub(super) fn upgrade_snapshot_table(&mut self) -> Result<()> {
        if self.nb_snapshots == 0 || self.incomplete_entries()?.is_empty() {
            return Ok(());
        }
        let table = self.normalized_snapshot_table()?;
        self.replace_snapshot_table(&table)
    }

    /// `check -r all`: incomplete entries (of a version-3 image) are completed, and
    /// entries with too much extra data (update/snapshot_repair.rs) keep 1024 bytes of it,
    /// by rewriting the table; the first check's lines about incomplete entries become
    /// "Repairing" lines. Returns the number of entries fixed.
    pub(super) fn repair_snapshot_table(&mut self, before: &mut CheckReport) -> Result<u64> {
        let cut = self.snapshots_cut();
        if self.nb_snapshots == 0 || self.has_data_file {
            return Ok(0);
        }
        let bad = if self.header.version >= 3 {
            self.incomplete_entries()?
        } else {
            Vec::new()
        };
        if bad.is_empty() && cut == 0 {
            return Ok(0);
        }
        let table = self.normalized_snapshot_table()?;
        self.replace_snapshot_table(&table)?;
        for &i in &bad {
            let err = crate::formats::qcow2::check::snapshot_incomplete_message(i);
            for m in before.messages.iter_mut().filter(|m| **m == err) {
                *m = format!("Repairing{}", &err["ERROR".len()..]);
            }
        }
        Ok(bad.len() as u64 + cut)
    }

    /// Writes `table` (the whole snapshot table, same number of entries) into freshly
    /// allocated clusters and points the header at it; then frees the old table.
    fn replace_snapshot_table(&mut self, table: &[u8]) -> Result<()> {
        let cs = self.cs();
        let old_off = self.header.snapshots_offset;
        let old_len = self.snapshot_table_len()?;
        let n = (table.len() as u64).div_ceil(cs).max(1);
        let first = self.alloc(n)?;
        let off = first << self.cb();
        self.pwrite(table, off)?;
        self.sync()?;
        // nb_snapshots (60..64) and snapshots_offset (64..72): one write, one sector.
        let mut f = [0u8; 12];
        f[..4].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        f[4..].copy_from_slice(&off.to_be_bytes());
        self.pwrite(&f, 60)?;
        self.sync()?;
        self.header.snapshots_offset = off;
        if old_len > 0 {
            let c0 = old_off >> self.cb();
            let c1 = (old_off + old_len).div_ceil(cs);
            self.free(c0, c1 - c0)?;
            self.sync()?;
        }
        Ok(())
    }
}

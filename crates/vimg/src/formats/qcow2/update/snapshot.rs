//! Internal snapshots changed in place: `snapshot -c`, `-d` and `-a` (spec: "Snapshots",
//! "Cluster mapping" on `QCOW_OFLAG_COPIED`, "Host cluster management").
//!
//! Create, delete and apply are each one shadow switch (`shadow.rs`): copies of the L2
//! tables the new active L1 table names (the active ones for create and delete, shared by
//! the new snapshot for create; the snapshot's for apply), that L1 table, the new
//! snapshot's L1 table, the snapshot table and a complete new refcount structure go into
//! fresh clusters, with the copied flags as the new counts want them; one header write
//! switches them all (and the virtual size, for apply). A crash leaves the old image or the
//! new one, never a mix: no copied-flag window (QEMU has one), no leaks. A refcount that
//! would overflow (`refcount_bits` too small) is refused from the exact final counts
//! before the switch, and the unreferenced tail is cut off again.
//!
//! Create and delete then take QEMU's layout of the same state in a second switch
//! (`snapshot_place.rs`): the L1 copy and the table in the clusters QEMU's allocator
//! picks, the tables and refcounts back in their places with QEMU's values.

use super::*;
use crate::formats::qcow2::check_snapshots::snapshot_string;

/// A snapshot table entry: its bytes as stored (padded to 8) and the fields vimg uses.
#[derive(Clone, Debug)]
struct Entry {
    raw: Vec<u8>,
    id: String,
    name: String,
    l1_offset: u64,
    l1_size: u32,
    disk_size: Option<u64>,
    /// Bytes of the entry in the file, without padding (more than `raw` holds when a
    /// repair cuts its extra data).
    stored: u64,
}

/// What `snapshot -a`/`-d` could not find (the CLI words it as qemu-img does).
pub const SNAPSHOT_NOT_FOUND: &str = "snapshot not found";

impl Qcow2Update {
    fn refuse_snapshots(&self) -> Result<()> {
        if self.has_data_file {
            return Err(Qcow2Error::Unsupported(
                "internal snapshots are not allowed with an external data file".into(),
            )
            .into());
        }
        self.require_consistent()
    }

    /// The snapshot table as stored.
    fn read_snapshot_table(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut at = self.header.snapshots_offset;
        for _ in 0..self.nb_snapshots {
            let mut sh = vec![0u8; SNAPSHOT_HEADER_LEN];
            self.pread(&mut sh, at)?;
            let mut h = SnapshotHeader::parse(&sh)?;
            // What the file holds of this entry (without its padding).
            let stored = SNAPSHOT_HEADER_LEN as u64
                + u64::from(h.extra_data_size)
                + u64::from(h.id_str_size)
                + u64::from(h.name_size);
            let cut = u64::from(h.extra_data_size).saturating_sub(MAX_SNAPSHOT_EXTRA);
            if cut > 0 && self.snapshots_cut() == 0 {
                return Err(Error::corrupt(format!(
                    "snapshot table entry at {at:#x}: {} bytes of extra data",
                    h.extra_data_size
                )));
            }
            let raw = if cut == 0 {
                let mut raw = vec![0u8; h.entry_len() as usize];
                self.pread(&mut raw, at)?;
                raw
            } else {
                // `check -r all`: the first 1024 bytes of the extra data, as QEMU keeps.
                let keep = SNAPSHOT_HEADER_LEN + MAX_SNAPSHOT_EXTRA as usize;
                let names = usize::from(h.id_str_size) + usize::from(h.name_size);
                let mut raw = vec![0u8; keep + names];
                self.pread(&mut raw[..keep], at)?;
                self.pread(&mut raw[keep..], at + keep as u64 + cut)?;
                h.extra_data_size = MAX_SNAPSHOT_EXTRA as u32;
                h.write_to(&mut raw);
                raw.resize(h.entry_len() as usize, 0);
                raw
            };
            let x = SNAPSHOT_HEADER_LEN + h.extra_data_size as usize;
            let extra = SnapshotExtra::parse(&raw[SNAPSHOT_HEADER_LEN..x]);
            let id_end = x + usize::from(h.id_str_size);
            let name_end = id_end + usize::from(h.name_size);
            out.push(Entry {
                id: snapshot_string(&raw[x..id_end]),
                name: snapshot_string(&raw[id_end..name_end]),
                l1_offset: h.l1_table_offset,
                l1_size: h.l1_size,
                disk_size: extra.disk_size,
                raw,
                stored,
            });
            at += stored.div_ceil(8) * 8;
        }
        Ok(out)
    }

    /// qemu-img's rule for a downgrade to version 2: every internal snapshot has the
    /// image's current virtual size (version 2 cannot say otherwise; an entry without the
    /// size field has it).
    pub(super) fn refuse_snapshot_downgrade(&self) -> Result<()> {
        let size = self.header.size;
        if self
            .read_snapshot_table()?
            .iter()
            .any(|e| e.disk_size.is_some_and(|d| d != size))
        {
            return Err(Error::unsupported(
                "Internal snapshots prevent downgrade of image",
            ));
        }
        Ok(())
    }

    /// The snapshot table's bytes as stored (each entry padded to 8), for a switch that
    /// keeps it.
    pub(super) fn raw_snapshot_table(&self) -> Result<Vec<u8>> {
        Ok(self
            .read_snapshot_table()?
            .into_iter()
            .flat_map(|e| e.raw)
            .collect())
    }

    /// Every entry's bytes as stored (each padded to 8), in the table's order.
    pub(super) fn snapshot_entries_raw(&self) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .read_snapshot_table()?
            .into_iter()
            .map(|e| e.raw)
            .collect())
    }

    /// Bytes of the table as stored, without the last entry's padding (what QEMU counts
    /// and frees).
    pub(super) fn snapshot_table_len(&self) -> Result<u64> {
        let mut len = 0u64;
        let mut end = 0u64;
        for e in self.read_snapshot_table()? {
            end = len + e.stored;
            len += e.stored.div_ceil(8) * 8;
        }
        Ok(end)
    }

    /// Every snapshot's L1 table (its entries), in the snapshot table's order.
    pub(super) fn snapshot_l1_tables(&self) -> Result<Vec<Vec<u64>>> {
        self.read_snapshot_table()?
            .iter()
            .map(|e| self.read_l1_at(e.l1_offset, e.l1_size))
            .collect()
    }

    /// Every snapshot's L1 table offset, in the snapshot table's order.
    pub(super) fn snapshot_l1_offsets(&self) -> Result<Vec<u64>> {
        Ok(self
            .read_snapshot_table()?
            .iter()
            .map(|e| e.l1_offset)
            .collect())
    }

    /// [`Self::raw_snapshot_table`] with the snapshots' L1 table offsets replaced by
    /// `l1_offsets` (one per snapshot, in order; the field is the entry's first 8 bytes).
    pub(super) fn raw_snapshot_table_moved(&self, l1_offsets: &[u64]) -> Result<Vec<u8>> {
        let entries = self.read_snapshot_table()?;
        if entries.len() != l1_offsets.len() {
            return Err(Error::invalid_argument(
                "one L1 table offset per snapshot is needed",
            ));
        }
        let mut out = Vec::new();
        for (mut e, off) in entries.into_iter().zip(l1_offsets) {
            e.raw[..8].copy_from_slice(&off.to_be_bytes());
            out.extend_from_slice(&e.raw);
        }
        Ok(out)
    }

    /// Reads an L1 table of `n` entries at `off`.
    fn read_l1_at(&self, off: u64, n: u32) -> Result<Vec<u64>> {
        let bytes = u64::from(n) * 8;
        if bytes > MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "snapshot L1 table at {off:#x} has {n} entries, too many"
            )));
        }
        let mut raw = vec![0u8; bytes as usize];
        self.pread(&mut raw, off)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    pub(super) fn read_cluster(&self, off: u64) -> Result<Vec<u8>> {
        let mut raw = vec![0u8; self.cs() as usize];
        self.pread(&mut raw, off)?;
        Ok(raw)
    }

    pub(super) fn l2_width(&self) -> usize {
        if self.g.extended_l2 {
            16
        } else {
            8
        }
    }

    /// `snapshot -c NAME`: a disk-only snapshot of the active state, as `qemu-img snapshot
    /// -c` takes it (the next free numeric ID, the given time, no VM state; the name is cut
    /// to 255 bytes as qemu-img cuts it). Names need not be unique (qemu-img allows that).
    pub fn snapshot_create(&mut self, name: &str, date_sec: u32, date_nsec: u32) -> Result<()> {
        self.refuse_snapshots()?;
        let mut entries = self.read_snapshot_table()?;
        if entries.len() as u64 >= MAX_SNAPSHOTS {
            return Err(Error::unsupported("the image already has 65536 snapshots"));
        }
        let next = entries
            .iter()
            .map(|e| leading_number(&e.id))
            .max()
            .unwrap_or(0)
            + 1;
        let id = next.to_string();
        let mut name = name.as_bytes().to_vec();
        name.truncate(255);
        let extra_len = 24usize;
        let sh_header = SnapshotHeader {
            l1_table_offset: 0,
            l1_size: self.l1.len() as u32,
            id_str_size: id.len() as u16,
            name_size: name.len() as u16,
            date_sec,
            date_nsec,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra_data_size: extra_len as u32,
        };
        let l1 = self.l1.clone();
        // An overflow (refcount_bits=1, say) is refused by the shadow switch, from the
        // exact final counts, before the header changes; the tail written is cut off.
        let size = self.header.size;
        // QEMU's places for the L1 copy and the table (`snapshot_place.rs`): the table is
        // every entry padded to 8 bytes but the last.
        let table_len = normalized_table(&entries, size)?.len() as u64
            + (SNAPSHOT_HEADER_LEN + extra_len + id.len() + name.len()) as u64;
        let plan = self.plan_snapshot_placement(true, table_len, &[])?;
        self.shadow(|s, sh| {
            if let Some(p) = &plan {
                // The first step's tail goes past QEMU's clusters (they stay free in it).
                sh.next = sh.next.max(s.placement_end(p));
            }
            // Copies of the active L2 tables, which the snapshot and the active image then
            // share; the snapshot's own L1 table points at them too.
            let (new_l1, l2s) = s.shadow_copy_l2s(sh, &l1)?;
            let snl1: Vec<u8> = new_l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            let l1_off = s.shadow_write(sh, &snl1)?;
            let mut raw = vec![0u8; SNAPSHOT_HEADER_LEN + extra_len + id.len() + name.len()];
            SnapshotHeader {
                l1_table_offset: l1_off,
                ..sh_header
            }
            .write_to(&mut raw);
            let x = SNAPSHOT_HEADER_LEN;
            // vm_state_size_large 0, disk_size, icount 0 (as qemu-img writes them).
            raw[x + 8..x + 16].copy_from_slice(&size.to_be_bytes());
            raw[x + extra_len..x + extra_len + id.len()].copy_from_slice(id.as_bytes());
            raw[x + extra_len + id.len()..].copy_from_slice(&name);
            let stored = raw.len() as u64;
            raw.resize(raw.len().div_ceil(8) * 8, 0);
            entries.push(Entry {
                raw,
                stored,
                id: id.clone(),
                name: String::from_utf8_lossy(&name).into_owned(),
                l1_offset: l1_off,
                l1_size: l1.len() as u32,
                disk_size: Some(size),
            });
            // Every entry as QEMU writes the table (`snapshot_table.rs`).
            let table = normalized_table(&entries, size)?;
            s.shadow_commit(sh, new_l1, &l2s, &table, entries.len() as u32, size)
        })?;
        match plan {
            Some(p) => self.place_snapshot_as_qemu(p),
            None => Ok(()),
        }
    }

    /// `snapshot -d NAME`: deletes the first snapshot with that name (qemu-img looks
    /// names up, not IDs, for `-d`). Errors with [`SNAPSHOT_NOT_FOUND`] when there is none.
    pub fn snapshot_delete(&mut self, name: &str) -> Result<()> {
        self.refuse_snapshots()?;
        let mut entries = self.read_snapshot_table()?;
        let Some(i) = entries.iter().position(|e| e.name == name) else {
            return Err(Error::invalid_argument(SNAPSHOT_NOT_FOUND));
        };
        let gone = entries.remove(i);
        let active = self.l1.clone();
        let size = self.header.size;
        // QEMU's place for the table (`snapshot_place.rs`); it walks the deleted
        // snapshot's tables too.
        let table = normalized_table(&entries, size)?;
        let table_len = match entries.last() {
            Some(e) => {
                let last = super::snapshot_table::normalized_entry(&e.raw, size)?;
                let h = SnapshotHeader::parse(&last)?;
                let pad = h.entry_len()
                    - (SNAPSHOT_HEADER_LEN as u64
                        + u64::from(h.extra_data_size)
                        + u64::from(h.id_str_size)
                        + u64::from(h.name_size));
                table.len() as u64 - pad
            }
            None => 0,
        };
        let gone_l1 = self.read_l1_at(gone.l1_offset, gone.l1_size)?;
        let plan = self.plan_snapshot_placement(false, table_len, &[gone_l1])?;
        self.shadow(|s, sh| {
            if let Some(p) = &plan {
                sh.next = sh.next.max(s.placement_end(p));
            }
            // Fresh copies of the active L2 tables, whose copied flags then follow the
            // counts without the snapshot.
            let (new_l1, l2s) = s.shadow_copy_l2s(sh, &active)?;
            s.shadow_commit(sh, new_l1, &l2s, &table, entries.len() as u32, size)
        })?;
        match plan {
            Some(p) => self.place_snapshot_as_qemu(p),
            None => Ok(()),
        }
    }

    /// `snapshot -a ID_OR_NAME`: makes the snapshot's state the active one (the ID is
    /// looked up first, then the name, as qemu-img does). The image takes the snapshot's
    /// virtual size, as with qemu-img. Errors with
    /// [`SNAPSHOT_NOT_FOUND`] when there is none.
    pub fn snapshot_apply(&mut self, id_or_name: &str) -> Result<()> {
        self.refuse_snapshots()?;
        let entries = self.read_snapshot_table()?;
        let Some(sn) = entries
            .iter()
            .find(|e| e.id == id_or_name)
            .or_else(|| entries.iter().find(|e| e.name == id_or_name))
            .cloned()
        else {
            return Err(Error::invalid_argument(SNAPSHOT_NOT_FOUND));
        };
        // qemu-img gives the image the snapshot's size back (the image grew or shrank
        // after the snapshot was taken). vimg does that in the header write that switches
        // the L1 table; what qemu-img cannot resize (v2 with snapshots, persistent
        // bitmaps) is refused.
        let size = sn.disk_size.unwrap_or(self.header.size);
        if size != self.header.size {
            let why = if self.header.version < 3 {
                Some("Can't resize a v2 image which has snapshots")
            } else if self.has_bitmaps {
                Some("Cannot resize qcow2 with persistent bitmaps")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(Error::unsupported(format!(
                    "the snapshot's virtual size ({size} bytes) differs from the image's ({} bytes): {why}",
                    self.header.size
                )));
            }
        }
        let snl1 = self.read_l1_at(sn.l1_offset, sn.l1_size)?;
        // The new active L1 table is at least as long as the old one.
        if size > limits::MAX_VIRTUAL_SIZE
            || self.g.l1_entries_for(size).saturating_mul(8) > MAX_L1_BYTES
        {
            return Err(Error::unsupported(format!(
                "the snapshot's virtual size ({size} bytes) is past vimg's limit"
            )));
        }
        let n_entries = snl1
            .len()
            .max(self.l1.len())
            .max(self.g.l1_entries_for(size) as usize);
        let table: Vec<u8> = entries.iter().flat_map(|e| e.raw.clone()).collect();
        self.shadow(|s, sh| {
            // Fresh copies of the snapshot's L2 tables for the active image (the data is
            // shared; the copied flags follow the counts), then the one switch.
            let (mut new_l1, l2s) = s.shadow_copy_l2s(sh, &snl1)?;
            new_l1.resize(n_entries, 0);
            s.shadow_commit(sh, new_l1, &l2s, &table, entries.len() as u32, size)
        })
    }
}

/// The entries as one table, each as QEMU writes it (`disk_size`: the image's virtual
/// size, for entries without their own).
fn normalized_table(entries: &[Entry], disk_size: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for e in entries {
        out.extend(super::snapshot_table::normalized_entry(&e.raw, disk_size)?);
    }
    Ok(out)
}

/// The number an ID starts with (`strtoul` as QEMU reads IDs: 0 when none).
fn leading_number(id: &str) -> u64 {
    let digits: String = id
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::leading_number;

    #[test]
    fn ids_read_as_strtoul_reads_them() {
        assert_eq!(leading_number("7"), 7);
        assert_eq!(leading_number("12abc"), 12);
        assert_eq!(leading_number("  3"), 3);
        assert_eq!(leading_number("abc"), 0);
        assert_eq!(leading_number(""), 0);
    }
}

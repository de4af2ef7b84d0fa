//! `check -r all` of a snapshot table past QEMU's limits (qcow2/check_snapshots.rs reads
//! it): the entries past the limits are dropped by lowering the header's snapshot count,
//! one 4-byte write inside the header's first sector, flushed, before anything else is
//! written. The dropped entries' table bytes and L1/L2 tables become leaked clusters,
//! which the refcount repair frees; a crash between the two leaves those leaks, nothing
//! worse.
//!
//! The count is written only once the image is known to open with it: the reader first
//! opens the file as it will be (the count patched in), so an image vimg would refuse
//! for another reason is refused before anything is written.

use super::super::check_snapshots::{scan, CountPatched, Failed, Scan, NB_SNAPSHOTS_AT};
use super::*;

impl Qcow2Update {
    /// The storage the reader is to open (the count patched in, when a repair lowers it),
    /// and what the scan found. Without `repair`, `storage` as it is.
    pub(super) fn prepare_snapshot_repair(
        storage: Arc<dyn Storage>,
        repair: bool,
    ) -> Result<(Arc<dyn Storage>, Option<Scan>)> {
        if !repair {
            return Ok((storage, None));
        }
        let padded = crate::storage::SectorPadded::new(storage.clone());
        let found = match scan(&padded, true)? {
            Ok(s) => s,
            Err(Failed(lines)) => {
                return Err(Qcow2Error::SnapshotTable(lines.join("\n")).into());
            }
        };
        if found.reduced == 0 {
            let any = found.dropped > 0;
            return Ok((storage, any.then_some(found)));
        }
        let patched: Arc<dyn Storage> = Arc::new(CountPatched {
            inner: storage,
            count: found.count,
        });
        Ok((patched, Some(found)))
    }

    /// Entries whose extra data `check -r all` cuts to 1024 bytes (the table rewrite of
    /// update/snapshot_table.rs does it).
    pub(super) fn snapshots_cut(&self) -> u64 {
        self.snapshot_scan.as_ref().map_or(0, |s| s.dropped)
    }

    /// Writes the lowered snapshot count the scan decided on (the reader already opened
    /// the image with it), and keeps what the scan found for the repair.
    pub(super) fn apply_snapshot_scan(&mut self, scan: Option<Scan>) -> Result<()> {
        let Some(scan) = scan else {
            return Ok(());
        };
        if scan.reduced > 0 {
            self.pwrite(&scan.count.to_be_bytes(), NB_SNAPSHOTS_AT)?;
            self.sync()?;
            self.nb_snapshots = scan.count;
            self.header.nb_snapshots = scan.count;
        }
        self.snapshot_scan = Some(scan);
        Ok(())
    }

    /// The scan's lines go first (QEMU prints them before the refcount check), and the
    /// dropped entries count as fixed corruptions.
    pub(super) fn report_snapshot_scan(&mut self, out: &mut RepairReport) {
        let Some(scan) = &self.snapshot_scan else {
            return;
        };
        let mut lines = scan.lines.clone();
        lines.append(&mut out.before.messages);
        out.before.messages = lines;
        out.corruptions_fixed += scan.reduced;
    }
}

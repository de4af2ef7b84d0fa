//! blkdebug on the write side: rules the user put between a format and the file an
//! in-place command changes (`commit blkdebug:CONF:FILE`, `snapshot -d` through a
//! `json:`/`--image-opts` blkdebug node). The command binds the rules to the file (by
//! device and inode, as keys are bound in [`crate::secret`]); the qcow2 updater that opens
//! that file then passes its reads, writes and flushes through them and fires the events
//! of [`WRITE_EVENTS`] where QEMU's qcow2 driver fires them.
//!
//! Only the events the updater fires at QEMU's points are accepted: a rule waiting for
//! any other event would never become active, and the command would succeed where
//! qemu-img fails, so such rules are refused before anything is written. `none` is
//! refused too: its rules are active from the open on, and the updater's first reads (the
//! reader's check of every table) do not go through the layer; so is `align` (QEMU then
//! splits and aligns the requests the rules see).

use std::sync::{Arc, RwLock};

use super::{Blkdebug, BlkdebugName, Event};
use crate::error::{Error, Result};

/// The events the qcow2 updater fires, each where QEMU's driver fires it (block/qcow2*.c):
/// - `write_aio`: before guest data is written to its host cluster;
/// - `l2_alloc_write`: before a new L2 table is written;
/// - `l2_update`: before entries of an L2 table in use are written;
/// - `l1_update`: before an L1 entry (or, when emptying, the whole table) is written;
/// - `refblock_alloc`: before the refcounts of a refcount block are changed (QEMU fires it
///   each time it looks up the block for a refcount change);
/// - `cluster_free`: before the refcounts of clusters no longer used are lowered;
/// - `empty_image_prepare`, `reftable_update`: while emptying after `commit` (see
///   `formats/qcow2/update/make_empty.rs` for how vimg's order differs from QEMU's).
pub const WRITE_EVENTS: &[Event] = &[
    Event::WriteAio,
    Event::L2AllocWrite,
    Event::L2Update,
    Event::L1Update,
    Event::RefblockAlloc,
    Event::ClusterFree,
    Event::EmptyImagePrepare,
    Event::ReftableUpdate,
];

/// A file's (device, inode) and the rules bound to it.
type Binding = ((u64, u64), Arc<Blkdebug>);

static BOUND: RwLock<Vec<Binding>> = RwLock::new(Vec::new());

/// Binds the rules of `n` (a blkdebug layer between a format and its file) to that file,
/// for the updater that will change it. Rules on events the updater does not fire are
/// refused (see the module documentation); a file that cannot be read is left to the
/// open to report.
pub fn bind(n: &BlkdebugName) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dbg = Blkdebug::new(n.rules.clone(), n.align).map_err(|e| e.with_path(&n.shown))?;
    if let Some(ev) = dbg.events().find(|e| !WRITE_EVENTS.contains(e)) {
        return Err(Error::unsupported(format!(
            "vimg does not write through a blkdebug rule on event '{}' (it fires only {} when it changes an image)",
            ev.name(),
            WRITE_EVENTS
                .iter()
                .map(|e| e.name())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    // QEMU aligns (read-modify-writes) requests to `align`; vimg's updater writes as it
    // always does, so the rules would see other requests.
    if dbg.align() > 1 {
        return Err(Error::unsupported(
            "vimg does not write through a blkdebug layer with 'align'",
        ));
    }
    let Ok(m) = std::fs::metadata(&n.inner) else {
        return Ok(());
    };
    let key = (m.dev(), m.ino());
    let mut s = BOUND.write().unwrap_or_else(|e| e.into_inner());
    s.retain(|(k, _)| *k != key);
    s.push((key, Arc::new(dbg)));
    Ok(())
}

/// The rules bound to the file with this (device, inode).
pub(crate) fn bound(identity: (u64, u64)) -> Option<Arc<Blkdebug>> {
    BOUND
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(k, _)| *k == identity)
        .map(|(_, v)| v.clone())
}

/// Whether rules are bound to the file at `path`.
pub(crate) fn bound_to(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if BOUND.read().unwrap_or_else(|e| e.into_inner()).is_empty() {
        return false;
    }
    std::fs::metadata(path).is_ok_and(|m| bound((m.dev(), m.ino())).is_some())
}

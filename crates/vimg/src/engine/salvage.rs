//! `convert --salvage`: read errors of the source do not end the copy. As qemu-img does it:
//!
//! - a failed block-status query (the source's mapping) is asked again over a quarter of the
//!   range (rounded up to sectors) until it succeeds or covers one sector; a sector whose
//!   status cannot be had is warned about and read as data;
//! - a failed read of a chunk is done again sector by sector; each sector that cannot be
//!   read is warned about and written as zeros.
//!
//! Warnings of the copy come out in guest order (status before read at one offset), however
//! the workers happen to run: they are collected and given to the caller's callback when the
//! copy ends, successfully or not.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::image::Image;
use crate::mapping::{Extent, GuestOffset, MapKind};

/// Receives each salvage warning (`error while reading offset N: Input/output error`).
pub type WarnFn = Arc<dyn Fn(&str) + Send + Sync>;

const SECTOR: u64 = 512;

/// The warnings of one copy.
pub(super) struct Salvage {
    warn: WarnFn,
    /// Warnings are passed on at once (the planning pass, one thread) instead of collected.
    direct: AtomicBool,
    pending: Mutex<Vec<(u64, u8, String)>>,
}

impl Salvage {
    pub(super) fn new(warn: WarnFn) -> Salvage {
        Salvage {
            warn,
            direct: AtomicBool::new(true),
            pending: Mutex::new(Vec::new()),
        }
    }

    /// From now on warnings are collected until [`Salvage::flush`].
    pub(super) fn collect(&self) {
        self.direct.store(false, Ordering::SeqCst);
    }

    fn report(&self, offset: u64, order: u8, msg: String) {
        if self.direct.load(Ordering::SeqCst) {
            (self.warn)(&msg);
        } else if let Ok(mut p) = self.pending.lock() {
            p.push((offset, order, msg));
        }
    }

    /// Passes the collected warnings on, in guest order.
    pub(super) fn flush(&self) {
        let mut list = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return,
        };
        list.sort_by_key(|w| (w.0, w.1));
        for (_, _, m) in list {
            (self.warn)(&m);
        }
    }
}

/// Maps at `pos` (at most `max` bytes) through `map`, salvaging a failure: `Ok((extent,
/// layer, false))` as `map` answered, or `(one sector, 0, true)` when the sector's status
/// could not be had (it is then read as data).
pub(super) fn map(
    map: impl Fn(u64, u64) -> Result<(Extent, usize)>,
    pos: u64,
    max: u64,
    s: &Salvage,
) -> Result<(Extent, usize, bool)> {
    let mut sectors = max.div_ceil(SECTOR);
    loop {
        let len = sectors.saturating_mul(SECTOR).min(max);
        match map(pos, len) {
            Ok((e, layer)) => return Ok((e, layer, false)),
            Err(e) if sectors <= 1 => {
                s.report(
                    pos,
                    0,
                    format!(
                        "error while reading block status at offset {pos}: {}",
                        crate::blkdebug::error_text(&e)
                    ),
                );
                let e = Extent {
                    start: GuestOffset(pos),
                    len: SECTOR.min(max),
                    kind: MapKind::Unallocated,
                };
                return Ok((e, 0, true));
            }
            Err(_) => sectors = sectors.div_ceil(4),
        }
    }
}

/// Reads `buf.len()` guest bytes at `start`; a failure is retried sector by sector, and the
/// sectors that still fail are warned about and left as zeros.
pub(super) fn read(src: &Image, buf: &mut [u8], start: u64, s: &Salvage) -> Result<()> {
    if src.read_at(buf, start).is_ok() {
        return Ok(());
    }
    for (i, piece) in buf.chunks_mut(SECTOR as usize).enumerate() {
        let off = start + i as u64 * SECTOR;
        if let Err(e) = src.read_at(piece, off) {
            s.report(
                off,
                1,
                format!(
                    "error while reading offset {off}: {}",
                    crate::blkdebug::error_text(&e)
                ),
            );
            piece.fill(0);
        }
    }
    Ok(())
}

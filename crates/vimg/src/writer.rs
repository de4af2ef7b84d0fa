//! The write side of every format.
//!
//! A writer is created with a virtual size and options, takes guest data at guest offsets,
//! and on [`ImageWriter::finish`] writes its metadata and leaves a valid image. It states its
//! needs in [`WriterCaps`]: the unit the copy engine aligns writes to (and never sends when
//! all zero), and whether data must arrive in ascending order. A writer that compresses does
//! the CPU work in [`ImageWriter::encode`], which the engine calls from many threads, and
//! only places the encoded bytes in [`ImageWriter::write`].

use crate::error::Result;

/// What a writer needs from the copy engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterCaps {
    /// Writes start and end on multiples of this (except at the end of the disk), and a
    /// unit that is all zero is never sent. A power of two, at least 512.
    pub unit: u64,
    /// Data must arrive in ascending guest order, from one thread at a time.
    pub ordered: bool,
    /// [`ImageWriter::encode`] does work (compression) and should run in the workers.
    pub encodes: bool,
}

/// One unit as a writer encoded it: `Some(bytes)` to store encoded, `None` to store plain.
pub type EncodedUnit = Option<Vec<u8>>;

/// The write side of a format.
pub trait ImageWriter: Send + Sync {
    /// What this writer needs.
    fn caps(&self) -> WriterCaps;

    /// Encodes the units of `data` (guest bytes at `offset`, unit-aligned). Pure and
    /// thread-safe; called from worker threads when [`WriterCaps::encodes`] is set. Returns
    /// one entry per unit.
    fn encode(&self, offset: u64, data: &[u8]) -> Result<Vec<EncodedUnit>> {
        let _ = (offset, data);
        Ok(Vec::new())
    }

    /// Stores `data` at guest `offset`, using `encoded` (from [`ImageWriter::encode`], or
    /// empty) where the writer encodes. Called concurrently unless the writer is ordered.
    fn write(&self, offset: u64, data: &[u8], encoded: &[EncodedUnit]) -> Result<()>;

    /// Reserves the target's space for data about to be written at `[offset, offset +
    /// len)` (unit-aligned, not all zero). The engine calls this in ascending guest order,
    /// one call at a time, before the matching [`ImageWriter::write`]; so a writer that
    /// places data where it is first allocated gets the same layout whatever the thread
    /// count and timing (the same bytes on every run). Returns `true` when the writer has
    /// nothing order-dependent left to do in `write` (which may then run in parallel, in
    /// any order), `false` when the engine must call `write` in guest order itself (the
    /// default: safe for every writer).
    fn allocate(&self, offset: u64, len: u64) -> Result<bool> {
        let _ = (offset, len);
        Ok(false)
    }

    /// Whether the new image reads as zeros where nothing is written (QEMU's
    /// `has_zero_init`). When it does not (a preallocated encrypted qcow2), `convert`
    /// writes every zero range of the source with [`ImageWriter::write_zeroes`] too.
    fn starts_zero(&self) -> bool {
        true
    }

    /// Makes `[offset, offset + len)` read as zeros. Only needed when the target did not
    /// start out zero (`convert -n`) or when zeros must hide a backing image (`convert -B`);
    /// the default writes zero-filled data.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let unit = self.caps().unit.max(512);
        let chunk = (1u64 << 20).max(unit) as usize;
        let zeros = vec![0u8; chunk];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(chunk as u64) as usize;
            let enc = if self.caps().encodes {
                self.encode(pos, &zeros[..n])?
            } else {
                Vec::new()
            };
            self.write(pos, &zeros[..n], &enc)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Writes metadata and leaves a valid image. The [`crate::Output`] commit makes it
    /// durable and visible.
    fn finish(self: Box<Self>) -> Result<()>;

    /// Finishes an image `create` made (no data written): as [`ImageWriter::finish`],
    /// except for a format whose new image qemu-img leaves unwritten where `finish` writes
    /// (a LUKS payload).
    fn finish_new(self: Box<Self>) -> Result<()> {
        self.finish()
    }
}

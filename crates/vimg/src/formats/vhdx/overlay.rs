//! A read-only view of the VHDX file with the log's writes applied in memory.
//!
//! [MS-VHDX] §2.3.3 requires replaying a log before anything else of the file is trusted,
//! even for a read-only open. vimg never writes to a source, so the replay lands here:
//! 4 KiB sectors written by data descriptors and ranges zeroed by zero descriptors, laid
//! over the file. Everything after the headers (region tables, metadata, BAT, and payload
//! data that a descriptor touched) is read through this view. Bytes past the real end of
//! the file, up to the length the log says the file has, read as zeros.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::storage::Storage;

/// One replayed piece, keyed in the map by its start offset.
#[derive(Clone)]
enum Piece {
    /// A 4 KiB sector written by a data descriptor.
    Sector(Arc<[u8]>),
    /// A run of this many zero bytes.
    Zero(u64),
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Sector(s) => s.len() as u64,
            Piece::Zero(n) => *n,
        }
    }
}

/// The file as it reads after log replay. Pieces never overlap.
pub struct LogOverlay {
    inner: Arc<dyn Storage>,
    pieces: BTreeMap<u64, Piece>,
    len: u64,
}

impl fmt::Debug for LogOverlay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogOverlay")
            .field("inner", &self.inner)
            .field("pieces", &self.pieces.len())
            .field("len", &self.len)
            .finish()
    }
}

impl LogOverlay {
    /// An overlay with nothing replayed yet.
    pub fn new(inner: Arc<dyn Storage>) -> LogOverlay {
        let len = inner.len();
        LogOverlay {
            inner,
            pieces: BTreeMap::new(),
            len,
        }
    }

    /// Extends the visible length (never shrinks it).
    pub fn extend_to(&mut self, len: u64) {
        self.len = self.len.max(len);
    }

    /// Number of pieces held (for tests and messages).
    pub fn pieces(&self) -> usize {
        self.pieces.len()
    }

    /// Removes whatever covers `[start, end)`, splitting pieces that straddle the bounds.
    /// Callers pass 4 KiB-aligned bounds, so sectors are never split.
    fn carve(&mut self, start: u64, end: u64) {
        // A piece that starts before `start` and reaches into the range.
        if let Some((&s, p)) = self.pieces.range(..start).next_back() {
            let pend = s + p.len();
            if pend > start {
                if let Piece::Zero(_) = p {
                    self.pieces.insert(s, Piece::Zero(start - s));
                    if pend > end {
                        self.pieces.insert(end, Piece::Zero(pend - end));
                    }
                }
            }
        }
        let inside: Vec<u64> = self.pieces.range(start..end).map(|(k, _)| *k).collect();
        for k in inside {
            if let Some(p) = self.pieces.remove(&k) {
                let pend = k + p.len();
                if pend > end {
                    if let Piece::Zero(_) = p {
                        self.pieces.insert(end, Piece::Zero(pend - end));
                    }
                }
            }
        }
    }

    /// Replays a data descriptor: `sector` (4 KiB) now lives at `offset`.
    pub fn write_sector(&mut self, offset: u64, sector: Vec<u8>) {
        let end = offset + sector.len() as u64;
        self.carve(offset, end);
        self.pieces.insert(offset, Piece::Sector(sector.into()));
        self.len = self.len.max(end);
    }

    /// Replays a zero descriptor: `[offset, offset + len)` now reads as zeros.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = offset + len;
        self.carve(offset, end);
        self.pieces.insert(offset, Piece::Zero(len));
        self.len = self.len.max(end);
    }

    /// The replayed pieces in file order: `(offset, Some(sector))` for a 4 KiB sector a data
    /// descriptor wrote, `(offset, None)` with a length for a zeroed range (for writing the
    /// replay to the file, `update.rs`).
    pub fn replayed(&self) -> impl Iterator<Item = (u64, u64, Option<&[u8]>)> {
        self.pieces.iter().map(|(off, p)| match p {
            Piece::Sector(s) => (*off, s.len() as u64, Some(&s[..])),
            Piece::Zero(n) => (*off, *n, None),
        })
    }

    /// Reads from the file itself, zeros past its end.
    fn read_inner(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let ilen = self.inner.len();
        let from_file = if offset >= ilen {
            0
        } else {
            (ilen - offset).min(buf.len() as u64) as usize
        };
        if from_file > 0 {
            self.inner.read_exact_at(&mut buf[..from_file], offset)?;
        }
        buf[from_file..].fill(0);
        Ok(())
    }
}

impl Storage for LogOverlay {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (self.len - offset).min(buf.len() as u64) as usize;
        let buf = &mut buf[..n];
        let end = offset + n as u64;
        let mut pos = offset;
        while pos < end {
            let done = (pos - offset) as usize;
            // The piece covering `pos`, if any.
            let covering = self
                .pieces
                .range(..=pos)
                .next_back()
                .filter(|(s, p)| **s + p.len() > pos);
            if let Some((&s, p)) = covering {
                let take = (s + p.len()).min(end) - pos;
                let dst = &mut buf[done..done + take as usize];
                match p {
                    Piece::Sector(data) => {
                        let from = (pos - s) as usize;
                        dst.copy_from_slice(&data[from..from + take as usize]);
                    }
                    Piece::Zero(_) => dst.fill(0),
                }
                pos += take;
            } else {
                let next = self
                    .pieces
                    .range(pos..end)
                    .next()
                    .map(|(s, _)| *s)
                    .unwrap_or(end);
                self.read_inner(&mut buf[done..(next - offset) as usize], pos)?;
                pos = next;
            }
        }
        Ok(n)
    }

    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }

    fn disk_usage(&self) -> Option<u64> {
        self.inner.disk_usage()
    }

    fn identity(&self) -> Option<(u64, u64)> {
        self.inner.identity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn read(o: &LogOverlay, off: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0xeeu8; n];
        o.read_exact_at(&mut b, off).unwrap();
        b
    }

    #[test]
    fn replay_order_and_reads() {
        let base: Vec<u8> = (0..32768u32).map(|i| (i % 251) as u8 + 1).collect();
        let mut o = LogOverlay::new(Arc::new(MemStorage::new(base.clone())));
        o.write_sector(4096, vec![7u8; 4096]);
        o.write_zeroes(0, 16384); // hides the sector written before
        o.write_sector(8192, vec![9u8; 4096]); // and is partly overwritten again
        let got = read(&o, 0, 32768);
        assert!(got[..8192].iter().all(|b| *b == 0));
        assert!(got[8192..12288].iter().all(|b| *b == 9));
        assert!(got[12288..16384].iter().all(|b| *b == 0));
        assert_eq!(&got[16384..], &base[16384..]);
        // A read that starts inside a piece and ends inside the file.
        assert_eq!(read(&o, 10000, 10000)[..2288], vec![9u8; 2288][..]);
        assert_eq!(o.pieces(), 3);
    }

    #[test]
    fn writes_past_the_end_extend_with_zeros() {
        let mut o = LogOverlay::new(Arc::new(MemStorage::new(vec![1u8; 4096])));
        o.write_sector(16384, vec![5u8; 4096]);
        assert_eq!(o.len(), 20480);
        let got = read(&o, 0, 20480);
        assert!(got[..4096].iter().all(|b| *b == 1));
        assert!(got[4096..16384].iter().all(|b| *b == 0));
        assert!(got[16384..].iter().all(|b| *b == 5));
        o.extend_to(1 << 20);
        assert_eq!(read(&o, (1 << 20) - 10, 10), vec![0u8; 10]);
        let mut b = [0u8; 4];
        assert_eq!(o.read_at(&mut b, 1 << 20).unwrap(), 0);
    }
}

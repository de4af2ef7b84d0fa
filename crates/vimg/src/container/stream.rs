//! [`StreamStorage`]: decoded bytes served in ascending order, without a temporary file.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::decode::Decoder;
use super::error::ContainerError;
use crate::storage::Storage;

/// Bytes of the most recently decoded data a [`StreamStorage`] keeps, so that reads which
/// arrive slightly out of order (parallel copy workers) are still served.
pub const STREAM_WINDOW: u64 = 64 << 20;

/// What a storage built on another file reports about that file (the compressed file, or
/// nothing for a pipe): its path for messages and for resolving names, its identity so a
/// destination that would overwrite it is refused, and its disk usage for `info`.
#[derive(Clone, Debug, Default)]
pub struct OuterFile {
    /// Path of the file the bytes come from.
    pub path: Option<PathBuf>,
    /// `(device, inode)` of that file.
    pub identity: Option<(u64, u64)>,
    /// Bytes it occupies on disk.
    pub disk_usage: Option<u64>,
}

struct State {
    dec: Decoder,
    /// The first bytes of the stream, kept for the whole life of the storage (probes and
    /// headers are read again after the stream has moved on).
    head: Vec<u8>,
    /// The last `ring.len()` decoded bytes; decoded offset `o` sits at `o % ring.len()`.
    ring: Vec<u8>,
    checked_end: bool,
}

/// A decoded stream served in order. Reads at or after the decoding position decode forward;
/// reads of the last [`STREAM_WINDOW`] bytes and of the head are served from memory; anything
/// else fails with [`ContainerError::NotSequential`].
pub struct StreamStorage {
    len: u64,
    why_len: String,
    outer: OuterFile,
    state: Mutex<State>,
}

impl fmt::Debug for StreamStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamStorage")
            .field("len", &self.len)
            .field("outer", &self.outer)
            .finish()
    }
}

impl StreamStorage {
    /// A stream of `len` decoded bytes (`why_len` says where that size came from, for the
    /// error when the stream disagrees). `head` holds the bytes `dec` has produced so far
    /// (from offset 0); it is kept for the storage's life.
    pub fn new(
        dec: Decoder,
        head: Vec<u8>,
        len: u64,
        why_len: &str,
        outer: OuterFile,
    ) -> io::Result<StreamStorage> {
        if dec.pos() != head.len() as u64 {
            return Err(io::Error::other("stream head does not match the decoder"));
        }
        if head.len() as u64 > len {
            return Err(dec.clone_short_long(len, why_len));
        }
        let ring_len = STREAM_WINDOW.min(len.max(1)) as usize;
        Ok(StreamStorage {
            len,
            why_len: why_len.to_string(),
            outer,
            state: Mutex::new(State {
                dec,
                head,
                ring: vec![0u8; ring_len],
                checked_end: false,
            }),
        })
    }

    /// Bytes of look-back this stream keeps (reads within this distance behind the decoding
    /// position still succeed).
    pub fn window(&self) -> u64 {
        STREAM_WINDOW.min(self.len.max(1))
    }
}

impl Decoder {
    fn clone_short_long(&self, len: u64, why: &str) -> io::Error {
        ContainerError::SizeMismatch {
            what: self.what(),
            name: self.name().to_string(),
            got: format!("at least {}", self.pos()),
            expected: len,
            why: why.to_string(),
        }
        .into_io()
    }
}

impl Storage for StreamStorage {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (self.len - offset).min(buf.len() as u64) as usize;
        let mut st = self
            .state
            .lock()
            .map_err(|_| io::Error::other("stream lock poisoned"))?;
        let st = &mut *st;
        let w = st.ring.len() as u64;
        let mut done = 0usize;
        while done < n {
            let o = offset + done as u64;
            let left = n - done;
            if o < st.head.len() as u64 {
                let k = (st.head.len() - o as usize).min(left);
                buf[done..done + k].copy_from_slice(&st.head[o as usize..o as usize + k]);
                done += k;
                continue;
            }
            let pos = st.dec.pos();
            if o < pos {
                let kept = pos.saturating_sub(w);
                if o < kept {
                    return Err(ContainerError::NotSequential {
                        name: st.dec.name().to_string(),
                        offset: o,
                        kept,
                    }
                    .into_io());
                }
                let idx = (o % w) as usize;
                let k = ((pos - o) as usize).min(left).min(st.ring.len() - idx);
                buf[done..done + k].copy_from_slice(&st.ring[idx..idx + k]);
                done += k;
                continue;
            }
            // Decode forward into the ring, at most up to the wrap point and the end.
            let idx = (pos % w) as usize;
            let want = ((self.len - pos) as usize)
                .min(st.ring.len() - idx)
                .min(1 << 20);
            let got = st.dec.read(&mut st.ring[idx..idx + want])?;
            if got == 0 {
                return Err(st.dec.short(self.len, &self.why_len));
            }
            if st.dec.pos() == self.len && !st.checked_end {
                st.checked_end = true;
                st.dec.expect_end(&self.why_len)?;
            }
        }
        Ok(n)
    }

    fn path(&self) -> Option<&Path> {
        self.outer.path.as_deref()
    }

    fn disk_usage(&self) -> Option<u64> {
        self.outer.disk_usage
    }

    fn identity(&self) -> Option<(u64, u64)> {
        self.outer.identity
    }

    fn sequential_window(&self) -> Option<u64> {
        Some(self.window())
    }
}

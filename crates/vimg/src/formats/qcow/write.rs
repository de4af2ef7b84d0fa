//! The qcow (version 1) writer, laid out as QEMU's block/qcow.c lays out what it creates
//! and writes: the header, the backing file name, the L1 table (8-byte aligned, zeroed in
//! whole sectors), then, cluster by cluster in guest order, an L2 table (cluster-aligned)
//! when one is first needed and the data cluster (cluster-aligned) after it. 4 KiB
//! clusters and 512-entry L2 tables, or 512-byte clusters and 4096-entry tables with a
//! backing file, as QEMU chooses them.
//!
//! With `encryption=on` / `encrypt.format=aes` (header `crypt_method` 1), every sector of
//! a data cluster is AES-encrypted with its guest sector as IV ([`super::aes`]); a cluster
//! that a write does not fill when it is allocated gets encrypted zeros in the rest, as
//! QEMU's `get_cluster_offset` writes them, so the file is the same however the data
//! arrives.
//!
//! With `-c`, every cluster is compressed as QEMU's `qcow_co_pwritev_compressed` does it:
//! raw deflate (no zlib header) with a 4 KiB window (window bits 12) at zlib's default
//! level, the last cluster of a disk that does not end on a cluster boundary padded with
//! zeros; a cluster that does not shrink below the cluster size is written uncompressed.
//! A compressed cluster goes at the end of the file as it is (not cluster aligned), its L2
//! entry holding [`COMPRESSED`], its length above bit `63 - cluster_bits` and its offset.
//! Compressed clusters are never encrypted in QEMU; vimg refuses `-c` with encryption
//! rather than store them in clear.
//!
//! Data arrives in ascending guest order (the writer asks for it), so the file is the same
//! for any thread count; each L2 table is final once writing moves past it and only the
//! current one is held in memory.

use std::sync::Mutex;

use super::aes::AesKey;
use super::header::{Header, COMPRESSED, CRYPT_NONE, HEADER_SIZE, MAGIC, VERSION};
use crate::error::{Error, ErrorKind, Result};
use crate::limits;
use crate::output::OutFile;
use crate::writer::{EncodedUnit, ImageWriter, WriterCaps};

/// The header and L1 size of a new image of `size` bytes, as QEMU computes them.
pub fn new_header(size: u64, backing: Option<&str>) -> Result<(Header, u64)> {
    let size = size
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::invalid_argument("Image size is too large"))?;
    if size == 0 {
        return Err(Error::invalid_argument(
            "Image size is too small, cannot be zero length",
        ));
    }
    let (cluster_bits, l2_bits) = if backing.is_some() {
        (9u8, 12u8)
    } else {
        (12, 9)
    };
    let mut header_size = HEADER_SIZE as u64;
    let (mut bo, mut bs) = (0, 0);
    if let Some(b) = backing {
        if b.len() > 1023 {
            return Err(Error::invalid_argument(format!(
                "backing file name '{b}' is too long for a qcow header"
            )));
        }
        bo = header_size;
        bs = b.len() as u32;
        header_size += b.len() as u64;
    }
    let header_size = header_size.next_multiple_of(8);
    let shift = u32::from(cluster_bits) + u32::from(l2_bits);
    let l1_size = size.div_ceil(1 << shift);
    if l1_size > i32::MAX as u64 / 8 {
        return Err(Error::invalid_argument("Image size is too large"));
    }
    Ok((
        Header {
            magic: MAGIC,
            version: VERSION,
            backing_file_offset: bo,
            backing_file_size: bs,
            mtime: 0,
            size,
            cluster_bits,
            l2_bits,
            padding: 0,
            crypt_method: CRYPT_NONE,
            l1_table_offset: header_size,
        },
        l1_size,
    ))
}

struct State {
    l1: Vec<u64>,
    l2: Option<(usize, Vec<u64>)>,
    end: u64,
}

/// Writes a qcow (version 1) image.
pub struct QcowWriter {
    file: OutFile,
    header: Header,
    backing_name: Option<String>,
    state: Mutex<State>,
    /// The legacy AES key of an encrypted image.
    key: Option<AesKey>,
    /// `-c`: clusters compressed.
    compress: bool,
}

/// zlib's default compression level (`Z_DEFAULT_COMPRESSION`), which QEMU's qcow driver
/// uses.
pub const DEFLATE_LEVEL: u32 = 6;
/// The deflate window QEMU's qcow driver uses (raw deflate, window bits 12).
pub const WINDOW_BITS: u8 = 12;

impl QcowWriter {
    /// A qcow image with `header` and `l1_size` L1 entries (from [`new_header`]) into `file`.
    pub fn new(
        file: OutFile,
        header: Header,
        l1_size: u64,
        backing_name: Option<String>,
    ) -> Result<QcowWriter> {
        if file.is_stream() {
            return Err(Error::unsupported(
                "a qcow image keeps its tables in front of the data and cannot be written to a stream",
            ));
        }
        limits::check_table_bytes("qcow L1 table", l1_size * 8)?;
        let end = header.l1_table_offset + (l1_size * 8).next_multiple_of(512);
        Ok(QcowWriter {
            file,
            backing_name,
            state: Mutex::new(State {
                l1: vec![0; l1_size as usize],
                l2: None,
                end,
            }),
            header,
            key: None,
            compress: false,
        })
    }

    /// Compresses the clusters (`-c`); refused for an encrypted image.
    pub fn compressed(mut self) -> Result<QcowWriter> {
        if self.key.is_some() {
            return Err(Error::unsupported(
                "vimg does not write compressed clusters into an encrypted qcow image (QEMU would store them unencrypted)",
            ));
        }
        self.compress = true;
        Ok(self)
    }

    /// Encrypts the data with `key` (the header's `crypt_method` becomes AES).
    pub fn with_key(mut self, key: AesKey) -> QcowWriter {
        self.header.crypt_method = super::aes::CRYPT_AES;
        self.key = Some(key);
        self
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::msg(ErrorKind::Io, "qcow writer lock poisoned"))
    }

    fn flush_l2(&self, s: &mut State) -> Result<()> {
        if let Some((i, t)) = s.l2.take() {
            let mut b = vec![0u8; t.len() * 8];
            for (c, v) in b.chunks_exact_mut(8).zip(&t) {
                c.copy_from_slice(&v.to_be_bytes());
            }
            self.file.write_all_at(&b, s.l1[i])?;
        }
        Ok(())
    }

    /// The L2 table of guest cluster `c` made current (allocated if need be), and the
    /// index of `c`'s entry in it.
    fn slot(&self, s: &mut State, c: u64) -> Result<usize> {
        let cs = 1u64 << self.header.cluster_bits;
        let l2_bits = u32::from(self.header.l2_bits);
        let (i, j) = ((c >> l2_bits) as usize, (c & ((1 << l2_bits) - 1)) as usize);
        if s.l2.as_ref().map(|(k, _)| *k) != Some(i) {
            self.flush_l2(s)?;
            if s.l1.get(i).is_none_or(|o| *o != 0) {
                return Err(Error::msg(
                    ErrorKind::Io,
                    format!("qcow writer: guest cluster {c} arrived out of order"),
                ));
            }
            // A new L2 table at the next cluster boundary.
            let at = s.end.next_multiple_of(cs);
            s.l1[i] = at;
            s.end = at + (8u64 << l2_bits);
            s.l2 = Some((i, vec![0; 1 << l2_bits]));
        }
        Ok(j)
    }

    /// Stores compressed cluster `c` (`bytes`) at the end of the file, as it is.
    fn write_compressed(&self, s: &mut State, c: u64, bytes: &[u8]) -> Result<()> {
        let cb = u32::from(self.header.cluster_bits);
        let j = self.slot(s, c)?;
        let at = s.end;
        let len = bytes.len() as u64;
        if len >= 1 << cb || at >= 1 << (63 - cb) {
            return Err(Error::msg(
                ErrorKind::Io,
                format!("qcow writer: compressed cluster {c} ({len} bytes at {at:#x}) does not fit an L2 entry"),
            ));
        }
        let Some((_, t)) = s.l2.as_mut() else {
            return Err(Error::msg(ErrorKind::Io, "qcow writer lost its L2 table"));
        };
        if t[j] != 0 {
            return Err(Error::msg(
                ErrorKind::Io,
                format!("qcow writer: guest cluster {c} written twice"),
            ));
        }
        t[j] = at | COMPRESSED | (len << (63 - cb));
        s.end = at + len;
        self.file.write_all_at(bytes, at)
    }

    /// The host offset of guest cluster `c`, allocated if need be (then `true`).
    fn cluster(&self, s: &mut State, c: u64) -> Result<(u64, bool)> {
        let cs = 1u64 << self.header.cluster_bits;
        let j = self.slot(s, c)?;
        let Some((_, t)) = s.l2.as_mut() else {
            return Err(Error::msg(ErrorKind::Io, "qcow writer lost its L2 table"));
        };
        if t[j] & COMPRESSED != 0 {
            return Err(Error::msg(
                ErrorKind::Io,
                format!("qcow writer: guest cluster {c} written twice"),
            ));
        }
        if t[j] == 0 {
            let at = s.end.next_multiple_of(cs);
            t[j] = at;
            s.end = at + cs;
            return Ok((at, true));
        }
        Ok((t[j], false))
    }
}

impl ImageWriter for QcowWriter {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            unit: if self.compress {
                1 << self.header.cluster_bits
            } else {
                512
            },
            ordered: true,
            encodes: self.compress,
        }
    }

    fn encode(&self, _offset: u64, data: &[u8]) -> Result<Vec<EncodedUnit>> {
        if !self.compress {
            return Ok(Vec::new());
        }
        let cs = 1usize << self.header.cluster_bits;
        let mut padded = Vec::new();
        Ok(data
            .chunks(cs)
            .map(|unit| {
                // The last cluster of a disk that is not cluster aligned is compressed
                // padded with zeros, as QEMU does.
                let input = if unit.len() < cs {
                    padded.clear();
                    padded.extend_from_slice(unit);
                    padded.resize(cs, 0);
                    &padded[..]
                } else {
                    unit
                };
                crate::codec::deflate(input, DEFLATE_LEVEL, WINDOW_BITS, false, cs)
            })
            .collect())
    }

    fn write(&self, offset: u64, data: &[u8], encoded: &[EncodedUnit]) -> Result<()> {
        if self.compress && !encoded.is_empty() {
            let cs = 1u64 << self.header.cluster_bits;
            if !offset.is_multiple_of(cs)
                || encoded.len() as u64 != (data.len() as u64).div_ceil(cs)
            {
                return Err(Error::msg(
                    ErrorKind::Io,
                    format!("qcow writer: compressed write at {offset:#x} is not whole clusters"),
                ));
            }
            for (k, (unit, enc)) in data.chunks(cs as usize).zip(encoded).enumerate() {
                let at = offset + k as u64 * cs;
                match enc {
                    Some(bytes) => {
                        let mut s = self.lock()?;
                        self.write_compressed(&mut s, at / cs, bytes)?;
                    }
                    None => self.write_plain(at, unit)?,
                }
            }
            return Ok(());
        }
        self.write_plain(offset, data)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        (*self).finish_file()
    }
}

impl QcowWriter {
    fn write_plain(&self, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= self.header.size)
            .ok_or_else(|| Error::invalid_argument("write past the end of the qcow image"))?;
        let cs = 1u64 << self.header.cluster_bits;
        let mut s = self.lock()?;
        let mut pos = offset;
        while pos < end {
            let n = (cs - pos % cs).min(end - pos);
            let (host, new) = self.cluster(&mut s, pos / cs)?;
            let from = (pos - offset) as usize;
            let part = &data[from..from + n as usize];
            match &self.key {
                None => self.file.write_all_at(part, host + pos % cs)?,
                Some(k) => {
                    let cstart = pos - pos % cs;
                    if new && n < cs {
                        let mut z = vec![0u8; cs as usize];
                        k.apply(cstart, &mut z, true)?;
                        self.file.write_all_at(&z, host)?;
                    }
                    let mut buf = part.to_vec();
                    k.apply(pos, &mut buf, true)?;
                    self.file.write_all_at(&buf, host + pos % cs)?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn finish_file(self) -> Result<()> {
        let mut s = self.lock()?;
        self.flush_l2(&mut s)?;
        let l1_at = self.header.l1_table_offset;
        let mut head = vec![0u8; l1_at as usize];
        self.header.write_to(&mut head);
        if let Some(name) = &self.backing_name {
            let at = HEADER_SIZE;
            head[at..at + name.len()].copy_from_slice(name.as_bytes());
        }
        self.file.write_all_at(&head, 0)?;
        let mut l1 = vec![0u8; (s.l1.len() * 8).next_multiple_of(512)];
        for (c, v) in l1.chunks_exact_mut(8).zip(&s.l1) {
            c.copy_from_slice(&v.to_be_bytes());
        }
        self.file.write_all_at(&l1, l1_at)?;
        self.file.set_len(s.end)
    }
}

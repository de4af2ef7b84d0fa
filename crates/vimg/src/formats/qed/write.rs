//! The QED writer, laid out as qemu-img lays out a QED it creates and converts into: the
//! header cluster (with the backing file name after the header fields), the L1 table from
//! cluster 1, then data clusters and L2 tables in the order they are needed. When a write
//! lands under an L1 entry without an L2 table, its data clusters there are allocated first
//! and the L2 table right after them, as QEMU does for a request.
//!
//! Data arrives in ascending guest order (the writer asks for it), so the file is the same
//! for any thread count, and each L2 table is final once writing moves past its range:
//! only the current one is held in memory and it is written out then.

use std::sync::Mutex;

use super::error::QedError;
use super::header::{
    write_table, Header, F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE, HEADER_SIZE, MAGIC,
    MAX_CLUSTER_SIZE, MAX_TABLE_SIZE, MIN_CLUSTER_SIZE,
};
use crate::error::{Error, ErrorKind, Result};
use crate::limits;
use crate::output::OutFile;
use crate::writer::{EncodedUnit, ImageWriter, WriterCaps};

/// The header a new image of `size` bytes gets, or QEMU's error for the options.
pub fn new_header(
    size: u64,
    cluster_size: u64,
    table_size: u64,
    backing: Option<(&str, bool)>,
) -> Result<Header, QedError> {
    if !cluster_size.is_power_of_two()
        || !(u64::from(MIN_CLUSTER_SIZE)..=u64::from(MAX_CLUSTER_SIZE)).contains(&cluster_size)
    {
        return Err(QedError::Option(format!(
            "QED cluster size must be within range [{MIN_CLUSTER_SIZE}, {MAX_CLUSTER_SIZE}] and power of 2"
        )));
    }
    if !table_size.is_power_of_two() || table_size > u64::from(MAX_TABLE_SIZE) {
        return Err(QedError::Option(format!(
            "QED table size must be within range [1, {MAX_TABLE_SIZE}] and power of 2"
        )));
    }
    let entries = table_size * cluster_size / 8;
    let max = entries * entries * cluster_size;
    let size = size
        .checked_next_multiple_of(512)
        .filter(|s| *s <= max)
        .ok_or_else(|| {
            QedError::Option(format!(
                "QED image size must be a non-zero multiple of cluster size and less than {max} bytes"
            ))
        })?;
    let (mut features, mut off, mut len) = (0, 0, 0);
    if let Some((name, raw)) = backing {
        if name.len() as u64 > cluster_size - HEADER_SIZE as u64 || name.len() > 1023 {
            return Err(QedError::Option(format!(
                "backing file name '{name}' is too long for a QED header"
            )));
        }
        features |= F_BACKING_FILE;
        if raw {
            features |= F_BACKING_FORMAT_NO_PROBE;
        }
        off = HEADER_SIZE as u32;
        len = name.len() as u32;
    }
    Ok(Header {
        magic: MAGIC,
        cluster_size: cluster_size as u32,
        table_size: table_size as u32,
        header_size: 1,
        features,
        compat_features: 0,
        autoclear_features: 0,
        l1_table_offset: cluster_size,
        image_size: size,
        backing_filename_offset: off,
        backing_filename_size: len,
    })
}

struct State {
    l1: Vec<u64>,
    /// The L2 table being filled: its L1 index and entries.
    l2: Option<(usize, Vec<u64>)>,
    /// A new L2 table whose place is not decided yet.
    pending: Option<usize>,
    /// Next free byte of the file.
    end: u64,
}

/// Writes a QED image.
pub struct QedWriter {
    file: OutFile,
    header: Header,
    backing_name: Option<String>,
    state: Mutex<State>,
}

impl QedWriter {
    /// A QED with `header` (from [`new_header`]) into `file`.
    pub fn new(file: OutFile, header: Header, backing_name: Option<String>) -> Result<QedWriter> {
        if file.is_stream() {
            return Err(Error::unsupported(
                "a QED image keeps its tables in front of the data and cannot be written to a stream",
            ));
        }
        let cs = u64::from(header.cluster_size);
        let table_bytes = u64::from(header.table_size) * cs;
        limits::check_table_bytes("QED L1 table", table_bytes)?;
        let entries = header.table_entries() as usize;
        Ok(QedWriter {
            file,
            backing_name,
            state: Mutex::new(State {
                l1: vec![0; entries],
                l2: None,
                pending: None,
                end: cs + table_bytes,
            }),
            header,
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::msg(ErrorKind::Io, "QED writer lock poisoned"))
    }

    fn table_bytes(&self) -> u64 {
        u64::from(self.header.table_size) * u64::from(self.header.cluster_size)
    }

    fn flush_l2(&self, s: &mut State) -> Result<()> {
        if let Some((i, t)) = s.l2.take() {
            let mut b = vec![0u8; self.table_bytes() as usize];
            write_table(&t, &mut b);
            self.file.write_all_at(&b, s.l1[i])?;
        }
        Ok(())
    }

    /// The file offset of guest cluster `c`, allocating it (and its L2 table) if needed.
    fn cluster(&self, s: &mut State, c: u64) -> Result<u64> {
        let cs = u64::from(self.header.cluster_size);
        let per = self.header.table_entries();
        let (i, j) = ((c / per) as usize, (c % per) as usize);
        if s.l2.as_ref().map(|(k, _)| *k) != Some(i) {
            self.place_pending(s);
            self.flush_l2(s)?;
            if s.l1.get(i).is_none_or(|o| *o != 0) {
                // Ordered writes never return to a finished table.
                return Err(Error::msg(
                    ErrorKind::Io,
                    format!("QED writer: guest cluster {c} arrived out of order"),
                ));
            }
            s.l2 = Some((i, vec![0; per as usize]));
        }
        let fresh = s.l1[i] == 0 && s.pending != Some(i);
        let Some((_, t)) = s.l2.as_mut() else {
            return Err(Error::msg(ErrorKind::Io, "QED writer lost its L2 table"));
        };
        if t[j] != 0 {
            return Ok(t[j]);
        }
        let at = s.end;
        t[j] = at;
        s.end += cs;
        if fresh {
            // The table's place is decided after this write's data under it.
            s.pending = Some(i);
        }
        Ok(at)
    }

    /// Places a new L2 table right after the data of the write that created it, as QEMU
    /// places it after the clusters of the request that needed it.
    fn place_pending(&self, s: &mut State) {
        if let Some(i) = s.pending.take() {
            s.l1[i] = s.end;
            s.end += self.table_bytes();
        }
    }
}

impl ImageWriter for QedWriter {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            unit: 512,
            ordered: true,
            encodes: false,
        }
    }

    fn write(&self, offset: u64, data: &[u8], _encoded: &[EncodedUnit]) -> Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= self.header.image_size)
            .ok_or_else(|| Error::invalid_argument("write past the end of the QED image"))?;
        let cs = u64::from(self.header.cluster_size);
        let mut s = self.lock()?;
        let mut pos = offset;
        while pos < end {
            let n = (cs - pos % cs).min(end - pos);
            let host = self.cluster(&mut s, pos / cs)?;
            let from = (pos - offset) as usize;
            self.file
                .write_all_at(&data[from..from + n as usize], host + pos % cs)?;
            pos += n;
        }
        self.place_pending(&mut s);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let mut s = self.lock()?;
        self.place_pending(&mut s);
        self.flush_l2(&mut s)?;
        let cs = u64::from(self.header.cluster_size);
        let mut head = vec![0u8; cs as usize];
        self.header.write_to(&mut head);
        if let Some(name) = &self.backing_name {
            head[HEADER_SIZE..HEADER_SIZE + name.len()].copy_from_slice(name.as_bytes());
        }
        self.file.write_all_at(&head, 0)?;
        let mut l1 = vec![0u8; self.table_bytes() as usize];
        write_table(&s.l1, &mut l1);
        self.file.write_all_at(&l1, cs)?;
        self.file.set_len(s.end)
    }
}

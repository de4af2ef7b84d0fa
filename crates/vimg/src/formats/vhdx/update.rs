//! Changing an existing VHDX in place: guest-data writes (`convert -n`, `commit` into a
//! vhdx base), the log replayed on every read-write open, and `check -r` ([MS-VHDX] §2.2.2
//! header updates, §2.3 log, §2.5 BAT), in the order of QEMU's block/vhdx.c and
//! vhdx-log.c, made crash-safe.
//!
//! - **Open**: the image is first opened by the reader with any log replayed in memory, so a
//!   log that does not lead to a valid image (bad region tables, BAT entries past the file)
//!   is refused before anything is written. A valid active sequence is then written to the
//!   file as QEMU's `vhdx_log_flush` does: the headers get a new DataWriteGuid (both copies,
//!   the log GUID kept), every replayed sector is written in place, the file is flushed and
//!   grown to the length the log records (rounded up to 1 MiB), flushed, and both headers
//!   are rewritten with a zero log GUID. A killed replay leaves the log valid, so it is
//!   replayed again. The log may not write the file identifier, the headers or itself
//!   (vimg refuses such a log; the work is bounded by the log and the file's length).
//! - **Guest writes**: before the first one, both headers get a new FileWriteGuid and
//!   DataWriteGuid (§2.2.2; QEMU's `vhdx_user_visible_write`). A write into a fully
//!   present block goes in place. A block in any other state (not present, undefined,
//!   zero, unmapped: all read as zeros) gets a new block at the end of the file rounded up
//!   to 1 MiB (QEMU's `vhdx_allocate_block`), the file grown over it (it reads as zeros) and
//!   the data written into it; its BAT entry changes in memory only.
//! - **BAT updates through the log**: changed BAT sectors are committed in batches (when a
//!   log entry would be full, and at [`VhdxUpdate::finish`]): the data is flushed; both
//!   one log entry holding the changed 4 KiB BAT sectors, under a new log GUID, is written
//!   at the start of the log and flushed; both headers get that GUID; the sectors are
//!   written in place and flushed; both headers get a zero log GUID. QEMU does the same per
//!   BAT entry, but names the GUID in the headers before writing the entry. A kill before
//!   the headers name it leaves the log unnamed (old content, the new blocks unreferenced
//!   past the old data); after, a log that QEMU (`qemu-img check -r all`, any read-write
//!   open) and vimg replay to the new content. Never a named log without a valid entry:
//!   QEMU refuses BAT changes into such an image ("Operation not supported", its log
//!   writer needs a zero log GUID), and so does vimg, before writing anything.
//! - **Zero writes** leave blocks that are not fully present alone (they read as zeros) and
//!   write zeros into present ones.
//! - **Differencing images** are refused for guest writes: QEMU cannot open them, and a
//!   write would need their sector bitmaps over a parent vimg cannot change. The log of a
//!   differencing image is still replayed (`check -r`).
//! - No resize: QEMU's vhdx driver has no truncate (qemu-img's refusal is kept).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use byteorder::{ByteOrder, LittleEndian as LE};

use super::geometry::Geometry;
use super::header::*;
use super::log::{self, LogState};
use super::open::{check_log_fields, read_headers};
use super::read::VhdxReader;
use crate::check::CheckReport;
use crate::error::{Error, Result};
use crate::formats::inplace_file::UpdateFile;
use crate::formats::qcow2::RepairReport;
use crate::formats::OpenContext;
use crate::gate::ExternalPolicy;
use crate::image::Image;
use crate::storage::Storage;

/// How far past the end of the file a log may grow it when replayed on disk (the log
/// records the file's length; no real writer grows it by more than a few blocks per entry).
const MAX_REPLAY_GROWTH: u64 = 4 << 30;

/// A VHDX open read-write.
#[derive(Debug)]
pub struct VhdxUpdate {
    f: UpdateFile,
    path: PathBuf,
    /// The current header and its slot (1 or 2).
    header: Header,
    slot: u8,
    geometry: Geometry,
    bat: Vec<u64>,
    bat_offset: u64,
    /// Regions and items as the reader found them (for the check).
    reader: VhdxReader,
    /// The file's length.
    len: u64,
    /// BAT sectors (4 KiB, counted from the BAT's start) changed since the last commit.
    dirty: BTreeSet<u64>,
    /// The FileWriteGuid of this session.
    session: Guid,
    /// The headers carry this session's GUIDs (the first guest write happened).
    visible: bool,
    /// Sequence number of the next log entry.
    sequence: u64,
    /// A log was replayed at open.
    replayed: bool,
}

fn header_offset(slot: u8) -> u64 {
    if slot == 1 {
        HEADER1_OFFSET
    } else {
        HEADER2_OFFSET
    }
}

/// The file's headers as they are on disk, for the updates that follow.
struct Headers {
    current: Header,
    slot: u8,
    session: Guid,
}

impl Headers {
    /// QEMU's `vhdx_update_headers`: the other slot gets the current header with the next
    /// sequence number, this session's FileWriteGuid and the changes, then (once it is on
    /// disk) the first slot again, so both copies are valid and equal but for the number.
    fn update(
        &mut self,
        f: &mut UpdateFile,
        data_guid: Option<Guid>,
        log_guid: Option<Guid>,
    ) -> Result<()> {
        for _ in 0..2 {
            let mut h = self.current.clone();
            h.sequence_number = h.sequence_number.checked_add(1).ok_or_else(|| {
                Error::unsupported("the VHDX header sequence number cannot grow any more")
            })?;
            h.file_write_guid = self.session;
            if let Some(g) = data_guid {
                h.data_write_guid = g;
            }
            if let Some(g) = log_guid {
                h.log_guid = g;
            }
            let slot = 3 - self.slot;
            let mut buf = vec![0u8; HEADER_SIZE];
            h.write_to(&mut buf);
            f.write_at(&buf, header_offset(slot))?;
            f.sync()?;
            self.current = h;
            self.slot = slot;
        }
        Ok(())
    }
}

/// Writes the active log sequence of the file open as `f` (read through `storage`) to the
/// file, QEMU's order (module docs). Returns the headers as they are after, and whether a
/// log was replayed.
fn replay_on_disk(
    f: &mut UpdateFile,
    storage: &Arc<dyn Storage>,
    path: &Path,
    policy: ExternalPolicy,
) -> Result<(Headers, bool)> {
    let (header, slot) = read_headers(&**storage)?;
    check_log_fields(&header, slot)?;
    let mut hs = Headers {
        current: header.clone(),
        slot,
        session: Guid::random(),
    };
    let overlay = match log::replay(storage, &header)? {
        LogState::Empty | LogState::NoValidSequence { .. } => return Ok((hs, false)),
        LogState::Replayed { overlay, .. } => overlay,
    };
    // The image as the log leaves it must open, before anything is written.
    VhdxReader::open(storage.clone(), &OpenContext::new(Some(path), policy))?;
    let file_len = storage.len();
    let new_len = overlay.len();
    if new_len > file_len.saturating_add(MAX_REPLAY_GROWTH) {
        return Err(Error::unsupported(format!(
            "the VHDX log of '{}' grows the file from {file_len:#x} to {new_len:#x} bytes; vimg replays at most {MAX_REPLAY_GROWTH:#x} bytes of growth",
            path.display()
        )));
    }
    let log_start = header.log_offset;
    let log_end = log_start + u64::from(header.log_length);
    for (off, len, _) in overlay.replayed() {
        let end = off.saturating_add(len);
        if off < REGION_TABLE1_OFFSET || (off < log_end && end > log_start) {
            return Err(Error::unsupported(format!(
                "the VHDX log of '{}' writes [{off:#x}, {end:#x}), over the headers or the log itself; vimg does not replay it",
                path.display()
            )));
        }
    }
    hs.update(f, Some(Guid::random()), None)?;
    let zeros = vec![0u8; MIB as usize];
    for (off, len, data) in overlay.replayed() {
        match data {
            Some(s) => f.write_at(s, off)?,
            None => {
                // Past the end of the file the range reads as zeros once it grows.
                let end = off.saturating_add(len).min(file_len);
                let mut pos = off;
                while pos < end {
                    let n = (end - pos).min(MIB);
                    f.write_at(&zeros[..n as usize], pos)?;
                    pos += n;
                }
            }
        }
    }
    f.sync()?;
    if f.len()? < new_len {
        f.set_len(new_len.div_ceil(MIB) * MIB)?;
        f.sync()?;
    }
    hs.update(f, None, Some(Guid::ZERO))?;
    Ok((hs, true))
}

impl VhdxUpdate {
    /// Opens the VHDX at `path` read-write: a pending log is replayed to the file first,
    /// then the reader checks every table.
    pub fn open(path: &Path, policy: ExternalPolicy) -> Result<VhdxUpdate> {
        let (mut f, storage) = UpdateFile::open(path)?;
        let (hs, replayed) = replay_on_disk(&mut f, &storage, path, policy)?;
        let (f, storage) = if replayed {
            // The file changed under the reader's storage (its length): open it again and
            // make sure it is the same file.
            let id = f.identity()?;
            let (f2, s2) = UpdateFile::open(path)?;
            if f2.identity()? != id {
                return Err(Error::unsupported(format!(
                    "'{}' was replaced while its log was replayed",
                    path.display()
                )));
            }
            (f2, s2)
        } else {
            (f, storage)
        };
        let reader = VhdxReader::open(storage, &OpenContext::new(Some(path), policy))?;
        let p = reader.parsed().clone();
        let len = f.len()?;
        Ok(VhdxUpdate {
            f,
            path: path.to_path_buf(),
            header: hs.current,
            slot: hs.slot,
            geometry: p.geometry,
            bat: reader.bat.clone(),
            bat_offset: p.bat_region.file_offset,
            reader,
            len,
            dirty: BTreeSet::new(),
            session: hs.session,
            visible: false,
            sequence: 1,
            replayed,
        })
    }

    /// The (device, inode) of the file.
    pub fn identity(&self) -> Result<(u64, u64)> {
        self.f.identity()
    }

    /// The virtual size.
    pub fn virtual_size(&self) -> u64 {
        self.geometry.virtual_size
    }

    /// The payload block size (the unit of allocation).
    pub fn block_size(&self) -> u64 {
        self.geometry.block_size
    }

    /// Refuses guest writes where vimg cannot be right (differencing images).
    pub fn check_writable(&self) -> Result<()> {
        if self.geometry.differencing {
            return Err(Error::unsupported(
                "vimg does not write guest data into differencing VHDX images",
            ));
        }
        // A log GUID left set over a log with no valid entry (a valid one was replayed at
        // open, which clears it): QEMU 10.0 opens the image read-write but its log writer
        // refuses every BAT change (-ENOTSUP: it requires a flushed log); vimg refuses the
        // same before writing anything.
        if !self.header.log_guid.is_zero() {
            return Err(Error::unsupported(format!(
                "Operation not supported (the VHDX headers name log GUID {} but the log holds no valid entry; QEMU writes no BAT change into such an image)",
                self.header.log_guid
            )));
        }
        Ok(())
    }

    /// `check -r`: the log was replayed at open (one corruption fixed, as QEMU counts it);
    /// the rest is the reader's check.
    pub fn repair(&mut self) -> Result<RepairReport> {
        use crate::mapping::ImageReader;
        let before: CheckReport = self.reader.check()?;
        Ok(RepairReport {
            corruptions_fixed: u64::from(self.replayed),
            before,
            ..RepairReport::default()
        })
    }

    fn headers(&self) -> Headers {
        Headers {
            current: self.header.clone(),
            slot: self.slot,
            session: self.session,
        }
    }

    fn update_headers(&mut self, data_guid: Option<Guid>, log_guid: Option<Guid>) -> Result<()> {
        let mut hs = self.headers();
        let r = hs.update(&mut self.f, data_guid, log_guid);
        self.header = hs.current;
        self.slot = hs.slot;
        r
    }

    fn range(&self, off: u64, len: u64) -> Result<u64> {
        off.checked_add(len)
            .filter(|e| *e <= self.geometry.virtual_size)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "write of {len} bytes at {off:#x} past the end of the VHDX ({:#x} bytes)",
                    self.geometry.virtual_size
                ))
            })
    }

    /// Before the first guest-visible write: new FileWriteGuid and DataWriteGuid.
    fn begin(&mut self) -> Result<()> {
        self.check_writable()?;
        if !self.visible {
            self.update_headers(Some(Guid::random()), None)?;
            self.visible = true;
        }
        Ok(())
    }

    /// Data sectors one log entry can hold: the entry (descriptor sectors and data sectors)
    /// stays a sector shorter than the log, as QEMU keeps its circular log.
    fn batch_limit(&self) -> u64 {
        let total = (u64::from(self.header.log_length) / LOG_SECTOR).saturating_sub(1);
        total.saturating_sub((total + 2).div_ceil(128))
    }

    /// Writes `data` at guest offset `off`; a new block's other bytes come from `backing`
    /// (none for the images vimg writes into) or read as zeros.
    pub fn write_at(&mut self, off: u64, data: &[u8], backing: Option<&Image>) -> Result<()> {
        let end = self.range(off, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.begin()?;
        let bs = self.geometry.block_size;
        let mut pos = off;
        while pos < end {
            let block = pos / bs;
            let within = pos % bs;
            let n = (bs - within).min(end - pos);
            let piece = &data[(pos - off) as usize..(pos - off + n) as usize];
            let idx = self.geometry.payload_entry(block) as usize;
            let e = BatEntry(self.bat.get(idx).copied().unwrap_or(0));
            let at = if e.state() == PAYLOAD_FULLY_PRESENT {
                e.file_offset()
            } else {
                self.allocate(block, idx, backing)?
            };
            self.f.write_at(piece, at + within)?;
            pos += n;
        }
        Ok(())
    }

    /// A new block for payload block `block` (BAT index `idx`) at the end of the file.
    fn allocate(&mut self, block: u64, idx: usize, backing: Option<&Image>) -> Result<u64> {
        if self.batch_limit() == 0 {
            return Err(Error::unsupported(format!(
                "'{}' has no log to record new blocks in",
                self.path.display()
            )));
        }
        // A full batch is committed before the next block is taken, so every committed
        // entry maps blocks whose data is already written.
        if self.dirty.len() as u64 >= self.batch_limit() {
            self.commit()?;
        }
        let bs = self.geometry.block_size;
        let at = self.len.div_ceil(MIB) * MIB;
        let new_len = at
            .checked_add(bs)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or_else(|| Error::unsupported("the VHDX file would grow past 2^63 bytes"))?;
        self.f.set_len(new_len)?;
        self.len = new_len;
        if let Some(b) = backing {
            let g = block * bs;
            let m = b.virtual_size().saturating_sub(g).min(bs);
            if m > 0 {
                let mut buf = vec![0u8; m as usize];
                b.read_at(&mut buf, g)?;
                if buf.iter().any(|x| *x != 0) {
                    self.f.write_at(&buf, at)?;
                }
            }
        }
        if let Some(e) = self.bat.get_mut(idx) {
            *e = BatEntry::new(PAYLOAD_FULLY_PRESENT, at).0;
        }
        self.dirty.insert(idx as u64 * 8 / LOG_SECTOR);
        Ok(at)
    }

    /// Makes `[off, off + len)` read as zeros (no backing file).
    pub fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        let end = self.range(off, len)?;
        let bs = self.geometry.block_size;
        let zeros = vec![0u8; bs.min(4 << 20) as usize];
        let mut pos = off;
        while pos < end {
            let block = pos / bs;
            let n = (bs - pos % bs).min(end - pos).min(zeros.len() as u64);
            let idx = self.geometry.payload_entry(block) as usize;
            let e = BatEntry(self.bat.get(idx).copied().unwrap_or(0));
            if e.state() == PAYLOAD_FULLY_PRESENT {
                self.write_at(pos, &zeros[..n as usize], None)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Commits the changed BAT sectors through the log (module docs).
    fn commit(&mut self) -> Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        self.f.sync()?;
        let guid = Guid::random();
        let per = (LOG_SECTOR / 8) as usize;
        let mut sectors: Vec<(u64, Vec<u8>)> = Vec::with_capacity(self.dirty.len());
        for &s in &self.dirty {
            let target = self.bat_offset + s * LOG_SECTOR;
            let mut buf = vec![0u8; LOG_SECTOR as usize];
            self.f.read_at(&mut buf, target)?;
            let first = s as usize * per;
            let last = (first + per).min(self.bat.len());
            for i in first..last {
                LE::write_u64(&mut buf[(i - first) * 8..], self.bat[i]);
            }
            sectors.push((target, buf));
        }
        let refs: Vec<(u64, &[u8])> = sectors.iter().map(|(o, b)| (*o, &b[..])).collect();
        let entry = log::build_entry(guid, self.sequence, 0, self.len, &refs, &[]);
        if entry.len() as u64 >= u64::from(self.header.log_length) {
            return Err(Error::unsupported(
                "the VHDX log entry does not fit the log",
            ));
        }
        // The entry first, then the headers naming its GUID: a kill before they do leaves
        // the log unnamed (the old BAT, the new blocks unreferenced), never a log GUID
        // without a valid entry, into which QEMU (and so vimg) writes no BAT change.
        self.f.write_at(&entry, self.header.log_offset)?;
        self.f.sync()?;
        self.update_headers(None, Some(guid))?;
        for (target, buf) in &sectors {
            self.f.write_at(buf, *target)?;
        }
        self.f.sync()?;
        self.update_headers(None, Some(Guid::ZERO))?;
        self.dirty.clear();
        self.sequence += 1;
        Ok(())
    }

    /// Commits the BAT changes and flushes.
    pub fn finish(&mut self) -> Result<()> {
        self.commit()?;
        self.f.sync()
    }
}

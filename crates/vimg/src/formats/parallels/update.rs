//! Changing an existing Parallels image in place: guest-data writes (`commit` into a
//! parallels base, `convert -n`) and `check -r` (QEMU's block/parallels.c repairs).
//!
//! # Guest writes
//! In QEMU's order (`parallels_co_writev`, `allocate_clusters`), made crash-safe:
//! - the header's in-use flag is not set: QEMU sets it while it has the image open
//!   read-write, but vimg's writes are crash-ordered (data flushed before the BAT entry that
//!   points at it), so the flag would protect nothing and a kill would only leave
//!   `qemu-img check` reporting "image was not closed correctly";
//! - an image found unclean (in-use flag set, a wrong `data_off`) is first repaired as QEMU's read-write open repairs it (`parallels_open` runs
//!   its check with both fix flags when the flag is set, `data_off` is wrong, or the BAT
//!   reaches past the file): the repair of `check -r all` below, before the first guest
//!   write. Only when everything else about the image is writable (the reader accepts it,
//!   no Format Extension): what vimg would refuse anyway is refused before anything
//!   changes. Unlike QEMU 10.0, whose open forgets after the repair which clusters are in
//!   use and so may place a new cluster over an existing one (a `convert -n` into an
//!   unclean image leaves a BAT entry duplicated and guest data lost), new clusters go
//!   past every cluster the repaired BAT references. A read-only open changes nothing;
//! - a write into an allocated cluster goes in place;
//! - a new cluster goes at the end of the data (past every cluster the BAT references),
//!   written whole (the rest zeros: a Parallels image vimg writes into has no backing);
//! - whole clusters written with zeros are unmapped (BAT entry 0, as QEMU's write-zeroes,
//!   which discards them); other zero writes leave unallocated clusters alone;
//! - at finish: the data is flushed, the changed BAT entries are written (one write) and
//!   flushed, the clusters unmapped are given back (hole punched), the file is cut at the
//!   end of the last cluster in use (as QEMU's close truncates it).
//!
//! A killed process leaves every cluster old or new, and at worst space past the last
//! cluster in use (`check -r leaks`; `qemu-img check` exits 3, leaks only).
//!
//! Refused before writing: what the reader refuses, and images with a Format Extension
//! (its dirty bitmaps would miss the writes).
//!
//! # Repair
//! `check -r leaks|all` as QEMU's `parallels_co_check` with its fix flags: the in-use
//! flag, a wrong `data_off`, BAT entries whose cluster lies past the end of the file,
//! space leaked past the last cluster, and BAT entries that share a cluster (the cluster is
//! copied to a new one for every entry but the first), with QEMU's lines and counts. The
//! copies are written and flushed before the BAT points at them; the header and BAT are
//! one write; the file is cut last. The file is left at QEMU's end of data, as QEMU's close
//! truncates it: entries outside the image cleared, the end stays where the open found it
//! (the file grows back there, within twice its length plus 1 MiB), and the next check
//! finds that space leaked. qemu-img's "Double checking" is [`ParallelsUpdate::check_after_repair`].
//! The repair a read-write open runs prints its lines through [`crate::notice`], as QEMU's
//! open prints them.

use std::path::Path;

use super::header::{
    self, write_bat, Header, HEADER_SIZE, INUSE_OPEN, MAGIC_V1, MAGIC_V2, SECTOR, VERSION,
};
use super::read::ParallelsReader;
use super::ParallelsError;
use crate::check::CheckReport;
use crate::error::{Error, Result};
use crate::formats::inplace_file::UpdateFile;
use crate::formats::qcow2::{Repair, RepairReport};
use crate::image::Image;
use crate::limits;

/// A Parallels image open for changing in place.
#[derive(Debug)]
pub struct ParallelsUpdate {
    f: UpdateFile,
    header: Header,
    bat: Vec<u32>,
    /// Why the reader refused the image (guest writes need it to open; repairs do not).
    refused: Option<String>,
    virtual_size: u64,
    cluster_size: u64,
    multiplier: u64,
    /// Start of the data area, bytes.
    data_start: u64,
    /// The in-use value found at open, restored at finish.
    inuse_found: u32,
    /// A guest write has started (finish has work to do).
    marked: bool,
    /// BAT entries changed and not yet written (first, last).
    dirty: Option<(usize, usize)>,
    /// Host clusters unmapped, given back at finish.
    freed: Vec<u64>,
    /// End of the data: where the next new cluster goes.
    data_end: u64,
    /// QEMU's end of data (`s->data_end`): past every cluster the BAT referenced at open,
    /// inside the file or not, moved by a repair as QEMU's check moves it; a repair leaves
    /// the file this long, as QEMU's close truncates it (within [`grow_limit`]).
    qemu_data_end: u64,
}

impl ParallelsUpdate {
    /// Opens the image at `path` read-write. The header and BAT are read as QEMU reads
    /// them; whether the reader accepts the image is recorded (guest writes need it).
    pub fn open(path: &Path) -> Result<ParallelsUpdate> {
        let (f, storage) = UpdateFile::open(path)?;
        let refused = ParallelsReader::open(storage.clone())
            .err()
            .map(|e| e.to_string());
        let len = f.len()?;
        let mut hb = [0u8; HEADER_SIZE];
        if len < HEADER_SIZE as u64 {
            return Err(ParallelsError::TooShort { len }.into());
        }
        f.read_at(&mut hb, 0)?;
        let header = Header::parse(&hb)?;
        if header.version != VERSION || (header.magic != MAGIC_V1 && header.magic != MAGIC_V2) {
            return Err(Error::invalid_argument("Image not in Parallels format"));
        }
        if header.tracks == 0 || header.tracks > super::MAX_TRACKS {
            return Err(Error::unsupported(format!(
                "Invalid image: cluster size of {} sectors",
                header.tracks
            )));
        }
        if header.bat_entries > super::MAX_BAT_ENTRIES {
            return Err(Error::unsupported("Catalog too large"));
        }
        let bat_bytes = u64::from(header.bat_entries) * 4;
        if HEADER_SIZE as u64 + bat_bytes > len {
            return Err(ParallelsError::BatPastEof {
                bytes: bat_bytes,
                entries: header.bat_entries,
                len,
            }
            .into());
        }
        let n = limits::check_table_bytes("Parallels BAT", bat_bytes)?;
        let mut raw = vec![0u8; n];
        f.read_at(&mut raw, HEADER_SIZE as u64)?;
        let bat = header::parse_bat(&raw, header.bat_entries as usize);
        let ext = header.is_ext();
        let nb_sectors = if ext {
            header.nb_sectors
        } else {
            header.nb_sectors & 0xffff_ffff
        };
        let cluster_size = u64::from(header.tracks) * SECTOR;
        let multiplier = if ext { u64::from(header.tracks) } else { 1 };
        // QEMU's data start: data_off when it is valid, else right after the BAT.
        let min = min_data_off(&header);
        let d = u64::from(header.data_off);
        let data_start = if d == 0 || d < min || d > len / SECTOR {
            min
        } else {
            d
        } * SECTOR;
        let mut u = ParallelsUpdate {
            f,
            inuse_found: header.inuse,
            header,
            bat,
            refused,
            virtual_size: nb_sectors.saturating_mul(SECTOR),
            cluster_size,
            multiplier,
            data_start,
            marked: false,
            dirty: None,
            freed: Vec::new(),
            data_end: 0,
            qemu_data_end: 0,
        };
        u.data_end = u.bat_end();
        u.qemu_data_end = u.data_start;
        for i in 0..u.bat.len() {
            u.qemu_data_end = u.qemu_data_end.max(u.host(i) + cluster_size);
        }
        Ok(u)
    }

    /// The (device, inode) of the file.
    pub fn identity(&self) -> Result<(u64, u64)> {
        self.f.identity()
    }

    /// The virtual size.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// The cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    fn host(&self, i: usize) -> u64 {
        u64::from(self.bat[i]) * self.multiplier * SECTOR
    }

    /// The end of the last cluster the BAT references (at least the data start), rounded
    /// up to whole clusters in "WithouFreSpacExt" images, whose entries count clusters.
    fn bat_end(&self) -> u64 {
        let mut end = self.data_start;
        for i in 0..self.bat.len() {
            if self.bat[i] != 0 {
                end = end.max(self.host(i) + self.cluster_size);
            }
        }
        if self.multiplier > 1 {
            end = end.div_ceil(self.cluster_size) * self.cluster_size;
        }
        end
    }

    /// Refuses guest writes into what vimg cannot write correctly.
    pub fn check_writable(&self) -> Result<()> {
        if let Some(why) = &self.refused {
            return Err(Error::unsupported(format!(
                "vimg does not write into this parallels image: {why}"
            )));
        }
        if self.header.ext_off != 0 {
            return Err(Error::unsupported(
                "vimg does not write guest data into parallels images with a Format Extension (its dirty bitmaps would miss the writes)",
            ));
        }
        Ok(())
    }

    /// Whether QEMU's read-write open would repair the image first: the in-use flag set, a
    /// `data_off` outside the file or before the end of the BAT, or a BAT cluster past the
    /// end of the file (space leaked past the last cluster alone is not a reason; the
    /// repair, once it runs, gives that back too).
    fn needs_open_repair(&self) -> Result<bool> {
        if self.inuse_found == INUSE_OPEN {
            return Ok(true);
        }
        let size = self.f.len()?.div_ceil(SECTOR) * SECTOR;
        let d = u64::from(self.header.data_off);
        let min = min_data_off(&self.header);
        if !(d == 0 && self.header.magic == MAGIC_V1) && (d < min || d > size / SECTOR) {
            return Ok(true);
        }
        Ok(self.bat_end() > size)
    }

    /// Refuses what vimg cannot write correctly, then repairs an unclean image as QEMU's
    /// read-write open does (module documentation); returns the repair's report when one
    /// ran. Called before the first guest write.
    pub fn prepare_writes(&mut self) -> Result<Option<RepairReport>> {
        self.check_writable()?;
        if !self.needs_open_repair()? {
            return Ok(None);
        }
        let rep = self.repair(Repair::All)?;
        // QEMU's read-write open prints its repair's lines.
        for m in rep
            .before
            .messages
            .iter()
            .chain(rep.before.omitted_line().iter())
        {
            crate::notice::emit(m);
        }
        self.inuse_found = self.header.inuse;
        self.data_end = self.bat_end();
        if self.inuse_found == INUSE_OPEN || rep.before.check_errors != 0 {
            return Err(Error::corrupt(
                "Could not repair corrupted image: the parallels image is still unclean after its repair",
            ));
        }
        Ok(Some(rep))
    }

    fn mark(&mut self) -> Result<()> {
        if self.marked {
            return Ok(());
        }
        // No in-use flag on disk (module documentation): the writes are crash-ordered.
        self.marked = true;
        Ok(())
    }

    fn set_entry(&mut self, i: usize, v: u32) {
        self.bat[i] = v;
        self.dirty = Some(match self.dirty {
            None => (i, i),
            Some((a, z)) => (a.min(i), z.max(i)),
        });
    }

    fn range(&self, off: u64, len: u64) -> Result<u64> {
        let end = off
            .checked_add(len)
            .filter(|e| *e <= self.virtual_size)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "write of {len} bytes at {off:#x} past the end of the parallels image ({:#x} bytes)",
                    self.virtual_size
                ))
            })?;
        // A disk size larger than the BAT covers: refused before anything is written.
        if end > self.bat.len() as u64 * self.cluster_size {
            return Err(Error::unsupported(format!(
                "write of {len} bytes at {off:#x} past what the parallels BAT covers ({} clusters)",
                self.bat.len()
            )));
        }
        Ok(end)
    }

    /// A new cluster at the end of the data; returns its host offset and BAT value.
    fn new_cluster(&mut self) -> Result<(u64, u32)> {
        let at = self.data_end;
        let unit = self.multiplier * SECTOR;
        let v = u32::try_from(at / unit)
            .ok()
            .filter(|_| at.is_multiple_of(unit))
            .ok_or_else(|| {
                Error::unsupported("the parallels image would grow past what its BAT can address")
            })?;
        self.data_end = at + self.cluster_size;
        Ok((at, v))
    }

    /// Writes `data` at guest offset `off`; a new cluster's other bytes come from
    /// `backing` (none for a parallels image vimg opens) or are zeros.
    pub fn write_at(&mut self, off: u64, data: &[u8], backing: Option<&Image>) -> Result<()> {
        let end = self.range(off, data.len() as u64)?;
        self.mark()?;
        let cs = self.cluster_size;
        let mut pos = off;
        while pos < end {
            let c = (pos / cs) as usize;
            let within = pos % cs;
            let n = (cs - within).min(end - pos);
            let piece = &data[(pos - off) as usize..(pos - off + n) as usize];
            if c < self.bat.len() && self.bat[c] != 0 {
                let at = self.host(c) + within;
                self.f.write_at(piece, at)?;
            } else if c < self.bat.len() && backing.is_none() {
                // Zeros written only where the file has bytes: a header's huge cluster
                // size does not size the work.
                let zero_from = self.f.len()?;
                let (at, v) = self.new_cluster()?;
                self.f.write_new_unit(at, cs, within, piece, zero_from)?;
                self.set_entry(c, v);
            } else if c < self.bat.len() {
                let mut buf = vec![0u8; cs as usize];
                if let Some(b) = backing {
                    let g = c as u64 * cs;
                    let m = b.virtual_size().saturating_sub(g).min(cs) as usize;
                    if m > 0 {
                        b.read_at(&mut buf[..m], g)?;
                    }
                }
                buf[within as usize..(within + n) as usize].copy_from_slice(piece);
                let (at, v) = self.new_cluster()?;
                self.f.write_at(&buf, at)?;
                self.set_entry(c, v);
            } else {
                return Err(Error::corrupt(format!(
                    "guest cluster {c} is past the parallels BAT ({} entries)",
                    self.bat.len()
                )));
            }
            pos += n;
        }
        Ok(())
    }

    /// Makes `[off, off + len)` read as zeros: whole clusters unmapped, zeros written into
    /// the allocated parts of the others.
    pub fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        let end = self.range(off, len)?;
        self.mark()?;
        let cs = self.cluster_size;
        let zeros = vec![0u8; cs.min(len) as usize];
        let mut pos = off;
        while pos < end {
            let c = (pos / cs) as usize;
            let within = pos % cs;
            let n = (cs - within).min(end - pos);
            if c < self.bat.len() && self.bat[c] != 0 {
                if n == cs {
                    let h = self.host(c);
                    self.freed.push(h);
                    self.set_entry(c, 0);
                } else {
                    let at = self.host(c) + within;
                    self.f.write_at(&zeros[..n as usize], at)?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn write_dirty_bat(&mut self) -> Result<()> {
        let Some((first, last)) = self.dirty.take() else {
            return Ok(());
        };
        let mut bytes = vec![0u8; (last + 1 - first) * 4];
        write_bat(&self.bat[first..=last], &mut bytes);
        self.f
            .write_at(&bytes, HEADER_SIZE as u64 + 4 * first as u64)
    }

    /// Flushes the data, writes the changed BAT entries, flushes, gives back unmapped
    /// clusters and cuts the file after the last cluster in use.
    pub fn finish(&mut self) -> Result<()> {
        if !self.marked {
            return self.f.sync();
        }
        self.f.sync()?;
        self.write_dirty_bat()?;
        self.f.sync()?;
        let end = self.bat_end();
        for h in std::mem::take(&mut self.freed) {
            if h + self.cluster_size <= end {
                self.f.punch_hole(h, self.cluster_size)?;
            }
        }
        if self.f.len()? > end {
            self.f.set_len(end)?;
        }
        self.data_end = end;
        self.f.sync()?;
        self.marked = false;
        Ok(())
    }

    /// `check -r`: QEMU's checks and fixes (see the module documentation).
    pub fn repair(&mut self, mode: Repair) -> Result<RepairReport> {
        self.scan(Some(mode))
    }

    /// The check qemu-img runs after a repair ("Double checking the fixed image now..."):
    /// QEMU's check again on the same open image, without fixes, so it sees the end of
    /// the data the repair left in memory (a BAT cleared of clusters outside the image
    /// still ends where they ended). Writes nothing.
    pub fn check_after_repair(&mut self) -> Result<CheckReport> {
        Ok(self.scan(None)?.before)
    }

    fn scan(&mut self, mode: Option<Repair>) -> Result<RepairReport> {
        let fix_errors = mode == Some(Repair::All);
        let fix_leaks = mode.is_some();
        let pe = if fix_errors { "Repairing" } else { "ERROR" };
        let pl = if fix_leaks { "Repairing" } else { "ERROR" };
        let mut r = CheckReport::default();
        let mut rep = RepairReport::default();
        // QEMU sees the file's length in whole sectors.
        let size = self.f.len()?.div_ceil(SECTOR) * SECTOR;
        let cs = self.cluster_size;
        let mut header_changed = false;
        let mut data_off_fixed = false;
        let len_found = self.f.len()?;
        if self.header.inuse == INUSE_OPEN {
            r.corruption(format!("{pe} image was not closed correctly"));
            if fix_errors {
                rep.corruptions_fixed += 1;
                self.header.inuse = 0;
                header_changed = true;
            }
        }
        // data_off.
        let min_off = min_data_off(&self.header);
        let d = u64::from(self.header.data_off);
        let old_magic = self.header.magic == MAGIC_V1;
        if !(d == 0 && old_magic) && (d < min_off || d > size / SECTOR) {
            // The fixed data area must start inside the file, which then grows to it (as
            // QEMU's close grows it): refused before anything is written when a header's
            // huge cluster would make that far more than the file is.
            if fix_errors && min_off * SECTOR > grow_limit(len_found) {
                return Err(Error::unsupported(format!(
                    "vimg does not repair this parallels image: its data area would start at {:#x}, past twice the file's length ({len_found} bytes) plus 1 MiB",
                    min_off * SECTOR
                )));
            }
            r.corruption(format!("{pe} data_off field has incorrect value"));
            if fix_errors {
                self.header.data_off = min_off as u32;
                self.data_start = min_off * SECTOR;
                header_changed = true;
                data_off_fixed = true;
                rep.corruptions_fixed += 1;
            }
        }
        // Clusters outside the image.
        let mut high = 0u64;
        for i in 0..self.bat.len() {
            let off = self.host(i);
            if off + cs > size {
                r.corruption(format!("{pe} cluster {i} is outside image"));
                if fix_errors {
                    self.set_entry(i, 0);
                    rep.corruptions_fixed += 1;
                }
                continue;
            }
            high = high.max(off);
        }
        // QEMU's end of data moves to the last cluster inside the image; with none, it
        // stays where the open found it.
        let mut image_end = if high == 0 {
            self.qemu_data_end
        } else {
            high + cs
        };
        self.qemu_data_end = image_end;
        // Leaks past the last cluster.
        let mut cut = None;
        if size > image_end {
            let count = (size - image_end).div_ceil(cs);
            r.leaks += count;
            r.messages.push(format!(
                "{pl} space leaked at the end of the image {}",
                size - image_end
            ));
            if fix_leaks {
                cut = Some(image_end);
                rep.leaks_fixed += count;
            }
        }
        // Clusters referenced twice: copies for every entry but the first.
        let index = |off: u64, ds: u64| -> i64 { (off as i64 - ds as i64) / cs as i64 };
        let mut bsize = index(image_end, self.data_start);
        let mut copies: Vec<(usize, u64)> = Vec::new();
        if bsize > 0 {
            if image_end % cs != 0 {
                bsize += 1;
            }
            // The entries that share a cluster with an earlier one (in BAT order), found
            // by sorting: memory bounded by the BAT, not by the file.
            let mut claims: Vec<(i64, usize)> = (0..self.bat.len())
                .filter(|&i| self.bat[i] != 0)
                .map(|i| (index(self.host(i), self.data_start), i))
                .filter(|&(k, _)| k >= 0 && k < bsize)
                .collect();
            claims.sort_unstable();
            let mut dups: Vec<usize> = claims
                .windows(2)
                .filter(|w| w[0].0 == w[1].0)
                .map(|w| w[1].1)
                .collect();
            drop(claims);
            dups.sort_unstable();
            self.data_end = image_end;
            // QEMU's check fails ("Device or resource busy") when the last allocated entry
            // it looks at is a duplicate it does not fix.
            let mut busy = false;
            for i in 0..self.bat.len() {
                let off = self.host(i);
                if off == 0 {
                    continue;
                }
                let k = index(off, self.data_start);
                if k < 0 || k >= bsize {
                    continue;
                }
                busy = false;
                if dups.binary_search(&i).is_err() {
                    continue;
                }
                r.corruption(format!("{pe} duplicate offset in BAT entry {i}"));
                if !fix_errors {
                    busy = true;
                    continue;
                }
                let (at, v) = self.new_cluster()?;
                copies.push((i, off));
                let mut buf = vec![0u8; cs as usize];
                self.f.read_at(&mut buf, off)?;
                self.f.write_at(&buf, at)?;
                self.set_entry(i, v);
                image_end = image_end.max(at + cs);
                self.qemu_data_end = self.qemu_data_end.max(at + cs);
                rep.corruptions_fixed += 1;
            }
            if busy {
                r.check_errors += 1;
            }
        }
        // Statistics.
        let mut allocated = 0u64;
        let mut fragmented = 0u64;
        let mut prev = 0u64;
        for i in 0..self.bat.len() {
            let off = self.host(i);
            if off == 0 || off + cs > image_end {
                prev = 0;
                continue;
            }
            if prev != 0 && prev + cs != off {
                fragmented += 1;
            }
            prev = off;
            allocated += 1;
        }
        let some = |n: u64| (n != 0).then_some(n);
        r.total_clusters = some(self.bat.len() as u64);
        r.allocated_clusters = some(allocated);
        r.fragmented_clusters = some(fragmented);
        r.image_end_offset = Some(image_end);
        // Write: copies (done above) flushed, then header and BAT in one write, flushed,
        // then the file cut.
        if mode.is_none() {
            rep.before = r;
            return Ok(rep);
        }
        if !copies.is_empty() || self.dirty.is_some() || header_changed {
            self.f.sync()?;
            let mut all = vec![0u8; HEADER_SIZE + self.bat.len() * 4];
            self.header.write_to(&mut all[..HEADER_SIZE]);
            write_bat(&self.bat, &mut all[HEADER_SIZE..]);
            self.f.write_at(&all, 0)?;
            self.dirty = None;
            self.f.sync()?;
        }
        // A data offset set past the end of the file (a short file whose BAT ends before
        // the cluster the data area must start on): the file grows to it, so the header
        // the repair wrote is valid and a second check finds nothing to fix.
        if data_off_fixed && self.f.len()? < self.data_start {
            self.f.set_len(self.data_start)?;
            self.f.sync()?;
        }
        if let Some(c) = cut {
            // Copies went past the old end: keep them; and never into the header and BAT
            // (a BAT entry pointing inside them puts the "last cluster" there).
            let c = c
                .max(image_end)
                .max(HEADER_SIZE as u64 + 4 * self.bat.len() as u64);
            if self.f.len()? > c {
                self.f.set_len(c)?;
                self.f.sync()?;
            }
        }
        // QEMU's close leaves the file at its end of data: a BAT whose clusters outside
        // the image were cleared grows the file back to where they ended (the next check
        // finds that space leaked and gives it back), within a bound so a header cannot
        // make the repair create a file far larger than it found.
        let end = self.qemu_data_end;
        let len = self.f.len()?;
        if end > len && end <= grow_limit(len_found) {
            self.f.set_len(end)?;
            self.f.sync()?;
        }
        rep.before = r;
        Ok(rep)
    }
}

/// How long a repair may leave a file of `len` bytes when QEMU's end of data lies past
/// it: twice its length plus 1 MiB (the `repair` fuzz target's bound is three times
/// plus 1 MiB). Past that the file keeps its length, and a second check finds no leak
/// where QEMU's would.
fn grow_limit(len: u64) -> u64 {
    len.saturating_mul(2).saturating_add(1 << 20)
}

/// QEMU's smallest data offset in sectors: right after the BAT, on a cluster in
/// "WithouFreSpacExt" images.
fn min_data_off(h: &Header) -> u64 {
    let mut m = (HEADER_SIZE as u64 + 4 * u64::from(h.bat_entries)).div_ceil(SECTOR);
    if h.is_ext() {
        let t = u64::from(h.tracks.max(1));
        m = m.div_ceil(t) * t;
    }
    m
}

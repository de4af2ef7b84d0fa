//! Guest-data writes into an existing VMDK (`convert -n`, `commit` into a vmdk base,
//! `dd` into one), as QEMU's block/vmdk.c writes them (`vmdk_pwritev`,
//! `get_cluster_offset`, `vmdk_L2update`, `vmdk_write_cid`), made crash-safe:
//!
//! - monolithicSparse and twoGbMaxExtentSparse extents (hosted sparse, VMware Virtual Disk
//!   Format 1.1 "Hosted Sparse Extent Header"): a write into an allocated grain goes in
//!   place; an unallocated or zeroed grain gets a new grain at the end of its file
//!   (QEMU's `next_cluster_sector`: the file's length rounded up to a grain, then past
//!   every grain written), written whole (the rest from the backing chain, or zeros over
//!   a zeroed grain or without one). Its grain table entry is written later, after the
//!   grain data is flushed, in the grain table and in the redundant grain table (both
//!   directories, as `vmdk_L2update`). A grain table the directory lacks (QEMU cannot
//!   write there) is appended whole, flushed, and only then entered in the redundant and
//!   main directories.
//! - zero writes: with the zeroed-grain flag, a whole grain becomes a zeroed-grain entry
//!   (`VMDK_GTE_ZEROED`, even over an allocated grain, which then leaks as in QEMU); a part
//!   of a grain, or any zero write without the flag, writes zeros as data (QEMU's driver
//!   answers `-ENOTSUP` and the block layer writes zeros).
//! - monolithicFlat and twoGbMaxExtentFlat extents: plain writes at the extent's offset.
//! - streamOptimized as qemu-img creates it (tables at the start, compressed grains with
//!   markers): a grain is written once, compressed, at the end of the file; QEMU refuses a
//!   write into an allocated compressed grain ("Could not write to allocated cluster for
//!   streamOptimized") in the middle of an operation, so vimg refuses an image that has
//!   one before writing anything. A grain written in part is kept in memory until the
//!   writes move past it (QEMU would fail such a write: compressed writes must be whole
//!   grains), then written whole.
//! - the descriptor's `CID` gets a new random value before the first write (QEMU changes
//!   it on the first write of every open; children's `parentCID` are not changed), in
//!   QEMU's bytes (`vmdk_write_cid`: the line rewritten, the 10 KiB descriptor buffer
//!   written back, no further than the end of a descriptor file); vimg writes it first, so that a killed run never leaves changed data
//!   under the old CID.
//!
//! Grain table entries are gathered in memory and written in batches (`BATCH`), each
//! after the data it points at is flushed, and flushed before any directory entry that
//! points at a new table: a kill at any point leaves every grain old or new and at worst
//! leaked grains or tables.
//!
//! Refused before anything is written: what the reader refuses, images QEMU cannot write
//! right (a stream-optimized extent with its directory at the end (footer): QEMU drops the
//! writes; version 3 uncompressed extents, "VMDK version 3 must be read only"; COWD
//! (vmfsSparse) and seSparse extents; extents QEMU skips (not `RW`) or that read as zeros;
//! a descriptor whose CID line QEMU's rewrite would mangle), extent files that alias each
//! other, and grains past what a 32-bit grain table entry can address.

use std::collections::BTreeMap;
use std::path::Path;

use byteorder::{ByteOrder, LittleEndian as LE};

use super::descriptor::{Access, Descriptor, ExtentType};
use super::header::*;
use super::open::read_sparse_header;
use super::read::{Kind, VmdkReader};
use super::sparse::Flavor;
use crate::error::{Error, Result};
use crate::formats::inplace_file::UpdateFile;
use crate::formats::OpenContext;
use crate::gate::ExternalPolicy;
use crate::image::Image;
use crate::storage::Storage;

/// QEMU's descriptor buffer (`DESC_SIZE`: 20 sectors), read and written back whole by
/// `vmdk_write_cid`.
const DESC_SIZE: usize = 20 * 512;

/// Grain table entries gathered before they are written (each batch: flush, entries,
/// flush).
const BATCH: usize = 4096;

/// The first sector QEMU cannot allocate (`VMDK_EXTENT_MAX_SECTORS`); also what a 32-bit
/// grain table entry can name.
const MAX_SECTORS: u64 = 1 << 32;

fn unsupported(msg: impl Into<String>) -> Error {
    Error::unsupported(msg.into())
}

/// The CID rewrite, prepared at open and done before the first write.
#[derive(Debug)]
struct CidRewrite {
    /// Where QEMU's descriptor buffer starts in file 0.
    at: u64,
    /// The new buffer (QEMU's bytes).
    buf: Vec<u8>,
    /// Bytes of `buf` to write: up to 10 KiB of a descriptor file (QEMU's write, cut at
    /// the end of a shorter file), the embedded descriptor's area of a sparse file.
    len: usize,
}

/// One sparse (hosted) extent open for writing.
#[derive(Debug)]
struct USparse {
    file: usize,
    label: String,
    /// Guest bytes of the extent.
    len: u64,
    grain: u64,
    grain_sectors: u64,
    gtes: u64,
    gt_sectors: u64,
    gd: Vec<u32>,
    rgd: Option<Vec<u32>>,
    gd_at: u64,
    rgd_at: u64,
    zero_grain: bool,
    compressed: bool,
    /// Next free sector (QEMU's `next_cluster_sector`).
    next: u64,
    /// Grain table entries not written yet: table index -> entry index -> value.
    pending: BTreeMap<u64, BTreeMap<u64, u32>>,
    npending: usize,
    /// Tables appended (not on disk yet, not in the directories): index -> (table,
    /// redundant table) sectors.
    fresh: BTreeMap<u64, (u32, u32)>,
}

#[derive(Debug)]
enum UKind {
    Flat { file: usize, offset: u64 },
    Sparse(Box<USparse>),
}

#[derive(Debug)]
struct UExtent {
    start: u64,
    len: u64,
    kind: UKind,
}

/// A compressed grain written in part, kept until the writes move past it.
#[derive(Debug)]
struct StreamGrain {
    extent: usize,
    grain: u64,
    buf: Vec<u8>,
}

/// A VMDK open for guest-data writes.
#[derive(Debug)]
pub struct VmdkUpdate {
    files: Vec<UpdateFile>,
    extents: Vec<UExtent>,
    size: u64,
    cid: Option<CidRewrite>,
    stream: Option<StreamGrain>,
}

/// An entry as it reads: unallocated, zeroed, or at a sector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gte {
    Free,
    Zeroed,
    At(u64),
}

impl USparse {
    fn decode(&self, raw: u32) -> Gte {
        match raw {
            0 => Gte::Free,
            GTE_ZEROED if self.zero_grain => Gte::Zeroed,
            s => Gte::At(s.into()),
        }
    }

    /// Grain `g`'s entry: pending first, then the table on disk.
    fn entry(&self, f: &UpdateFile, g: u64) -> Result<Gte> {
        let (t, i) = (g / self.gtes, g % self.gtes);
        if let Some(v) = self.pending.get(&t).and_then(|m| m.get(&i)) {
            return Ok(self.decode(*v));
        }
        if self.fresh.contains_key(&t) {
            return Ok(Gte::Free);
        }
        let gt = self.gd[t as usize];
        if gt == 0 {
            return Ok(Gte::Free);
        }
        let mut b = [0u8; 4];
        f.read_at(&mut b, u64::from(gt) * SECTOR + i * 4)?;
        let e = self.decode(LE::read_u32(&b));
        if let Gte::At(s) = e {
            let flen = f.len()?;
            let need = if self.compressed { 1 } else { self.grain };
            let end = s.checked_mul(SECTOR).and_then(|x| x.checked_add(need));
            if end.is_none_or(|e| e > flen) {
                return Err(self.bad_entry(t, i, s, "grain past the end of the file"));
            }
        }
        Ok(e)
    }

    fn bad_entry(&self, t: u64, i: u64, v: u64, why: &str) -> Error {
        Error::corrupt(format!(
            "{} grain table {t} entry {i} is {v:#x}: {why} (changed since the image was opened?)",
            self.label
        ))
    }

    /// Takes `sectors` sectors at the end (QEMU's allocation), refused past what a
    /// grain table entry can name.
    fn take(&mut self, sectors: u64, align: bool) -> Result<u64> {
        let s = self.next;
        let end = s.saturating_add(sectors);
        if end > MAX_SECTORS {
            return Err(unsupported(format!(
                "{}: no room for another grain (the file would pass {MAX_SECTORS} sectors, what a grain table entry can address)",
                self.label
            )));
        }
        self.next = if align {
            end.next_multiple_of(self.grain_sectors)
        } else {
            end
        };
        Ok(s)
    }

    /// Records grain `g`'s new entry; a table the directory lacks is appended.
    fn set(&mut self, g: u64, v: u32) -> Result<()> {
        let t = g / self.gtes;
        if self.gd[t as usize] == 0 && !self.fresh.contains_key(&t) {
            let a = self.take(self.gt_sectors, true)?;
            let b = if self.rgd.is_some() {
                self.take(self.gt_sectors, true)?
            } else {
                0
            };
            self.fresh.insert(t, (a as u32, b as u32));
        }
        if self
            .pending
            .entry(t)
            .or_default()
            .insert(g % self.gtes, v)
            .is_none()
        {
            self.npending += 1;
        }
        Ok(())
    }

    /// Writes the gathered entries: data flushed first, then the tables (new ones whole),
    /// flushed, then the directory entries of new tables (redundant, then main), flushed.
    fn commit(&mut self, f: &mut UpdateFile) -> Result<()> {
        if self.npending == 0 && self.fresh.is_empty() {
            return Ok(());
        }
        f.sync()?;
        let gt_bytes = (self.gtes * 4) as usize;
        for (&t, m) in &self.pending {
            if let Some(&(a, b)) = self.fresh.get(&t) {
                let mut buf = vec![0u8; gt_bytes];
                for (&i, &v) in m {
                    LE::write_u32(&mut buf[(i * 4) as usize..], v);
                }
                f.write_at(&buf, u64::from(a) * SECTOR)?;
                if b != 0 {
                    f.write_at(&buf, u64::from(b) * SECTOR)?;
                }
                continue;
            }
            let (Some((&first, _)), Some((&last, _))) = (m.first_key_value(), m.last_key_value())
            else {
                continue;
            };
            // One write per table: the span from the first to the last changed entry,
            // the others as they are on disk.
            let gt = u64::from(self.gd[t as usize]) * SECTOR;
            let mut buf = vec![0u8; ((last - first + 1) * 4) as usize];
            f.read_at(&mut buf, gt + first * 4)?;
            for (&i, &v) in m {
                LE::write_u32(&mut buf[((i - first) * 4) as usize..], v);
            }
            f.write_at(&buf, gt + first * 4)?;
            if let Some(r) = &self.rgd {
                let rgt = u64::from(r[t as usize]);
                if rgt != 0 {
                    // The redundant table gets the same span of the main table's entries.
                    f.write_at(&buf, rgt * SECTOR + first * 4)?;
                }
            }
        }
        f.sync()?;
        if !self.fresh.is_empty() {
            for (&t, &(a, b)) in &self.fresh {
                let mut e = [0u8; 4];
                if let Some(r) = self.rgd.as_mut() {
                    LE::write_u32(&mut e, b);
                    f.write_at(&e, self.rgd_at + t * 4)?;
                    r[t as usize] = b;
                }
                LE::write_u32(&mut e, a);
                f.write_at(&e, self.gd_at + t * 4)?;
                self.gd[t as usize] = a;
            }
            f.sync()?;
        }
        self.pending.clear();
        self.fresh.clear();
        self.npending = 0;
        Ok(())
    }
}

/// QEMU's `vmdk_write_cid` on the descriptor buffer `desc` (NUL-terminated text, at most
/// [`DESC_SIZE`] bytes) with a new CID from the random `seed`: the first `CID` names the
/// value, everything from `parentCID` on follows it. `None` where that rewrite would not be the plain change of the `CID=`
/// line (no `parentCID`, or the first `CID` is not the start of the `CID=` line right
/// before `parentCID`).
fn rewrite_cid(desc: &[u8], seed: u32) -> Option<Vec<u8>> {
    let mut buf = desc.to_vec();
    buf.resize(DESC_SIZE, 0);
    buf[DESC_SIZE - 1] = 0;
    let text_end = buf.iter().position(|&b| b == 0)?;
    let text = &buf[..text_end];
    let find = |pat: &[u8]| text.windows(pat.len()).position(|w| w == pat);
    let parent = find(b"parentCID")?;
    let c = find(b"CID")?;
    // The plain case: "CID=<hex>\n" at a line start, right before the parentCID line.
    let line_start = c == 0 || text[c - 1] == b'\n';
    if !line_start || text.get(c + 3) != Some(&b'=') || c >= parent {
        return None;
    }
    let value = &text[c + 4..parent];
    let hex = value.strip_suffix(b"\n").unwrap_or(value);
    let hex = hex.strip_suffix(b"\r").unwrap_or(hex);
    if hex.is_empty() || hex.len() > 8 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    // A new value as long as the old one (the text keeps its length, so it always fits
    // where it was), never the old value.
    let old = u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
    let bits = 4 * hex.len() as u32;
    let mask = if bits >= 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    };
    let top = 1u32 << (bits - 4);
    let mut cid = seed & mask;
    if hex.len() > 1 && cid < top {
        cid |= top;
    }
    if cid == old {
        cid ^= 1;
        if cid == 0 {
            cid = 2;
        }
    }
    let tail = text[parent..].to_vec();
    let head = format!("{cid:x}\n");
    let mut out = buf[..c + 4].to_vec();
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(&tail);
    if out.len() >= DESC_SIZE {
        return None;
    }
    out.push(0);
    // What follows the new text's NUL stays as the buffer held it (QEMU's bytes).
    let n = out.len();
    if n < DESC_SIZE {
        out.extend_from_slice(&buf[n..]);
    }
    Some(out)
}

/// Opens an extent file the reader opened through the gate, read-write, checking that it
/// is the same file (device and inode).
fn open_extent(
    ctx: &OpenContext,
    field: &str,
    name: &str,
    reader_file: &dyn Storage,
) -> Result<UpdateFile> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = ctx.resolve(field, name)?;
    let shown = crate::escape::escape_control(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| Error::io(format_args!("open {field} '{shown}' for writing"), e))?;
    let m = file
        .metadata()
        .map_err(|e| Error::io(format_args!("stat {field} '{shown}'"), e))?;
    if !m.file_type().is_file() || reader_file.identity() != Some((m.dev(), m.ino())) {
        return Err(Error::msg(
            crate::error::ErrorKind::UnsafeReference,
            format!("{field} names '{shown}', which changed while it was being opened; nothing was written"),
        ));
    }
    Ok(UpdateFile::from_file(file, &path))
}

impl VmdkUpdate {
    /// Opens the VMDK at `path` read-write; the reader checks it first (every table, every
    /// extent through the gate under `policy`), then each extent file is opened for writing
    /// and checked to be the file the reader checked.
    pub fn open(path: &Path, policy: ExternalPolicy) -> Result<VmdkUpdate> {
        let (f0, storage) = UpdateFile::open(path)?;
        let ctx = OpenContext::new(Some(path), policy);
        let r = VmdkReader::open(storage.clone(), &ctx)?;
        let ct = r.create_type.as_str();
        if !matches!(
            ct,
            "monolithicSparse"
                | "streamOptimized"
                | "monolithicFlat"
                | "twoGbMaxExtentSparse"
                | "twoGbMaxExtentFlat"
        ) {
            return Err(unsupported(format!(
                "vimg writes into monolithicSparse, twoGbMaxExtentSparse, monolithicFlat, twoGbMaxExtentFlat and streamOptimized VMDK images only, not {ct}"
            )));
        }
        let sparse_file = r.files.len() == 1 && matches!(r.extents[0].kind, Kind::Sparse(_));
        // The descriptor as QEMU reads it for the CID (vmdk_write_cid: 0x200 in a sparse
        // file opened directly, else the descriptor file from 0).
        let (desc_at, desc_limit) = if sparse_file {
            let h = read_sparse_header(&*storage)?;
            if h.descriptor_offset != 1 || h.descriptor_size == 0 {
                return Err(unsupported(format!(
                    "the embedded descriptor is at sector {} ({} sectors); qemu-img rewrites the CID at sector 1, so vimg does not write into this image",
                    h.descriptor_offset, h.descriptor_size
                )));
            }
            (
                SECTOR,
                (h.descriptor_size * SECTOR).min(DESC_SIZE as u64) as usize,
            )
        } else {
            // QEMU's 10 KiB write stops at the end of a shorter descriptor file (which
            // keeps its length).
            (0, (storage.len() as usize).min(DESC_SIZE))
        };
        let mut desc = vec![0u8; DESC_SIZE];
        f0.read_at(&mut desc, desc_at)?;
        let new_cid = super::write::random_cid();
        let buf = rewrite_cid(&desc, new_cid).ok_or_else(|| {
            unsupported(
                "the descriptor has no 'CID=' line right before its 'parentCID' line; qemu-img's CID rewrite would mangle it, so vimg does not write into this image",
            )
        })?;
        let text_len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        // The new text must fit the area (a descriptor file may end without a NUL).
        if text_len > desc_limit || (sparse_file && text_len == desc_limit) {
            return Err(unsupported(
                "the descriptor with a new CID does not fit its area; vimg does not write into this image",
            ));
        }
        let cid = CidRewrite {
            at: desc_at,
            len: desc_limit,
            buf,
        };
        // Extent lines QEMU skips or reads differently: refused.
        if !sparse_file {
            let mut all = vec![0u8; storage.len() as usize];
            f0.read_at(&mut all, 0)?;
            let d = Descriptor::parse_bytes(&all)?;
            for (i, x) in d.extents.iter().enumerate() {
                if x.access != Access::Rw
                    || !matches!(
                        x.kind,
                        ExtentType::Flat | ExtentType::Sparse | ExtentType::Vmfs
                    )
                {
                    return Err(unsupported(format!(
                        "extent {}: vimg writes into RW FLAT, VMFS and SPARSE extents only, not {} {}",
                        i + 1,
                        x.access.as_str(),
                        x.kind.as_str()
                    )));
                }
            }
        }
        // Write handles: file 0 is the user's; the others are the extents the gate let the
        // reader open.
        let mut files = vec![f0];
        for (i, s) in r.files.iter().enumerate().skip(1) {
            let child = r
                .children
                .iter()
                .find(|c| c.file.0 as usize == i)
                .ok_or_else(|| Error::corrupt("an extent file has no name"))?;
            let field = child
                .name
                .strip_prefix("extents.")
                .and_then(|n| n.parse::<usize>().ok())
                .map(|n| format!("extent {}", n + 1))
                .unwrap_or_else(|| child.name.clone());
            files.push(open_extent(&ctx, &field, &child.stored_name, &**s)?);
        }
        // No file may back two extents (a write to one would change the other), nor be
        // the descriptor.
        let mut ids = Vec::new();
        for f in &files {
            let id = f.identity()?;
            if ids.contains(&id) {
                return Err(unsupported(
                    "two extents (or an extent and the descriptor) are one file; vimg does not write into this image",
                ));
            }
            ids.push(id);
        }
        let mut extents = Vec::with_capacity(r.extents.len());
        for e in &r.extents {
            let kind = match &e.kind {
                Kind::Zero => {
                    return Err(unsupported(
                        "vimg does not write into images with ZERO or NOACCESS extents",
                    ))
                }
                Kind::Flat { file, offset } => UKind::Flat {
                    file: file.0 as usize,
                    offset: *offset,
                },
                Kind::Sparse(s) => {
                    let p = s.params();
                    let fi = p.file.0 as usize;
                    let Flavor::Hosted {
                        compressed,
                        markers,
                        zero_grain,
                    } = p.flavor
                    else {
                        return Err(unsupported(format!(
                            "{}: vimg does not write into vmfsSparse (COWD) or seSparse extents",
                            p.label
                        )));
                    };
                    // The header as QEMU reads it for writing: a directory at the end is
                    // in the footer, which QEMU's appended grains would bury.
                    let mut first = [0u8; SparseHeader::LEN];
                    crate::storage::read_exact(
                        &*p.storage,
                        &mut first,
                        0,
                        format_args!("{} header", p.label),
                    )?;
                    let raw = SparseHeader::parse(&first, 0)?;
                    let h = read_sparse_header(&*p.storage)?;
                    if raw.gd_offset == GD_AT_END || raw.rgd_offset == GD_AT_END {
                        return Err(unsupported(format!(
                            "{}: a stream-optimized extent with its grain directory at the end (footer); qemu-img's writes into it are lost, so vimg refuses them",
                            p.label
                        )));
                    }
                    if h.version == 3 && !compressed {
                        return Err(unsupported("VMDK version 3 must be read only"));
                    }
                    if compressed && !markers {
                        return Err(unsupported(format!(
                            "{}: compressed grains without grain markers cannot be written",
                            p.label
                        )));
                    }
                    let flen = files[fi].len()?;
                    let rgd_at = if p.rgd.is_some() {
                        h.rgd_offset * SECTOR
                    } else {
                        0
                    };
                    let u = USparse {
                        file: fi,
                        label: p.label.clone(),
                        len: e.len,
                        grain: p.grain_sectors * SECTOR,
                        grain_sectors: p.grain_sectors,
                        gtes: p.gtes_per_gt,
                        gt_sectors: (p.gtes_per_gt * 4).div_ceil(SECTOR),
                        gd: p.gd.clone(),
                        rgd: p.rgd.clone(),
                        gd_at: h.gd_offset * SECTOR,
                        rgd_at,
                        zero_grain,
                        compressed,
                        next: flen.div_ceil(SECTOR).next_multiple_of(p.grain_sectors),
                        pending: BTreeMap::new(),
                        npending: 0,
                        fresh: BTreeMap::new(),
                    };
                    // Directories that disagree (a run killed between the two entries of a
                    // new table) are written as they are: the main directory decides, a
                    // redundant table is updated only where the redundant directory has
                    // one, and a table the main directory lacks is appended anew.
                    if compressed {
                        // QEMU fails a write into a compressed grain half-way through an
                        // operation; vimg refuses the image before writing.
                        // One read per grain table the directory names (each inside the
                        // file, checked by the reader): work bounded by the file.
                        let f = &files[fi];
                        let mut buf = vec![0u8; (u.gtes * 4) as usize];
                        for (t, &gt) in u.gd.iter().enumerate() {
                            if gt == 0 {
                                continue;
                            }
                            f.read_at(&mut buf, u64::from(gt) * SECTOR)?;
                            let used = buf
                                .chunks_exact(4)
                                .map(LE::read_u32)
                                .position(|v| !matches!(u.decode(v), Gte::Free | Gte::Zeroed));
                            if let Some(i) = used {
                                let g = t as u64 * u.gtes + i as u64;
                                return Err(unsupported(format!(
                                    "{}: grain {g} of this streamOptimized image is allocated; qemu-img cannot write over a compressed grain (\"Could not write to allocated cluster for streamOptimized\"), so vimg writes only into stream-optimized images without grains",
                                    u.label
                                )));
                            }
                        }
                    }
                    UKind::Sparse(Box::new(u))
                }
            };
            extents.push(UExtent {
                start: e.start,
                len: e.len,
                kind,
            });
        }
        // Flat extents of one file must not overlap (checked above: one file, one extent).
        Ok(VmdkUpdate {
            files,
            extents,
            size: r.size,
            cid: Some(cid),
            stream: None,
        })
    }

    /// The (device, inode) of the file the user named.
    pub fn identity(&self) -> Result<(u64, u64)> {
        self.files[0].identity()
    }

    /// The virtual size.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    /// The unit safe `rebase` compares and copies whole: the grain size (of the first
    /// sparse extent), 512 bytes for flat images.
    pub fn unit(&self) -> u64 {
        self.extents
            .iter()
            .find_map(|e| match &e.kind {
                UKind::Sparse(s) => Some(s.grain),
                UKind::Flat { .. } => None,
            })
            .unwrap_or(SECTOR)
    }

    fn range(&self, off: u64, len: u64) -> Result<u64> {
        off.checked_add(len)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "write of {len} bytes at {off:#x} past the end of the VMDK ({:#x} bytes)",
                    self.size
                ))
            })
    }

    /// The new CID, before the first write.
    fn touch(&mut self) -> Result<()> {
        if let Some(c) = self.cid.take() {
            self.files[0].write_at(&c.buf[..c.len], c.at)?;
            self.files[0].sync()?;
        }
        Ok(())
    }

    fn extent_index(&self, off: u64) -> Result<usize> {
        let i = self.extents.partition_point(|e| e.start + e.len <= off);
        if i < self.extents.len() {
            Ok(i)
        } else {
            Err(Error::corrupt(format!(
                "no extent covers guest offset {off:#x}"
            )))
        }
    }

    /// Writes `data` at guest offset `off`; the rest of a new grain comes from `backing`.
    pub fn write_at(&mut self, off: u64, data: &[u8], backing: Option<&Image>) -> Result<()> {
        let end = self.range(off, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        self.touch()?;
        let mut pos = off;
        while pos < end {
            let xi = self.extent_index(pos)?;
            let (start, xlen) = (self.extents[xi].start, self.extents[xi].len);
            let rel = pos - start;
            let piece_end = end.min(start + xlen);
            let bytes = &data[(pos - off) as usize..(piece_end - off) as usize];
            let (grain, compressed) = match &self.extents[xi].kind {
                UKind::Flat { file, offset } => {
                    let (file, at) = (*file, offset + rel);
                    self.files[file].write_at(bytes, at)?;
                    pos = piece_end;
                    continue;
                }
                UKind::Sparse(s) => (s.grain, s.compressed),
            };
            let within = rel % grain;
            let n = (grain - within).min(piece_end - pos);
            let g = rel / grain;
            let piece = &bytes[..n as usize];
            if compressed {
                self.stream_write(xi, g, within, piece, backing)?;
            } else {
                self.sparse_write(xi, g, within, piece, backing)?;
            }
            pos += n;
        }
        Ok(())
    }

    fn sparse(&mut self, xi: usize) -> Result<(&mut USparse, &mut UpdateFile, u64)> {
        let start = self.extents[xi].start;
        match self.extents.get_mut(xi).map(|e| &mut e.kind) {
            Some(UKind::Sparse(s)) => {
                let f = self
                    .files
                    .get_mut(s.file)
                    .ok_or_else(|| Error::corrupt("a sparse extent names an unknown file"))?;
                Ok((s, f, start))
            }
            _ => Err(Error::corrupt(format!("extent {} is not sparse", xi + 1))),
        }
    }

    /// The whole grain `g` of extent `xi` as it reads before a write into it: the backing
    /// chain's bytes for an unallocated grain, zeros for a zeroed one.
    fn grain_base(
        start: u64,
        grain: u64,
        g: u64,
        e: Gte,
        backing: Option<&Image>,
    ) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; grain as usize];
        if e == Gte::Free {
            if let Some(b) = backing {
                let at = start + g * grain;
                let m = b.virtual_size().saturating_sub(at).min(grain) as usize;
                if m > 0 {
                    b.read_at(&mut buf[..m], at)?;
                }
            }
        }
        Ok(buf)
    }

    fn sparse_write(
        &mut self,
        xi: usize,
        g: u64,
        within: u64,
        piece: &[u8],
        backing: Option<&Image>,
    ) -> Result<()> {
        let (s, f, start) = self.sparse(xi)?;
        match s.entry(f, g)? {
            Gte::At(sector) => f.write_at(piece, sector * SECTOR + within)?,
            e => {
                let mut buf = if piece.len() as u64 == s.grain {
                    vec![0u8; s.grain as usize]
                } else {
                    Self::grain_base(start, s.grain, g, e, backing)?
                };
                buf[within as usize..within as usize + piece.len()].copy_from_slice(piece);
                let sector = s.take(s.grain_sectors, false)?;
                f.write_at(&buf, sector * SECTOR)?;
                s.set(g, sector as u32)?;
                if s.npending >= BATCH {
                    s.commit(f)?;
                }
            }
        }
        Ok(())
    }

    /// A write into a compressed grain: gathered until the grain is whole or the writes
    /// move on.
    fn stream_write(
        &mut self,
        xi: usize,
        g: u64,
        within: u64,
        piece: &[u8],
        backing: Option<&Image>,
    ) -> Result<()> {
        if self
            .stream
            .as_ref()
            .is_some_and(|p| p.extent != xi || p.grain != g)
        {
            self.stream_flush()?;
        }
        if self.stream.is_none() {
            let (s, f, start) = self.sparse(xi)?;
            let e = s.entry(f, g)?;
            if let Gte::At(_) = e {
                return Err(Error::msg(
                    crate::error::ErrorKind::Io,
                    "Could not write to allocated cluster for streamOptimized",
                ));
            }
            let buf = Self::grain_base(start, s.grain, g, e, backing)?;
            self.stream = Some(StreamGrain {
                extent: xi,
                grain: g,
                buf,
            });
        }
        let (grain, ext_len) = {
            let (s, _, _) = self.sparse(xi)?;
            (s.grain, s.len)
        };
        let Some(p) = self.stream.as_mut() else {
            return Ok(());
        };
        p.buf[within as usize..within as usize + piece.len()].copy_from_slice(piece);
        // Complete once written up to the grain's end (or the extent's).
        let grain_end = ((g + 1) * grain).min(ext_len);
        if g * grain + within + piece.len() as u64 >= grain_end {
            self.stream_flush()?;
        }
        Ok(())
    }

    /// Writes the gathered compressed grain: marker and deflate data at the end of the
    /// file, its entry pending.
    fn stream_flush(&mut self) -> Result<()> {
        let Some(p) = self.stream.take() else {
            return Ok(());
        };
        let (s, f, _) = self.sparse(p.extent)?;
        let data_len = (s.len - p.grain * s.grain).min(s.grain) as usize;
        let max = (2 * s.grain) as usize - GRAIN_MARKER_LEN;
        let z = crate::codec::zlib_compress(&p.buf[..data_len], super::DEFLATE_LEVEL as i32, max)
            .ok_or_else(|| Error::invalid_argument("zlib compression of a grain failed"))?;
        let mut out = vec![0u8; GRAIN_MARKER_LEN + z.len()];
        GrainMarker {
            lba: (p.grain * s.grain) / SECTOR,
            size: z.len() as u32,
        }
        .write_to(&mut out);
        out[GRAIN_MARKER_LEN..].copy_from_slice(&z);
        let padded = (out.len() as u64).next_multiple_of(SECTOR);
        out.resize(padded as usize, 0);
        let sector = s.take(padded / SECTOR, false)?;
        f.write_at(&out, sector * SECTOR)?;
        s.set(p.grain, sector as u32)?;
        if s.npending >= BATCH {
            s.commit(f)?;
        }
        Ok(())
    }

    /// Makes `[off, off + len)` read as zeros (see the module documentation).
    pub fn write_zeroes(&mut self, off: u64, len: u64, backing: Option<&Image>) -> Result<()> {
        let end = self.range(off, len)?;
        if len == 0 {
            return Ok(());
        }
        self.touch()?;
        const STEP: u64 = 1 << 20;
        let mut pos = off;
        while pos < end {
            let xi = self.extent_index(pos)?;
            let (start, xlen) = (self.extents[xi].start, self.extents[xi].len);
            let rel = pos - start;
            let piece_end = end.min(start + xlen);
            let whole_grain = match &self.extents[xi].kind {
                UKind::Sparse(s) if s.zero_grain => {
                    let within = rel % s.grain;
                    (within == 0 && piece_end - pos >= s.grain).then_some(s.grain)
                }
                _ => None,
            };
            if let Some(grain) = whole_grain {
                if self.stream.is_some() {
                    self.stream_flush()?;
                }
                let (s, f, _) = self.sparse(xi)?;
                let g = rel / grain;
                match s.entry(f, g)? {
                    Gte::Zeroed => {}
                    Gte::At(_) if s.compressed => {
                        return Err(Error::msg(
                            crate::error::ErrorKind::Io,
                            "Could not write to allocated cluster for streamOptimized",
                        ))
                    }
                    _ => {
                        s.set(g, GTE_ZEROED)?;
                        if s.npending >= BATCH {
                            s.commit(f)?;
                        }
                    }
                }
                pos += grain;
                continue;
            }
            // Zeros as data, up to the next grain boundary (or a step of a flat extent).
            let n = match &self.extents[xi].kind {
                UKind::Sparse(s) => (s.grain - rel % s.grain).min(piece_end - pos),
                UKind::Flat { .. } => STEP.min(piece_end - pos),
            };
            let zeros = vec![0u8; n as usize];
            self.write_at(pos, &zeros, backing)?;
            pos += n;
        }
        Ok(())
    }

    /// Writes what is gathered (a compressed grain, grain table entries) and flushes
    /// every file.
    pub fn finish(&mut self) -> Result<()> {
        self.stream_flush()?;
        for xi in 0..self.extents.len() {
            if let UKind::Sparse(_) = self.extents[xi].kind {
                let (s, f, _) = self.sparse(xi)?;
                s.commit(f)?;
            }
        }
        for f in &mut self.files {
            f.sync()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_rewrite_is_qemus() {
        let d = b"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n";
        let out = rewrite_cid(d, 0xab).unwrap();
        let text_end = out.iter().position(|&b| b == 0).unwrap();
        // As long as the old value (the top digit set), never the old value.
        assert_eq!(
            &out[..text_end],
            b"# Disk DescriptorFile\nversion=1\nCID=100000ab\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n"
        );
        let same = rewrite_cid(d, 0x1234_5678).unwrap();
        assert_eq!(&same[36..44], b"12345679");
        let short = rewrite_cid(b"CID=a\nparentCID=ffffffff\n", 0x1234_567a).unwrap();
        assert_eq!(&short[..7], b"CID=b\np");
        assert_eq!(out.len(), DESC_SIZE);
        // The text keeps its length; what followed it stays.
        assert_eq!(text_end, d.len());
        let mut padded = b"CID=1234\nparentCID=ffffffff\n\0\n\0".to_vec();
        padded.resize(64, 7);
        let p = rewrite_cid(&padded, 5).unwrap();
        assert_eq!(&p[28..64], &padded[28..64]);
        // parentCID before CID, no parentCID, CID in a comment first: refused.
        assert!(rewrite_cid(b"parentCID=1\nCID=2\n", 1).is_none());
        assert!(rewrite_cid(b"CID=2\n", 1).is_none());
        assert!(rewrite_cid(b"# CID\nCID=2\nparentCID=1\n", 1).is_none());
        assert!(rewrite_cid(b"CID=2\nx=1\nparentCID=1\n", 1).is_none());
    }
}

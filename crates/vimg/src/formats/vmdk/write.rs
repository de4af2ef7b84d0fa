//! The vmdk writers, one per subformat family, all laid out as qemu-img lays them out
//! except stream-optimized, which follows VMware's stream layout:
//!
//! - monolithicSparse / twoGbMaxExtentSparse: header, embedded descriptor (20 sectors),
//!   redundant grain directory and its tables, grain directory and its tables, then grains
//!   in the order they are written (parallel, unordered). Tables are written at `finish`.
//! - streamOptimized: header with `gdOffset = GD_AT_END`, descriptor, then strictly in
//!   order: compressed grains with grain markers (compressed in `encode`, on every core),
//!   each grain table after its grains behind a grain-table marker, the grain directory,
//!   the footer and the end-of-stream marker. It never seeks back, so it streams to stdout.
//! - monolithicFlat / twoGbMaxExtentFlat: a descriptor file plus flat extent files.
//!
//! Extent files are created with [`Output::create_sibling`], named as qemu-img names them
//! (`NAME-flat.vmdk`, `NAME-s001.vmdk`, `NAME-f001.vmdk`), so the set appears at commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use byteorder::{ByteOrder, LittleEndian as LE};

use super::error::VmdkError;
use super::header::*;
use crate::codec;
use crate::error::{Error, Result};
use crate::output::{OutFile, Output};
use crate::writer::{EncodedUnit, ImageWriter, WriterCaps};

/// Grain size vimg (like qemu-img) writes: 128 sectors.
pub const GRAIN_SECTORS: u64 = 128;
/// Grain size in bytes.
pub const GRAIN: u64 = GRAIN_SECTORS * SECTOR;
/// Entries per grain table.
pub const GTES: u64 = 512;
/// Sectors reserved for the embedded descriptor.
pub const DESC_SECTORS: u64 = 20;
/// Size of each extent of the twoGbMaxExtent subformats.
pub const SPLIT_SIZE: u64 = 0x8000_0000;
/// libdeflate level for stream-optimized grains: within 5% of qemu-img's (zlib level 6)
/// output size on text-like and binary data, at a fraction of its time. On the issue 6
/// workload (small.raw: 96 MiB random + 96 MiB text, qemu-img 130973696 bytes, 8.6 s), wall
/// time and size ratio: libdeflate 1: 0.81 s, 1.033 (but about +14% on the text alone);
/// 3: 1.29 s, 1.018; 4: 1.38 s, 1.017; 6: ~2.3 s, 1.005; zlib-rs 4 (before): 1.90 s, 1.016.
pub const DEFLATE_LEVEL: u32 = 4;

/// The subformats vimg writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subformat {
    /// One sparse file with an embedded descriptor.
    MonolithicSparse,
    /// A descriptor and one flat file.
    MonolithicFlat,
    /// A descriptor and 2 GiB sparse extents.
    TwoGbSparse,
    /// A descriptor and 2 GiB flat extents.
    TwoGbFlat,
    /// One compressed, stream-ordered sparse file.
    StreamOptimized,
}

impl Subformat {
    /// Parses qemu-img's name.
    pub fn parse(s: &str) -> Option<Subformat> {
        Some(match s {
            "monolithicSparse" => Subformat::MonolithicSparse,
            "monolithicFlat" => Subformat::MonolithicFlat,
            "twoGbMaxExtentSparse" => Subformat::TwoGbSparse,
            "twoGbMaxExtentFlat" => Subformat::TwoGbFlat,
            "streamOptimized" => Subformat::StreamOptimized,
            _ => return None,
        })
    }

    /// qemu-img's name.
    pub fn name(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbFlat => "twoGbMaxExtentFlat",
            Subformat::StreamOptimized => "streamOptimized",
        }
    }

    /// Flat subformats.
    pub fn flat(self) -> bool {
        matches!(self, Subformat::MonolithicFlat | Subformat::TwoGbFlat)
    }

    /// Split subformats.
    pub fn split(self) -> bool {
        matches!(self, Subformat::TwoGbSparse | Subformat::TwoGbFlat)
    }
}

/// Checked creation settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Subformat.
    pub subformat: Subformat,
    /// `ddb.adapterType`.
    pub adapter: String,
    /// `ddb.virtualHWVersion`.
    pub hwversion: String,
    /// `ddb.toolsVersion`.
    pub toolsversion: String,
    /// Zeroed-grain entries.
    pub zeroed_grain: bool,
    /// Virtual size, rounded up to a sector.
    pub size: u64,
    /// Delta link: the parent's name as given and its CID.
    pub parent: Option<(String, u32)>,
}

/// The layout of one hosted sparse extent as qemu-img lays it out.
#[derive(Clone, Copy, Debug)]
pub struct SparseLayout {
    /// Capacity in sectors.
    pub capacity: u64,
    /// Grain tables.
    pub gt_count: u64,
    /// Sectors of the grain directory.
    pub gd_sectors: u64,
    /// Redundant directory sector.
    pub rgd: u64,
    /// Directory sector.
    pub gd: u64,
    /// First grain sector.
    pub grain_offset: u64,
}

/// Sectors per grain table.
const GT_SECTORS: u64 = GTES * 4 / SECTOR;

impl SparseLayout {
    /// The layout for an extent of `bytes` bytes.
    pub fn new(bytes: u64) -> SparseLayout {
        let capacity = bytes.div_ceil(SECTOR);
        let grains = capacity.div_ceil(GRAIN_SECTORS);
        let gt_count = grains.div_ceil(GTES);
        let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
        let rgd = 1 + DESC_SECTORS;
        let gd = rgd + gd_sectors + GT_SECTORS * gt_count;
        let grain_offset =
            (gd + gd_sectors + GT_SECTORS * gt_count).div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS;
        SparseLayout {
            capacity,
            gt_count,
            gd_sectors,
            rgd,
            gd,
            grain_offset,
        }
    }
}

/// The descriptor text qemu-img writes.
pub fn descriptor_text(s: &Settings, cid: u32, extent_lines: &str) -> String {
    let heads: u64 = if s.adapter == "ide" { 16 } else { 255 };
    let cylinders = s.size / (63 * heads * SECTOR);
    // As qemu-img: the parent line, when there is one, takes the blank line's place.
    let (parent_cid, parent_line) = match &s.parent {
        Some((name, pcid)) => (*pcid, format!("parentFileNameHint=\"{name}\"")),
        None => (0xffff_ffff, String::new()),
    };
    format!(
        "# Disk DescriptorFile\nversion=1\nCID={cid:x}\nparentCID={parent_cid:x}\ncreateType=\"{}\"\n{parent_line}\n\
         # Extent description\n{extent_lines}\n# The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"{}\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"{heads}\"\nddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"{}\"\nddb.toolsVersion = \"{}\"\n",
        s.subformat.name(),
        s.hwversion,
        s.adapter,
        s.toolsversion
    )
}

pub(super) fn random_cid() -> u32 {
    let b = *uuid::Uuid::new_v4().as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// `NAME.EXT` -> (`NAME`, `.EXT`), as qemu-img splits the target name.
pub fn split_name(file_name: &str) -> (String, String) {
    match file_name.rfind('.') {
        Some(i) => (file_name[..i].to_string(), file_name[i..].to_string()),
        None => (file_name.to_string(), String::new()),
    }
}

fn sparse_header(
    l: &SparseLayout,
    version: u32,
    flags: u32,
    gd: u64,
    rgd: u64,
    compress: u16,
) -> SparseHeader {
    SparseHeader {
        version,
        flags,
        capacity: l.capacity,
        grain_size: GRAIN_SECTORS,
        descriptor_offset: 1,
        descriptor_size: DESC_SECTORS,
        num_gtes_per_gt: GTES as u32,
        rgd_offset: rgd,
        gd_offset: gd,
        overhead: l.grain_offset,
        unclean_shutdown: 0,
        newline_check: NEWLINE_CHECK,
        compress_algorithm: compress,
    }
}

/// One hosted sparse extent being written (monolithicSparse or one twoGbMaxExtentSparse
/// piece): grains are appended; grain tables live in memory only for the tables touched.
struct SparseFile {
    file: OutFile,
    layout: SparseLayout,
    next: AtomicU64,
    tables: Mutex<HashMap<u64, Box<[u32]>>>,
}

impl SparseFile {
    fn create(
        file: OutFile,
        bytes: u64,
        zeroed_grain: bool,
        descriptor: Option<&str>,
    ) -> Result<SparseFile> {
        let layout = SparseLayout::new(bytes);
        let mut flags = FLAG_NL_DETECT | FLAG_RGD;
        if zeroed_grain {
            flags |= FLAG_ZERO_GRAIN;
        }
        let h = sparse_header(
            &layout,
            if zeroed_grain { 2 } else { 1 },
            flags,
            layout.gd,
            layout.rgd,
            COMPRESSION_NONE,
        );
        let mut head = vec![0u8; ((1 + DESC_SECTORS) * SECTOR) as usize];
        h.write_to(&mut head);
        if let Some(d) = descriptor {
            if d.len() > (DESC_SECTORS * SECTOR) as usize {
                return Err(
                    VmdkError::Argument("descriptor does not fit 20 sectors".into()).into(),
                );
            }
            head[512..512 + d.len()].copy_from_slice(d.as_bytes());
        }
        file.write_all_at(&head, 0)?;
        file.set_len(layout.grain_offset * SECTOR)?;
        Ok(SparseFile {
            file,
            layout,
            next: AtomicU64::new(layout.grain_offset),
            tables: Mutex::new(HashMap::new()),
        })
    }

    fn set_entries(&self, first_grain: u64, values: impl Iterator<Item = u32>) -> Result<()> {
        let mut t = self
            .tables
            .lock()
            .map_err(|_| Error::msg(crate::ErrorKind::Io, "grain table lock poisoned"))?;
        for (i, v) in values.enumerate() {
            let g = first_grain + i as u64;
            let gt = t
                .entry(g / GTES)
                .or_insert_with(|| vec![0u32; GTES as usize].into_boxed_slice());
            gt[(g % GTES) as usize] = v;
        }
        Ok(())
    }

    /// Reserves grains for `len` bytes at extent-relative `offset` (see
    /// [`ImageWriter::allocate`]): grains are placed in the order they are reserved.
    fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        let grains = len.div_ceil(GRAIN);
        let sector = self
            .next
            .fetch_add(grains * GRAIN_SECTORS, Ordering::SeqCst);
        if sector + grains * GRAIN_SECTORS > u64::from(u32::MAX) {
            return Err(VmdkError::Argument(
                "a sparse extent cannot hold more than 2 TiB of grains".into(),
            )
            .into());
        }
        self.set_entries(
            offset / GRAIN,
            (0..grains).map(|i| (sector + i * GRAIN_SECTORS) as u32),
        )
    }

    /// The first sector of `grains` grains from `first_grain` when [`SparseFile::allocate`]
    /// reserved them as one run.
    fn reserved(&self, first_grain: u64, grains: u64) -> Result<Option<u64>> {
        let t = self
            .tables
            .lock()
            .map_err(|_| Error::msg(crate::ErrorKind::Io, "grain table lock poisoned"))?;
        let entry = |g: u64| t.get(&(g / GTES)).map_or(0, |gt| gt[(g % GTES) as usize]);
        let first = u64::from(entry(first_grain));
        if first <= u64::from(GTE_ZEROED) {
            return Ok(None);
        }
        let run =
            (0..grains).all(|i| u64::from(entry(first_grain + i)) == first + i * GRAIN_SECTORS);
        Ok(run.then_some(first))
    }

    /// Writes whole grains (the last may be short at the end of the extent) at
    /// extent-relative `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let grains = (data.len() as u64).div_ceil(GRAIN);
        if let Some(sector) = self.reserved(offset / GRAIN, grains)? {
            self.file.write_all_at(data, sector * SECTOR)?;
            return Ok(());
        }
        let sector = self
            .next
            .fetch_add(grains * GRAIN_SECTORS, Ordering::SeqCst);
        let end = sector + grains * GRAIN_SECTORS;
        if end > u64::from(u32::MAX) {
            return Err(VmdkError::Argument(
                "a sparse extent cannot hold more than 2 TiB of grains".into(),
            )
            .into());
        }
        self.file.write_all_at(data, sector * SECTOR)?;
        self.set_entries(
            offset / GRAIN,
            (0..grains).map(|i| (sector + i * GRAIN_SECTORS) as u32),
        )
    }

    fn finish(self) -> Result<()> {
        let l = self.layout;
        let end = self.next.load(Ordering::SeqCst);
        let tables = self
            .tables
            .into_inner()
            .map_err(|_| Error::msg(crate::ErrorKind::Io, "grain table lock poisoned"))?;
        // Both directories point at preallocated tables, as qemu-img's do.
        for (dir, first) in [(l.rgd, l.rgd + l.gd_sectors), (l.gd, l.gd + l.gd_sectors)] {
            let mut gd = vec![0u8; (l.gd_sectors * SECTOR) as usize];
            for i in 0..l.gt_count {
                LE::write_u32(&mut gd[(i * 4) as usize..], (first + i * GT_SECTORS) as u32);
            }
            self.file.write_all_at(&gd, dir * SECTOR)?;
            let mut keys: Vec<&u64> = tables.keys().collect();
            keys.sort_unstable();
            let mut buf = vec![0u8; (GT_SECTORS * SECTOR) as usize];
            for k in keys {
                for (i, v) in tables[k].iter().enumerate() {
                    LE::write_u32(&mut buf[i * 4..], *v);
                }
                self.file
                    .write_all_at(&buf, (first + k * GT_SECTORS) * SECTOR)?;
            }
        }
        self.file.set_len(end * SECTOR)?;
        Ok(())
    }
}

/// monolithicSparse and twoGbMaxExtentSparse.
pub struct SparseWriter {
    extents: Vec<SparseFile>,
    extent_size: u64,
    size: u64,
    zeroed_grain: bool,
    descriptor: Option<(OutFile, String)>,
}

impl SparseWriter {
    /// Creates the files.
    pub fn create(out: &Output, s: &Settings) -> Result<SparseWriter> {
        let base = out
            .main_path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image.vmdk".into());
        let cid = random_cid();
        if s.subformat == Subformat::MonolithicSparse {
            let main = out.create_main()?;
            if main.is_stream() {
                // Its tables are written last, ahead of the grains: refuse now rather than
                // after streaming the data.
                return Err(Error::unsupported(
                    "monolithicSparse vmdk cannot be written to a stream; use subformat=streamOptimized",
                ));
            }
            let line = format!("RW {} SPARSE \"{base}\"\n", s.size / SECTOR);
            let desc = descriptor_text(s, cid, &line);
            let f = SparseFile::create(main, s.size, s.zeroed_grain, Some(&desc))?;
            return Ok(SparseWriter {
                extents: vec![f],
                extent_size: s.size.max(1),
                size: s.size,
                zeroed_grain: s.zeroed_grain,
                descriptor: None,
            });
        }
        let main = out.create_main()?;
        let (prefix, postfix) = split_name(&base);
        let mut lines = String::new();
        let mut extents = Vec::new();
        let mut done = 0;
        let mut idx = 1;
        while done < s.size {
            let n = (s.size - done).min(SPLIT_SIZE);
            let name = format!("{prefix}-s{idx:03}{postfix}");
            let f = out.create_sibling(&name)?;
            extents.push(SparseFile::create(f, n, s.zeroed_grain, None)?);
            lines.push_str(&format!("RW {} SPARSE \"{name}\"\n", n.div_ceil(SECTOR)));
            done += n;
            idx += 1;
        }
        let desc = descriptor_text(s, cid, &lines);
        Ok(SparseWriter {
            extents,
            extent_size: SPLIT_SIZE,
            size: s.size,
            zeroed_grain: s.zeroed_grain,
            descriptor: Some((main, desc)),
        })
    }
}

/// Splits `[offset, offset + len)` at multiples of `extent_size`: (extent, relative
/// offset, start in the buffer, length).
fn pieces(
    offset: u64,
    len: u64,
    extent_size: u64,
) -> impl Iterator<Item = (usize, u64, usize, usize)> {
    let mut pos = offset;
    let end = offset + len;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let idx = pos / extent_size;
        let rel = pos % extent_size;
        let n = (extent_size - rel).min(end - pos);
        let item = (idx as usize, rel, (pos - offset) as usize, n as usize);
        pos += n;
        Some(item)
    })
}

impl ImageWriter for SparseWriter {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            unit: GRAIN,
            ordered: false,
            encodes: false,
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<bool> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::invalid_argument(
                "write past the end of the vmdk image",
            ));
        }
        for (i, rel, _, n) in pieces(offset, len, self.extent_size) {
            self.extents
                .get(i)
                .ok_or_else(|| Error::invalid_argument("write past the last extent"))?
                .allocate(rel, n as u64)?;
        }
        Ok(true)
    }

    fn write(&self, offset: u64, data: &[u8], _encoded: &[EncodedUnit]) -> Result<()> {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(Error::invalid_argument(
                "write past the end of the vmdk image",
            ));
        }
        for (i, rel, at, n) in pieces(offset, data.len() as u64, self.extent_size) {
            let f = self
                .extents
                .get(i)
                .ok_or_else(|| Error::invalid_argument("write past the last extent"))?;
            f.write(rel, &data[at..at + n])?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        for (i, rel, _, n) in pieces(offset, len, self.extent_size) {
            let f = self
                .extents
                .get(i)
                .ok_or_else(|| Error::invalid_argument("write past the last extent"))?;
            let n = n as u64;
            if self.zeroed_grain && rel % GRAIN == 0 {
                let whole = n / GRAIN;
                f.set_entries(rel / GRAIN, (0..whole).map(|_| GTE_ZEROED))?;
                let tail = n % GRAIN;
                if tail > 0 {
                    f.write(rel + whole * GRAIN, &vec![0u8; tail as usize])?;
                }
            } else {
                let zeros = vec![0u8; GRAIN as usize];
                let mut p = 0;
                while p < n {
                    let k = (n - p).min(GRAIN);
                    f.write(rel + p, &zeros[..k as usize])?;
                    p += k;
                }
            }
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let me = *self;
        for f in me.extents {
            f.finish()?;
        }
        if let Some((file, desc)) = me.descriptor {
            file.write_all_at(desc.as_bytes(), 0)?;
            file.set_len(desc.len() as u64)?;
        }
        Ok(())
    }
}

/// monolithicFlat and twoGbMaxExtentFlat.
pub struct FlatWriter {
    files: Vec<OutFile>,
    extent_size: u64,
    size: u64,
    descriptor: (OutFile, String),
}

impl FlatWriter {
    /// Creates the descriptor and the flat files.
    pub fn create(out: &Output, s: &Settings) -> Result<FlatWriter> {
        let base = out
            .main_path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image.vmdk".into());
        let (prefix, postfix) = split_name(&base);
        let main = out.create_main()?;
        let extent_size = if s.subformat.split() {
            SPLIT_SIZE
        } else {
            s.size.max(1)
        };
        let mut files = Vec::new();
        let mut lines = String::new();
        let mut done = 0;
        let mut idx = 1;
        while done < s.size {
            let n = (s.size - done).min(extent_size);
            let name = if s.subformat.split() {
                format!("{prefix}-f{idx:03}{postfix}")
            } else {
                format!("{prefix}-flat{postfix}")
            };
            let f = out.create_sibling(&name)?;
            f.set_len(n)?;
            // As qemu's file protocol creates a file: its first 4 KiB written (allocated).
            f.write_all_at(&[0; 4096][..n.min(4096) as usize], 0)?;
            files.push(f);
            lines.push_str(&format!("RW {} FLAT \"{name}\" 0\n", n.div_ceil(SECTOR)));
            done += n;
            idx += 1;
        }
        let desc = descriptor_text(s, random_cid(), &lines);
        Ok(FlatWriter {
            files,
            extent_size,
            size: s.size,
            descriptor: (main, desc),
        })
    }
}

impl ImageWriter for FlatWriter {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            unit: SECTOR,
            ordered: false,
            encodes: false,
        }
    }

    /// Every byte has its fixed place: nothing to allocate, writes may run in any order.
    fn allocate(&self, _offset: u64, _len: u64) -> Result<bool> {
        Ok(true)
    }

    fn write(&self, offset: u64, data: &[u8], _encoded: &[EncodedUnit]) -> Result<()> {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(Error::invalid_argument(
                "write past the end of the vmdk image",
            ));
        }
        for (i, rel, at, n) in pieces(offset, data.len() as u64, self.extent_size) {
            let f = self
                .files
                .get(i)
                .ok_or_else(|| Error::invalid_argument("write past the last extent"))?;
            f.write_all_at(&data[at..at + n], rel)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        for (i, rel, _, n) in pieces(offset, len, self.extent_size) {
            if let Some(f) = self.files.get(i) {
                f.zero_range(rel, n as u64)?;
            }
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let (file, desc) = &self.descriptor;
        file.write_all_at(desc.as_bytes(), 0)?;
        file.set_len(desc.len() as u64)?;
        Ok(())
    }
}

/// What the stream writer has placed so far.
struct StreamState {
    /// Next free sector.
    pos: u64,
    /// The grain table being filled, and its index.
    gt: Option<(u64, Box<[u32]>)>,
    /// Grain table sectors, per directory entry (0 = none written).
    gd: Vec<u32>,
}

/// streamOptimized: VMware's stream layout, written strictly in order.
pub struct StreamWriter {
    file: OutFile,
    layout: SparseLayout,
    size: u64,
    zeroed_grain: bool,
    state: Mutex<StreamState>,
}

/// First grain sector of a stream (64 KiB: header, descriptor, padding).
const STREAM_OVERHEAD: u64 = 128;

impl StreamWriter {
    fn flags(zeroed_grain: bool) -> u32 {
        FLAG_NL_DETECT
            | FLAG_COMPRESSED
            | FLAG_MARKERS
            | if zeroed_grain { FLAG_ZERO_GRAIN } else { 0 }
    }

    /// Writes the header and descriptor.
    pub fn create(out: &Output, s: &Settings) -> Result<StreamWriter> {
        let base = out
            .main_path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image.vmdk".into());
        let layout = SparseLayout::new(s.size);
        if layout.gt_count > crate::limits::MAX_TABLE_BYTES / 4 {
            return Err(VmdkError::Argument(format!(
                "a streamOptimized image of {} bytes is too large",
                s.size
            ))
            .into());
        }
        let file = out.create_main()?;
        StreamWriter::with_file(file, &base, s)
    }

    /// A stream writer over an already created main file named `base`.
    pub(crate) fn with_file(file: OutFile, base: &str, s: &Settings) -> Result<StreamWriter> {
        let layout = SparseLayout::new(s.size);
        let mut h = sparse_header(
            &layout,
            3,
            Self::flags(s.zeroed_grain),
            GD_AT_END,
            0,
            COMPRESSION_DEFLATE,
        );
        h.overhead = STREAM_OVERHEAD;
        let line = format!("RW {} SPARSE \"{base}\"\n", s.size / SECTOR);
        let desc = descriptor_text(s, random_cid(), &line);
        let mut head = vec![0u8; ((1 + DESC_SECTORS) * SECTOR) as usize];
        h.write_to(&mut head);
        if desc.len() > (DESC_SECTORS * SECTOR) as usize {
            return Err(VmdkError::Argument("descriptor does not fit 20 sectors".into()).into());
        }
        head[512..512 + desc.len()].copy_from_slice(desc.as_bytes());
        file.write_all_at(&head, 0)?;
        Ok(StreamWriter {
            file,
            layout,
            size: s.size,
            zeroed_grain: s.zeroed_grain,
            state: Mutex::new(StreamState {
                pos: STREAM_OVERHEAD,
                gt: None,
                gd: vec![0; layout.gt_count as usize],
            }),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, StreamState>> {
        self.state
            .lock()
            .map_err(|_| Error::msg(crate::ErrorKind::Io, "stream state poisoned"))
    }

    /// Writes the current grain table (marker + table) if it has entries.
    fn flush_gt(&self, st: &mut StreamState) -> Result<()> {
        let Some((idx, gt)) = st.gt.take() else {
            return Ok(());
        };
        if gt.iter().all(|&v| v == 0) {
            return Ok(());
        }
        let mut buf = vec![0u8; ((1 + GT_SECTORS) * SECTOR) as usize];
        Marker {
            num_sectors: GT_SECTORS,
            size: 0,
            kind: MARKER_GT,
        }
        .write_to(&mut buf);
        for (i, v) in gt.iter().enumerate() {
            LE::write_u32(&mut buf[512 + i * 4..], *v);
        }
        self.file.write_all_at(&buf, st.pos * SECTOR)?;
        let slot = st
            .gd
            .get_mut(idx as usize)
            .ok_or_else(|| Error::invalid_argument("grain past the end of the stream"))?;
        *slot = u32::try_from(st.pos + 1)
            .map_err(|_| VmdkError::Argument("stream exceeds 2 TiB".into()))?;
        st.pos += 1 + GT_SECTORS;
        Ok(())
    }

    /// Points guest grain `g` at `value`, moving to its grain table first.
    fn set(&self, st: &mut StreamState, g: u64, value: u32) -> Result<()> {
        let idx = g / GTES;
        if st.gt.as_ref().is_some_and(|(i, _)| *i != idx) {
            if st.gt.as_ref().is_some_and(|(i, _)| *i > idx) {
                return Err(Error::invalid_argument(
                    "streamOptimized output needs data in ascending order",
                ));
            }
            self.flush_gt(st)?;
        }
        let (_, gt) = st
            .gt
            .get_or_insert_with(|| (idx, vec![0u32; GTES as usize].into_boxed_slice()));
        gt[(g % GTES) as usize] = value;
        Ok(())
    }

    fn encode_grain(g: u64, data: &[u8]) -> Result<Vec<u8>> {
        // The disk is a whole number of sectors: a source that ends mid-sector is padded,
        // so the last grain decodes to what readers expect.
        let padded;
        let data = if !data.len().is_multiple_of(SECTOR as usize) {
            let mut v = data.to_vec();
            v.resize(data.len().next_multiple_of(SECTOR as usize), 0);
            padded = v;
            &padded[..]
        } else {
            data
        };
        // Random-looking data does not compress: zlib at any level ends up storing it, so
        // a cheap look at the first 4 KiB decides, and such grains are stored (level 0)
        // at memcpy speed, the same size qemu-img's level 6 gives them.
        let probe = &data[..data.len().min(4096)];
        let level = match codec::deflate(probe, 1, 15, true, probe.len() * 2 + 64) {
            Some(p) if p.len() * 100 >= probe.len() * 97 => 0,
            _ => DEFLATE_LEVEL,
        };
        let z = if level == 0 {
            codec::deflate(data, 0, 15, true, data.len() * 2 + 1024)
        } else {
            codec::zlib_compress(data, DEFLATE_LEVEL as i32, data.len() * 2 + 1024)
        }
        .ok_or_else(|| Error::invalid_argument("zlib compression of a grain failed"))?;
        let total = (GRAIN_MARKER_LEN + z.len()).div_ceil(SECTOR as usize) * SECTOR as usize;
        let mut out = vec![0u8; total];
        GrainMarker {
            lba: g * GRAIN_SECTORS,
            size: z.len() as u32,
        }
        .write_to(&mut out);
        out[GRAIN_MARKER_LEN..GRAIN_MARKER_LEN + z.len()].copy_from_slice(&z);
        Ok(out)
    }
}

impl ImageWriter for StreamWriter {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            unit: GRAIN,
            ordered: true,
            encodes: true,
        }
    }

    fn encode(&self, offset: u64, data: &[u8]) -> Result<Vec<EncodedUnit>> {
        data.chunks(GRAIN as usize)
            .enumerate()
            .map(|(i, c)| Ok(Some(Self::encode_grain(offset / GRAIN + i as u64, c)?)))
            .collect()
    }

    fn write(&self, offset: u64, data: &[u8], encoded: &[EncodedUnit]) -> Result<()> {
        if !offset.is_multiple_of(GRAIN)
            || offset
                .checked_add(data.len() as u64)
                .is_none_or(|e| e > self.size)
        {
            return Err(Error::invalid_argument(
                "streamOptimized write out of place",
            ));
        }
        let mut st = self.lock()?;
        for (i, chunk) in data.chunks(GRAIN as usize).enumerate() {
            let g = offset / GRAIN + i as u64;
            let owned;
            let bytes = match encoded.get(i) {
                Some(Some(b)) => b.as_slice(),
                _ => {
                    owned = Self::encode_grain(g, chunk)?;
                    owned.as_slice()
                }
            };
            // Entering a new grain table writes the previous one first, which moves `pos`.
            self.set(&mut st, g, 0)?;
            let here = u32::try_from(st.pos)
                .map_err(|_| VmdkError::Argument("stream exceeds 2 TiB".into()))?;
            self.set(&mut st, g, here)?;
            self.file.write_all_at(bytes, st.pos * SECTOR)?;
            st.pos += bytes.len() as u64 / SECTOR;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if !self.zeroed_grain {
            let zeros = vec![0u8; GRAIN as usize];
            let mut p = offset;
            let end = offset + len;
            while p < end {
                let n = (end - p).min(GRAIN);
                self.write(p, &zeros[..n as usize], &[])?;
                p += n;
            }
            return Ok(());
        }
        let mut st = self.lock()?;
        let first = offset / GRAIN;
        for g in first..(offset + len).div_ceil(GRAIN) {
            self.set(&mut st, g, GTE_ZEROED)?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let mut st = self.lock()?;
        self.flush_gt(&mut st)?;
        let l = self.layout;
        // Grain directory marker and directory.
        let gd_bytes = (l.gd_sectors * SECTOR) as usize;
        let mut buf = vec![0u8; 512 + gd_bytes];
        Marker {
            num_sectors: l.gd_sectors,
            size: 0,
            kind: MARKER_GD,
        }
        .write_to(&mut buf);
        for (i, v) in st.gd.iter().enumerate() {
            LE::write_u32(&mut buf[512 + i * 4..], *v);
        }
        let gd_sector = st.pos + 1;
        self.file.write_all_at(&buf, st.pos * SECTOR)?;
        st.pos += 1 + l.gd_sectors;
        // Footer marker, footer (the header with the directory's place), end of stream.
        let mut tail = vec![0u8; 1536];
        Marker {
            num_sectors: 1,
            size: 0,
            kind: MARKER_FOOTER,
        }
        .write_to(&mut tail);
        let mut h = sparse_header(
            &l,
            3,
            Self::flags(self.zeroed_grain),
            gd_sector,
            0,
            COMPRESSION_DEFLATE,
        );
        h.overhead = STREAM_OVERHEAD;
        h.write_to(&mut tail[512..]);
        self.file.write_all_at(&tail, st.pos * SECTOR)?;
        st.pos += 3;
        self.file.set_len(st.pos * SECTOR)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_qemu_img() {
        // qemu-img create -f vmdk x 8M: rgd 21, gd 26, grains from 128.
        let l = SparseLayout::new(8 << 20);
        assert_eq!((l.rgd, l.gd, l.grain_offset, l.gt_count), (21, 26, 128, 1));
        // 10 GiB: 320 tables, 3 directory sectors.
        let l = SparseLayout::new(10 << 30);
        assert_eq!(l.gt_count, 320);
        assert_eq!(l.gd_sectors, 3);
        assert_eq!(l.gd, 21 + 3 + 320 * 4);
    }

    /// streamOptimized written to a one-pass stream (as to stdout) by the copy engine with
    /// several workers: every write lands in order, and the bytes read back as the source.
    #[test]
    fn stream_writer_streams() {
        use crate::engine::{copy, CopyOptions};
        use crate::formats::OpenContext;
        use crate::image::{Image, OpenOptions};
        use crate::mapping::ImageReader;
        use crate::storage::MemStorage;
        use std::io::Write;
        use std::sync::Arc;

        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let size = (70u64 << 20) + 1536;
        let mut raw = vec![0u8; size as usize];
        for (i, b) in raw[..3 << 20].iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        raw[(40 << 20) + 100..(40 << 20) + 9000].fill(0x5a);
        let n = raw.len();
        raw[n - 700..].fill(0xee);
        let src = Image::open_storage(
            Arc::new(MemStorage::new(raw.clone())),
            None,
            &OpenOptions::with_format(Some(crate::Format::Raw)),
        )
        .unwrap();
        let buf = Buf::default();
        let file = OutFile::stream(Box::new(buf.clone()), "-");
        let s = Settings {
            subformat: Subformat::StreamOptimized,
            adapter: "ide".into(),
            hwversion: "4".into(),
            toolsversion: "2147483647".into(),
            zeroed_grain: false,
            size,
            parent: None,
        };
        let w: Box<dyn ImageWriter> =
            Box::new(StreamWriter::with_file(file.clone(), "s.vmdk", &s).unwrap());
        let opts = CopyOptions {
            workers: 4,
            ..CopyOptions::default()
        };
        copy(&src, &*w, &opts).unwrap();
        w.finish().unwrap();
        file.sync().unwrap();
        let bytes = buf.0.lock().unwrap().clone();
        let ctx = OpenContext::new(None, crate::ExternalPolicy::SameFolder);
        let r =
            super::super::VmdkReader::open(Arc::new(MemStorage::new(bytes.clone())), &ctx).unwrap();
        assert_eq!(r.virtual_size(), size);
        let back = Image::open_storage(
            Arc::new(MemStorage::new(bytes)),
            None,
            &OpenOptions::default(),
        )
        .unwrap();
        let mut out = vec![0u8; n];
        back.read_at(&mut out, 0).unwrap();
        assert!(out == raw);
    }

    #[test]
    fn names_split_like_qemu() {
        assert_eq!(split_name("a.vmdk"), ("a".into(), ".vmdk".into()));
        assert_eq!(split_name("a.b.vmdk"), ("a.b".into(), ".vmdk".into()));
        assert_eq!(split_name("disk"), ("disk".into(), String::new()));
        let v: Vec<_> = pieces(SPLIT_SIZE - 512, 1024, SPLIT_SIZE).collect();
        assert_eq!(v, vec![(0, SPLIT_SIZE - 512, 0, 512), (1, 0, 512, 512)]);
    }
}

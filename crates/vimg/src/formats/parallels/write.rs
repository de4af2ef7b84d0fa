//! The Parallels writer: the expanding "WithouFreSpacExt" image `qemu-img create -f
//! parallels` and `qemu-img convert -O parallels` write.
//!
//! Layout: the 64-byte header, the BAT, zero padding to the first cluster boundary (the
//! data offset), then data clusters. Clusters are appended in the order their first data
//! arrives; the writer asks for data in ascending guest order, so the file is the same
//! for any thread count and matches qemu-img's layout. Header and BAT are written at
//! `finish`, so the writer cannot write to a stream.

use std::sync::Mutex;

use super::error::ParallelsError;
use super::header::{write_bat, Header, HEADER_SIZE, HEADS, MAGIC_V2, SECTOR, SEC_IN_CYL, VERSION};
use super::open::MAX_TRACKS;
use crate::error::{Error, ErrorKind, Result};
use crate::limits;
use crate::output::OutFile;
use crate::writer::{EncodedUnit, ImageWriter, WriterCaps};

/// QEMU's bound: a disk of at most 2^32 clusters, a cluster below `i64::MAX / 2^32`.
const MAX_IMAGE_FACTOR: u64 = 1 << 32;

/// The layout of a new image: the header, and where the data area starts.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The header.
    pub header: Header,
    /// Virtual size in bytes (rounded up to sectors).
    pub size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// First byte of the data area.
    pub data_start: u64,
}

/// The layout `qemu-img create -f parallels` gives an image of `size` bytes with
/// `cluster_size`-byte clusters (both rounded up to sectors first, as QEMU does), or
/// QEMU's error.
pub fn layout(size: u64, cluster_size: u64) -> Result<Layout, ParallelsError> {
    let round = |v: u64| v.checked_next_multiple_of(SECTOR);
    let size = round(size).ok_or_else(|| {
        ParallelsError::Option("Image size is too large for this cluster size".into())
    })?;
    let cs = round(cluster_size)
        .ok_or_else(|| ParallelsError::Option("Cluster size is too large".into()))?;
    if cs >= i64::MAX as u64 / MAX_IMAGE_FACTOR {
        return Err(ParallelsError::Option("Cluster size is too large".into()));
    }
    if size >= MAX_IMAGE_FACTOR * cs {
        return Err(ParallelsError::Option(
            "Image size is too large for this cluster size".into(),
        ));
    }
    let tracks = cs / SECTOR;
    if tracks > u64::from(MAX_TRACKS) {
        // QEMU writes it, then cannot open it ("Too big cluster").
        return Err(ParallelsError::Option(format!(
            "Cluster size {cs} is too large: QEMU reads clusters of at most {} bytes",
            u64::from(MAX_TRACKS) * SECTOR
        )));
    }
    let bat_entries = size.div_ceil(cs);
    let bat_end = HEADER_SIZE as u64 + 4 * bat_entries;
    let data_start = bat_end.div_ceil(cs) * cs;
    let header = Header {
        magic: MAGIC_V2,
        version: VERSION,
        heads: HEADS,
        cylinders: (size / SECTOR / u64::from(HEADS) / SEC_IN_CYL) as u32,
        tracks: tracks as u32,
        bat_entries: bat_entries as u32,
        nb_sectors: size / SECTOR,
        inuse: 0,
        data_off: u32::try_from(data_start / SECTOR).map_err(|_| {
            ParallelsError::Option("Image size is too large for this cluster size".into())
        })?,
        flags: 0,
        ext_off: 0,
    };
    Ok(Layout {
        header,
        size,
        cluster_size: cs,
        data_start,
    })
}

/// The unit the copy engine aligns writes to (see `caps`).
const ZERO_UNIT: u64 = 4096;

struct Alloc {
    bat: Vec<u32>,
    allocated: u32,
}

/// Writes an expanding Parallels image.
pub struct ParallelsWriter {
    file: OutFile,
    layout: Layout,
    alloc: Mutex<Alloc>,
}

impl ParallelsWriter {
    /// A Parallels image of `size` bytes with `cluster_size`-byte clusters into `file`.
    pub fn new(file: OutFile, size: u64, cluster_size: u64) -> Result<ParallelsWriter> {
        let layout = layout(size, cluster_size)?;
        if file.is_stream() {
            return Err(Error::unsupported(
                "a Parallels image keeps its BAT in front of the data and cannot be written to a stream",
            ));
        }
        let n = u64::from(layout.header.bat_entries);
        limits::check_table_bytes("Parallels BAT", n * 4)?;
        let w = ParallelsWriter {
            file,
            alloc: Mutex::new(Alloc {
                bat: vec![0; n as usize],
                allocated: 0,
            }),
            layout,
        };
        Ok(w)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Alloc>> {
        self.alloc
            .lock()
            .map_err(|_| Error::msg(ErrorKind::Io, "Parallels writer lock poisoned"))
    }

    /// File offset of cluster `cluster`'s data, allocating it when `allocate`.
    fn cluster_data(&self, cluster: usize, allocate: bool) -> Result<Option<u64>> {
        let cs = self.layout.cluster_size;
        let mut a = self.lock()?;
        let entry = a.bat.get(cluster).copied().ok_or_else(|| {
            Error::invalid_argument(format!("cluster {cluster} is past the end of the image"))
        })?;
        let unit = if entry != 0 {
            entry
        } else if !allocate {
            return Ok(None);
        } else {
            // BAT entries count clusters from the start of the file.
            let e = u64::from(a.allocated) + self.layout.data_start / cs;
            let e = u32::try_from(e)
                .map_err(|_| Error::msg(ErrorKind::Io, "Parallels BAT entry overflow"))?;
            a.bat[cluster] = e;
            a.allocated += 1;
            e
        };
        Ok(Some(u64::from(unit) * cs))
    }

    fn check(&self, offset: u64, len: u64) -> Result<u64> {
        offset
            .checked_add(len)
            .filter(|e| *e <= self.layout.size)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "write of {len} bytes at {offset:#x} past the end of the image ({:#x} bytes)",
                    self.layout.size
                ))
            })
    }
}

impl ImageWriter for ParallelsWriter {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            // qemu-img convert skips zeros in 4 KiB-aligned runs (its default -S 4k):
            // with clusters below 4 KiB (or not a power of two) a finer unit would leave
            // unallocated some clusters qemu-img allocates.
            unit: ZERO_UNIT,
            ordered: true,
            encodes: false,
        }
    }

    fn write(&self, offset: u64, data: &[u8], _encoded: &[EncodedUnit]) -> Result<()> {
        let end = self.check(offset, data.len() as u64)?;
        let cs = self.layout.cluster_size;
        let mut pos = offset;
        while pos < end {
            let in_cluster = pos % cs;
            let n = (cs - in_cluster).min(end - pos);
            let host = self
                .cluster_data((pos / cs) as usize, true)?
                .ok_or_else(|| Error::msg(ErrorKind::Io, "Parallels cluster allocation failed"))?;
            let from = (pos - offset) as usize;
            self.file
                .write_all_at(&data[from..from + n as usize], host + in_cluster)?;
            pos += n;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let end = self
            .check(offset, 0)?
            .saturating_add(len)
            .min(self.layout.size);
        let cs = self.layout.cluster_size;
        let mut pos = offset;
        while pos < end {
            let in_cluster = pos % cs;
            let n = (cs - in_cluster).min(end - pos);
            // Clusters never written already read as zero.
            if let Some(host) = self.cluster_data((pos / cs) as usize, false)? {
                self.file.zero_range(host + in_cluster, n)?;
            }
            pos += n;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let a = self.lock()?;
        let mut meta = vec![0u8; (HEADER_SIZE + 4 * a.bat.len()).next_multiple_of(SECTOR as usize)];
        self.layout.header.write_to(&mut meta);
        write_bat(&a.bat, &mut meta[HEADER_SIZE..]);
        self.file.write_all_at(&meta, 0)?;
        let end = self.layout.data_start + u64::from(a.allocated) * self.layout.cluster_size;
        self.file.set_len(end)
    }
}

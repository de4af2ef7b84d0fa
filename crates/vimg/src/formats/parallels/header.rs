//! The Parallels on-disk structures, as QEMU's docs/interop/parallels.txt defines them, all
//! little-endian:
//!
//! - [`Header`]: the 64-byte image header ("Header");
//! - the BAT: one u32 per cluster right after the header, the cluster's file offset in
//!   sectors ("WithoutFreeSpace") or in clusters ("WithouFreSpacExt"), 0 for a cluster never
//!   written ("BAT");
//! - [`ExtHeader`], [`FeatureHeader`] and [`DirtyBitmap`]: the Format Extension cluster and
//!   its feature sections ("Format Extension", "Dirty bitmaps feature").

use byteorder::{ByteOrder, LittleEndian as LE};

use super::error::ParallelsError;

/// Size of the image header.
pub const HEADER_SIZE: usize = 64;
/// Sector size: BAT entries and header offsets count these.
pub const SECTOR: u64 = 512;
/// "WithoutFreeSpace": BAT entries in sectors, `nb_sectors` limited to 32 bits.
pub const MAGIC_V1: [u8; 16] = *b"WithoutFreeSpace";
/// "WithouFreSpacExt": BAT entries in clusters, what QEMU writes.
pub const MAGIC_V2: [u8; 16] = *b"WithouFreSpacExt";
/// The only header version.
pub const VERSION: u32 = 2;
/// `in_use` while software has the image open read/write (an unclean image when found).
pub const INUSE_OPEN: u32 = 0x746f_6e59;
/// `in_use` of an image closed cleanly ("v2.1").
pub const INUSE_CLOSED: u32 = 0x312e_3276;
/// Heads QEMU writes into the (unused) geometry.
pub const HEADS: u32 = 16;
/// Sectors per cylinder QEMU assumes for the geometry.
pub const SEC_IN_CYL: u64 = 32;
/// QEMU's default cluster size, 1 MiB.
pub const DEFAULT_CLUSTER_SIZE: u64 = 1 << 20;
/// Format Extension magic (u64 at 0 of the extension cluster).
pub const EXT_MAGIC: u64 = 0xab23_4cef_23dc_ea87;
/// Size of the extension header: magic and MD5 checksum.
pub const EXT_HEADER_SIZE: usize = 24;
/// Size of a feature section header.
pub const FEATURE_HEADER_SIZE: usize = 24;
/// Feature magic: end of features.
pub const FEATURE_END: u64 = 0;
/// Feature magic: dirty bitmap.
pub const FEATURE_DIRTY_BITMAP: u64 = 0x2038_5fae_252c_b34a;
/// Feature flag: the file must not be changed by software that cannot load the feature.
pub const FEATURE_NECESSARY: u64 = 1;
/// Size of the fixed part of a dirty bitmap feature (before its L1 table).
pub const DIRTY_BITMAP_SIZE: usize = 32;

/// The image header (first 64 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 0x00 [`MAGIC_V1`] or [`MAGIC_V2`].
    pub magic: [u8; 16],
    /// 0x10 [`VERSION`].
    pub version: u32,
    /// 0x14 guest geometry: heads.
    pub heads: u32,
    /// 0x18 guest geometry: cylinders.
    pub cylinders: u32,
    /// 0x1c cluster size in sectors.
    pub tracks: u32,
    /// 0x20 BAT entries (disk size in clusters).
    pub bat_entries: u32,
    /// 0x24 disk size in sectors (only the low 32 bits for [`MAGIC_V1`]).
    pub nb_sectors: u64,
    /// 0x2c [`INUSE_OPEN`], [`INUSE_CLOSED`] or 0.
    pub inuse: u32,
    /// 0x30 start of the data area in sectors (0: right after the BAT, v1 only).
    pub data_off: u32,
    /// 0x34 flags (bit 0: empty image).
    pub flags: u32,
    /// 0x38 Format Extension cluster offset in sectors (0: none).
    pub ext_off: u64,
}

impl Header {
    /// Parses the first [`HEADER_SIZE`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<Header, ParallelsError> {
        if b.len() < HEADER_SIZE {
            return Err(ParallelsError::TooShort {
                len: b.len() as u64,
            });
        }
        let mut magic = [0u8; 16];
        magic.copy_from_slice(&b[..16]);
        Ok(Header {
            magic,
            version: LE::read_u32(&b[0x10..]),
            heads: LE::read_u32(&b[0x14..]),
            cylinders: LE::read_u32(&b[0x18..]),
            tracks: LE::read_u32(&b[0x1c..]),
            bat_entries: LE::read_u32(&b[0x20..]),
            nb_sectors: LE::read_u64(&b[0x24..]),
            inuse: LE::read_u32(&b[0x2c..]),
            data_off: LE::read_u32(&b[0x30..]),
            flags: LE::read_u32(&b[0x34..]),
            ext_off: LE::read_u64(&b[0x38..]),
        })
    }

    /// Writes the header into the first [`HEADER_SIZE`] bytes of `b`.
    pub fn write_to(&self, b: &mut [u8]) {
        b[..16].copy_from_slice(&self.magic);
        b[0x10..0x14].copy_from_slice(&self.version.to_le_bytes());
        b[0x14..0x18].copy_from_slice(&self.heads.to_le_bytes());
        b[0x18..0x1c].copy_from_slice(&self.cylinders.to_le_bytes());
        b[0x1c..0x20].copy_from_slice(&self.tracks.to_le_bytes());
        b[0x20..0x24].copy_from_slice(&self.bat_entries.to_le_bytes());
        b[0x24..0x2c].copy_from_slice(&self.nb_sectors.to_le_bytes());
        b[0x2c..0x30].copy_from_slice(&self.inuse.to_le_bytes());
        b[0x30..0x34].copy_from_slice(&self.data_off.to_le_bytes());
        b[0x34..0x38].copy_from_slice(&self.flags.to_le_bytes());
        b[0x38..0x40].copy_from_slice(&self.ext_off.to_le_bytes());
    }

    /// True for "WithouFreSpacExt" (BAT entries in clusters).
    pub fn is_ext(&self) -> bool {
        self.magic == MAGIC_V2
    }
}

/// Parses `n` BAT entries from `b`.
pub fn parse_bat(b: &[u8], n: usize) -> Vec<u32> {
    b.chunks_exact(4)
        .take(n)
        .map(|c| LE::read_u32(&c[0..]))
        .collect()
}

/// Writes `bat` into `b` (which holds at least `4 * bat.len()` bytes).
pub fn write_bat(bat: &[u32], b: &mut [u8]) {
    for (c, v) in b.chunks_exact_mut(4).zip(bat) {
        c.copy_from_slice(&v.to_le_bytes());
    }
}

/// The head of the Format Extension cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtHeader {
    /// 0x00 [`EXT_MAGIC`].
    pub magic: u64,
    /// 0x08 MD5 of the cluster from byte 24 on.
    pub checksum: [u8; 16],
}

impl ExtHeader {
    /// Parses the first [`EXT_HEADER_SIZE`] bytes of `b` (at least that long).
    pub fn parse(b: &[u8]) -> ExtHeader {
        let mut checksum = [0u8; 16];
        checksum.copy_from_slice(&b[8..24]);
        ExtHeader {
            magic: LE::read_u64(&b[0..]),
            checksum,
        }
    }

    /// Writes it into the first [`EXT_HEADER_SIZE`] bytes of `b`.
    pub fn write_to(&self, b: &mut [u8]) {
        b[..8].copy_from_slice(&self.magic.to_le_bytes());
        b[8..24].copy_from_slice(&self.checksum);
    }
}

/// The header of one feature section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureHeader {
    /// 0x00 feature magic ([`FEATURE_END`], [`FEATURE_DIRTY_BITMAP`]).
    pub magic: u64,
    /// 0x08 flags ([`FEATURE_NECESSARY`], bit 1 TRANSIT).
    pub flags: u64,
    /// 0x10 bytes of feature data that follow.
    pub data_size: u32,
    /// 0x14 unused.
    pub unused: u32,
}

impl FeatureHeader {
    /// Parses the first [`FEATURE_HEADER_SIZE`] bytes of `b` (at least that long).
    pub fn parse(b: &[u8]) -> FeatureHeader {
        FeatureHeader {
            magic: LE::read_u64(&b[0..]),
            flags: LE::read_u64(&b[8..]),
            data_size: LE::read_u32(&b[16..]),
            unused: LE::read_u32(&b[20..]),
        }
    }

    /// Writes it into the first [`FEATURE_HEADER_SIZE`] bytes of `b`.
    pub fn write_to(&self, b: &mut [u8]) {
        b[..8].copy_from_slice(&self.magic.to_le_bytes());
        b[8..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..20].copy_from_slice(&self.data_size.to_le_bytes());
        b[20..24].copy_from_slice(&self.unused.to_le_bytes());
    }
}

/// The fixed part of a dirty bitmap feature; its L1 table (`l1_size` u64 entries) follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// 0x00 bitmap size in sectors (the disk size).
    pub size: u64,
    /// 0x08 identifier (a UUID).
    pub id: [u8; 16],
    /// 0x18 sectors per bit, a power of two.
    pub granularity: u32,
    /// 0x1c L1 table entries.
    pub l1_size: u32,
}

impl DirtyBitmap {
    /// Parses the first [`DIRTY_BITMAP_SIZE`] bytes of `b` (at least that long).
    pub fn parse(b: &[u8]) -> DirtyBitmap {
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[8..24]);
        DirtyBitmap {
            size: LE::read_u64(&b[0..]),
            id,
            granularity: LE::read_u32(&b[24..]),
            l1_size: LE::read_u32(&b[28..]),
        }
    }

    /// Writes it into the first [`DIRTY_BITMAP_SIZE`] bytes of `b`.
    pub fn write_to(&self, b: &mut [u8]) {
        b[..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..24].copy_from_slice(&self.id);
        b[24..28].copy_from_slice(&self.granularity.to_le_bytes());
        b[28..32].copy_from_slice(&self.l1_size.to_le_bytes());
    }
}

/// Reads u64 `i` of an L1 table held in `b`.
pub fn l1_entry(b: &[u8], i: usize) -> u64 {
    LE::read_u64(&b[i * 8..])
}

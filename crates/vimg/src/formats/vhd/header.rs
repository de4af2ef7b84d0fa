//! The VHD on-disk structures, as the Microsoft "Virtual Hard Disk Image Format
//! Specification" (October 2006, version 1.0) defines them: the hard disk footer ("Hard Disk
//! Footer Format"), the dynamic disk header ("Dynamic Disk Header Format") with its eight
//! parent locator entries, the block allocation table and the per-block sector bitmaps
//! ("Block Allocation Table and Data Blocks").
//!
//! Every field is big-endian. Each structure parses from and writes to its exact on-disk
//! bytes, reserved bytes included, so parse → write is byte-identical even for images whose
//! checksums are wrong. Parsing checks only what identifies the structure (its size and its
//! cookie); the reader validates the values.

use byteorder::{BigEndian as BE, ByteOrder};

use super::error::VhdError;

/// Bytes per sector; VHD's only sector size.
pub const SECTOR: u64 = 512;

/// Size of the hard disk footer (and of its copy at the start of dynamic disks).
pub const FOOTER_SIZE: usize = 512;

/// Size of the dynamic disk header.
pub const DYN_HEADER_SIZE: usize = 1024;

/// "conectix": the footer cookie (Connectix wrote the first Virtual PC).
pub const FOOTER_COOKIE: [u8; 8] = *b"conectix";

/// "cxsparse": the dynamic disk header cookie.
pub const DYN_COOKIE: [u8; 8] = *b"cxsparse";

/// Footer feature bit: the disk is temporary (a candidate for deletion on shutdown).
pub const FEATURE_TEMPORARY: u32 = 0x1;

/// Footer feature bit that the specification says must always be set.
pub const FEATURE_RESERVED: u32 = 0x2;

/// File format version 1.0 (footer "File Format Version", dynamic header "Header Version").
pub const VERSION_1_0: u32 = 0x0001_0000;

/// Footer "Data Offset" of a fixed disk: no further structure. The specification says
/// 0xFFFFFFFF, but Microsoft's tools expect all 64 bits set, and so does everyone else.
pub const NO_DATA_OFFSET: u64 = u64::MAX;

/// Disk type: fixed (data, then the footer).
pub const DISK_TYPE_FIXED: u32 = 2;
/// Disk type: dynamic (blocks allocated on demand through the BAT).
pub const DISK_TYPE_DYNAMIC: u32 = 3;
/// Disk type: differencing (a dynamic disk over a parent).
pub const DISK_TYPE_DIFFERENCING: u32 = 4;

/// A BAT entry for a block that is not allocated.
pub const BAT_UNUSED: u32 = 0xFFFF_FFFF;

/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;

/// Number of parent locator entries in the dynamic disk header.
pub const LOCATOR_COUNT: usize = 8;

/// Parent locator platform code "W2ru": UTF-16LE Windows path relative to the child.
pub const PLATFORM_W2RU: [u8; 4] = *b"W2ru";
/// Parent locator platform code "W2ku": UTF-16LE absolute Windows path.
pub const PLATFORM_W2KU: [u8; 4] = *b"W2ku";
/// Parent locator platform code "MacX": a UTF-8 file URL (RFC 2396).
pub const PLATFORM_MACX: [u8; 4] = *b"MacX";
/// Parent locator platform code "Mac ": a Mac OS alias blob (opaque, not usable here).
pub const PLATFORM_MAC: [u8; 4] = *b"Mac ";
/// Parent locator platform code "Wi2r" (deprecated relative Windows path, code page).
pub const PLATFORM_WI2R: [u8; 4] = *b"Wi2r";
/// Parent locator platform code "Wi2k" (deprecated absolute Windows path, code page).
pub const PLATFORM_WI2K: [u8; 4] = *b"Wi2k";

/// The specification's checksum: the one's complement of the byte sum of `bytes`, with the
/// 4-byte checksum field at `field` counted as zero.
pub fn checksum(bytes: &[u8], field: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |acc, (_, b)| acc.wrapping_add(u32::from(*b)));
    !sum
}

fn arr<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// Shows a cookie or code for messages: printable ASCII as is, other bytes escaped.
pub fn show_bytes(b: &[u8]) -> String {
    b.iter()
        .flat_map(|c| std::ascii::escape_default(*c))
        .map(char::from)
        .collect()
}

/// Takes the first `N` bytes of `buf` as an array, or reports that `structure` is cut short.
fn exact<const N: usize>(buf: &[u8], structure: &'static str) -> Result<[u8; N], VhdError> {
    buf.get(..N)
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .ok_or_else(|| {
            VhdError::Layout(format!(
                "{structure} is cut short ({} of {N} bytes)",
                buf.len()
            ))
        })
}

/// The hard disk footer (512 bytes), at the end of every VHD and copied to offset 0 of
/// dynamic and differencing disks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// 0x00 "conectix".
    pub cookie: [u8; 8],
    /// 0x08 feature bits ([`FEATURE_TEMPORARY`], [`FEATURE_RESERVED`]).
    pub features: u32,
    /// 0x0c file format version ([`VERSION_1_0`]).
    pub version: u32,
    /// 0x10 absolute offset of the dynamic disk header; [`NO_DATA_OFFSET`] for fixed disks.
    pub data_offset: u64,
    /// 0x18 creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// 0x1c creator application ("vpc ", "win ", "qemu", "qem2", "d2v\0"...).
    pub creator_app: [u8; 4],
    /// 0x20 creator version (major in the high 16 bits).
    pub creator_version: u32,
    /// 0x24 creator host OS ("Wi2k", "Mac ").
    pub creator_os: [u8; 4],
    /// 0x28 size at creation, bytes (informational).
    pub original_size: u64,
    /// 0x30 current size, bytes.
    pub current_size: u64,
    /// 0x38 cylinders.
    pub cylinders: u16,
    /// 0x3a heads.
    pub heads: u8,
    /// 0x3b sectors per track.
    pub sectors_per_track: u8,
    /// 0x3c disk type (2 fixed, 3 dynamic, 4 differencing).
    pub disk_type: u32,
    /// 0x40 checksum as stored.
    pub checksum: u32,
    /// 0x44 unique id of this disk.
    pub uuid: [u8; 16],
    /// 0x54 saved-state flag.
    pub saved_state: u8,
    /// 0x55 reserved (427 bytes, zero).
    pub reserved: [u8; 427],
}

impl Footer {
    /// Offset of the checksum field.
    pub const CHECKSUM_AT: usize = 0x40;

    /// Parses a footer; fails if `buf` is short or the cookie is not "conectix".
    pub fn parse(buf: &[u8]) -> Result<Footer, VhdError> {
        let b: [u8; FOOTER_SIZE] = exact(buf, "VHD footer")?;
        let cookie: [u8; 8] = arr(&b, 0);
        if cookie != FOOTER_COOKIE {
            return Err(VhdError::BadCookie {
                structure: "VHD footer",
                offset: 0,
                found: show_bytes(&cookie),
                expected: "conectix",
            });
        }
        Ok(Footer {
            cookie,
            features: BE::read_u32(&b[0x08..]),
            version: BE::read_u32(&b[0x0c..]),
            data_offset: BE::read_u64(&b[0x10..]),
            timestamp: BE::read_u32(&b[0x18..]),
            creator_app: arr(&b, 0x1c),
            creator_version: BE::read_u32(&b[0x20..]),
            creator_os: arr(&b, 0x24),
            original_size: BE::read_u64(&b[0x28..]),
            current_size: BE::read_u64(&b[0x30..]),
            cylinders: BE::read_u16(&b[0x38..]),
            heads: b[0x3a],
            sectors_per_track: b[0x3b],
            disk_type: BE::read_u32(&b[0x3c..]),
            checksum: BE::read_u32(&b[0x40..]),
            uuid: arr(&b, 0x44),
            saved_state: b[0x54],
            reserved: arr(&b, 0x55),
        })
    }

    /// Writes the footer into `out[..512]`, checksum as stored.
    pub fn write_to(&self, out: &mut [u8]) {
        let b = &mut out[..FOOTER_SIZE];
        b[0..8].copy_from_slice(&self.cookie);
        b[0x08..0x0c].copy_from_slice(&self.features.to_be_bytes());
        b[0x0c..0x10].copy_from_slice(&self.version.to_be_bytes());
        b[0x10..0x18].copy_from_slice(&self.data_offset.to_be_bytes());
        b[0x18..0x1c].copy_from_slice(&self.timestamp.to_be_bytes());
        b[0x1c..0x20].copy_from_slice(&self.creator_app);
        b[0x20..0x24].copy_from_slice(&self.creator_version.to_be_bytes());
        b[0x24..0x28].copy_from_slice(&self.creator_os);
        b[0x28..0x30].copy_from_slice(&self.original_size.to_be_bytes());
        b[0x30..0x38].copy_from_slice(&self.current_size.to_be_bytes());
        b[0x38..0x3a].copy_from_slice(&self.cylinders.to_be_bytes());
        b[0x3a] = self.heads;
        b[0x3b] = self.sectors_per_track;
        b[0x3c..0x40].copy_from_slice(&self.disk_type.to_be_bytes());
        b[0x40..0x44].copy_from_slice(&self.checksum.to_be_bytes());
        b[0x44..0x54].copy_from_slice(&self.uuid);
        b[0x54] = self.saved_state;
        b[0x55..].copy_from_slice(&self.reserved);
    }

    /// The footer's bytes.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        self.write_to(&mut b);
        b
    }

    /// The checksum the footer's bytes call for.
    pub fn computed_checksum(&self) -> u32 {
        checksum(&self.to_bytes(), Self::CHECKSUM_AT)
    }

    /// Sets the checksum field to match the other fields.
    pub fn seal(&mut self) {
        self.checksum = self.computed_checksum();
    }

    /// True when the stored checksum matches.
    pub fn checksum_ok(&self) -> bool {
        crate::checksum::checksum_matches(self.checksum, self.computed_checksum())
    }

    /// Total sectors the CHS geometry describes.
    pub fn chs_sectors(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }
}

/// One parent locator entry (24 bytes) of the dynamic disk header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParentLocator {
    /// +0x00 platform code ("W2ru", "W2ku", "MacX"...; zero when unused).
    pub platform_code: [u8; 4],
    /// +0x04 space reserved for the locator data. The specification says sectors; Windows
    /// writes bytes. Informational only.
    pub data_space: u32,
    /// +0x08 length of the locator data, bytes.
    pub data_length: u32,
    /// +0x0c reserved (zero).
    pub reserved: u32,
    /// +0x10 absolute file offset of the locator data.
    pub data_offset: u64,
}

impl ParentLocator {
    /// Size of one entry.
    pub const SIZE: usize = 24;

    /// Parses one entry from `buf[..24]`.
    pub fn parse(buf: &[u8]) -> Result<ParentLocator, VhdError> {
        let b: [u8; Self::SIZE] = exact(buf, "parent locator entry")?;
        Ok(ParentLocator {
            platform_code: arr(&b, 0),
            data_space: BE::read_u32(&b[4..]),
            data_length: BE::read_u32(&b[8..]),
            reserved: BE::read_u32(&b[12..]),
            data_offset: BE::read_u64(&b[16..]),
        })
    }

    /// Writes the entry into `out[..24]`.
    pub fn write_to(&self, out: &mut [u8]) {
        let b = &mut out[..Self::SIZE];
        b[0..4].copy_from_slice(&self.platform_code);
        b[4..8].copy_from_slice(&self.data_space.to_be_bytes());
        b[8..12].copy_from_slice(&self.data_length.to_be_bytes());
        b[12..16].copy_from_slice(&self.reserved.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
    }

    /// True for an all-zero (unused) entry.
    pub fn is_unused(&self) -> bool {
        *self == ParentLocator::default()
    }
}

/// The dynamic disk header (1024 bytes) of dynamic and differencing disks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynHeader {
    /// 0x000 "cxsparse".
    pub cookie: [u8; 8],
    /// 0x008 next structure; unused, all ones.
    pub data_offset: u64,
    /// 0x010 absolute offset of the BAT.
    pub table_offset: u64,
    /// 0x018 header version ([`VERSION_1_0`]).
    pub version: u32,
    /// 0x01c number of BAT entries.
    pub max_table_entries: u32,
    /// 0x020 block size in bytes (data only, without the bitmap); a power of two.
    pub block_size: u32,
    /// 0x024 checksum as stored.
    pub checksum: u32,
    /// 0x028 UUID of the parent disk (differencing disks).
    pub parent_uuid: [u8; 16],
    /// 0x038 parent modification time, seconds since 2000-01-01 UTC.
    pub parent_timestamp: u32,
    /// 0x03c reserved.
    pub reserved: u32,
    /// 0x040 parent file name, UTF-16 big-endian, NUL padded (512 bytes).
    pub parent_name: [u8; 512],
    /// 0x240 parent locator entries.
    pub locators: [ParentLocator; LOCATOR_COUNT],
    /// 0x300 reserved (256 bytes).
    pub reserved2: [u8; 256],
}

impl DynHeader {
    /// Offset of the checksum field.
    pub const CHECKSUM_AT: usize = 0x24;
    /// Offset of the first parent locator entry.
    pub const LOCATORS_AT: usize = 0x240;

    /// Parses a header; fails if `buf` is short or the cookie is not "cxsparse".
    pub fn parse(buf: &[u8]) -> Result<DynHeader, VhdError> {
        let b: [u8; DYN_HEADER_SIZE] = exact(buf, "dynamic disk header")?;
        let cookie: [u8; 8] = arr(&b, 0);
        if cookie != DYN_COOKIE {
            return Err(VhdError::BadCookie {
                structure: "dynamic disk header",
                offset: 0,
                found: show_bytes(&cookie),
                expected: "cxsparse",
            });
        }
        let mut locators = [ParentLocator::default(); LOCATOR_COUNT];
        for (i, l) in locators.iter_mut().enumerate() {
            let at = Self::LOCATORS_AT + i * ParentLocator::SIZE;
            *l = ParentLocator::parse(&b[at..at + ParentLocator::SIZE])?;
        }
        Ok(DynHeader {
            cookie,
            data_offset: BE::read_u64(&b[0x08..]),
            table_offset: BE::read_u64(&b[0x10..]),
            version: BE::read_u32(&b[0x18..]),
            max_table_entries: BE::read_u32(&b[0x1c..]),
            block_size: BE::read_u32(&b[0x20..]),
            checksum: BE::read_u32(&b[0x24..]),
            parent_uuid: arr(&b, 0x28),
            parent_timestamp: BE::read_u32(&b[0x38..]),
            reserved: BE::read_u32(&b[0x3c..]),
            parent_name: arr(&b, 0x40),
            locators,
            reserved2: arr(&b, 0x300),
        })
    }

    /// Writes the header into `out[..1024]`, checksum as stored.
    pub fn write_to(&self, out: &mut [u8]) {
        let b = &mut out[..DYN_HEADER_SIZE];
        b[0..8].copy_from_slice(&self.cookie);
        b[0x08..0x10].copy_from_slice(&self.data_offset.to_be_bytes());
        b[0x10..0x18].copy_from_slice(&self.table_offset.to_be_bytes());
        b[0x18..0x1c].copy_from_slice(&self.version.to_be_bytes());
        b[0x1c..0x20].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[0x20..0x24].copy_from_slice(&self.block_size.to_be_bytes());
        b[0x24..0x28].copy_from_slice(&self.checksum.to_be_bytes());
        b[0x28..0x38].copy_from_slice(&self.parent_uuid);
        b[0x38..0x3c].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        b[0x3c..0x40].copy_from_slice(&self.reserved.to_be_bytes());
        b[0x40..0x240].copy_from_slice(&self.parent_name);
        for (i, l) in self.locators.iter().enumerate() {
            let at = Self::LOCATORS_AT + i * ParentLocator::SIZE;
            l.write_to(&mut b[at..at + ParentLocator::SIZE]);
        }
        b[0x300..].copy_from_slice(&self.reserved2);
    }

    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; DYN_HEADER_SIZE] {
        let mut b = [0u8; DYN_HEADER_SIZE];
        self.write_to(&mut b);
        b
    }

    /// The checksum the header's bytes call for.
    pub fn computed_checksum(&self) -> u32 {
        checksum(&self.to_bytes(), Self::CHECKSUM_AT)
    }

    /// Sets the checksum field to match the other fields.
    pub fn seal(&mut self) {
        self.checksum = self.computed_checksum();
    }

    /// The parent name decoded from UTF-16BE, up to the first NUL; `None` when empty or not
    /// valid UTF-16.
    pub fn parent_name(&self) -> Option<String> {
        let units: Vec<u16> = self
            .parent_name
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        if units.is_empty() {
            return None;
        }
        String::from_utf16(&units).ok()
    }
}

/// Bytes of the sector bitmap in front of each block of `block_size` bytes: one bit per
/// sector, padded to whole sectors (the specification's rule; qemu computes 0 for blocks
/// smaller than 4 KiB, which leaves no room for the bitmap the specification requires).
pub fn bitmap_size(block_size: u64) -> u64 {
    let sectors = block_size / SECTOR;
    sectors.div_ceil(8).div_ceil(SECTOR) * SECTOR
}

/// Parses a BAT: `entries` big-endian u32 sector numbers ([`BAT_UNUSED`] when unallocated).
/// `buf` must hold at least `entries * 4` bytes.
pub fn parse_bat(buf: &[u8], entries: usize) -> Result<Vec<u32>, VhdError> {
    let need = entries
        .checked_mul(4)
        .filter(|n| *n <= buf.len())
        .ok_or_else(|| {
            VhdError::Layout(format!(
                "BAT is cut short ({} bytes for {entries} entries)",
                buf.len()
            ))
        })?;
    Ok(buf[..need]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Writes `bat` big-endian into `out`, padding the rest of `out` with [`BAT_UNUSED`] bytes
/// (the BAT is extended to a sector boundary with unused entries).
pub fn write_bat(bat: &[u32], out: &mut [u8]) {
    out.fill(0xFF);
    for (c, e) in out.chunks_exact_mut(4).zip(bat) {
        c.copy_from_slice(&e.to_be_bytes());
    }
}

/// A block's sector bitmap: bit `i` (most significant bit first within each byte) says
/// whether sector `i` of the block is stored in this file (1) or not (0: zero in a dynamic
/// disk, the parent's in a differencing disk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectorBitmap {
    bits: Vec<u8>,
    sectors: u64,
    full: bool,
}

impl SectorBitmap {
    /// A bitmap for `sectors` sectors from its on-disk bytes (at least `ceil(sectors / 8)`).
    pub fn parse(buf: &[u8], sectors: u64) -> Result<SectorBitmap, VhdError> {
        let need = usize::try_from(sectors.div_ceil(8))
            .ok()
            .filter(|n| *n <= buf.len())
            .ok_or_else(|| {
                VhdError::Layout(format!(
                    "sector bitmap is cut short ({} bytes for {sectors} sectors)",
                    buf.len()
                ))
            })?;
        let bits = buf[..need].to_vec();
        let mut bm = SectorBitmap {
            bits,
            sectors,
            full: false,
        };
        bm.full = bm.run(0).1 >= sectors && bm.is_set(0);
        Ok(bm)
    }

    /// A bitmap with every sector set, as writers create it.
    pub fn all_set(sectors: u64) -> SectorBitmap {
        SectorBitmap {
            bits: vec![0xFF; sectors.div_ceil(8) as usize],
            sectors,
            full: true,
        }
    }

    /// Writes the bitmap into `out` (its padding is zero).
    pub fn write_to(&self, out: &mut [u8]) {
        out.fill(0);
        let n = self.bits.len().min(out.len());
        out[..n].copy_from_slice(&self.bits[..n]);
    }

    /// True when every sector is present.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Whether sector `i` is present (false past the end).
    pub fn is_set(&self, i: u64) -> bool {
        let Ok(byte) = usize::try_from(i / 8) else {
            return false;
        };
        i < self.sectors
            && self
                .bits
                .get(byte)
                .is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
    }

    /// The state of sector `first` and how many sectors from `first` share it (at least 1
    /// when `first` is inside the block, 0 past its end).
    pub fn run(&self, first: u64) -> (bool, u64) {
        if first >= self.sectors {
            return (false, 0);
        }
        let state = self.is_set(first);
        let whole = if state { 0xFF } else { 0x00 };
        let mut i = first;
        while i < self.sectors {
            if i.is_multiple_of(8) && i + 8 <= self.sectors {
                // Whole bytes at a time through uniform stretches.
                match self.bits.get((i / 8) as usize) {
                    Some(b) if *b == whole => {
                        i += 8;
                        continue;
                    }
                    _ => {}
                }
            }
            if self.is_set(i) != state {
                break;
            }
            i += 1;
        }
        (state, i - first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-annotated footer of a 2 MiB dynamic disk written by qemu.
    fn footer_fixture() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"conectix"); // 0x00 cookie
        b.extend_from_slice(&[0, 0, 0, 2]); // 0x08 features: reserved bit set
        b.extend_from_slice(&[0, 1, 0, 0]); // 0x0c version 1.0
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 2, 0]); // 0x10 data offset 0x200
        b.extend_from_slice(&[0x2e, 0x4a, 0x3c, 0x10]); // 0x18 timestamp
        b.extend_from_slice(b"qemu"); // 0x1c creator application
        b.extend_from_slice(&[0, 5, 0, 3]); // 0x20 creator version 5.3
        b.extend_from_slice(b"Wi2k"); // 0x24 creator host OS
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0x1f, 0xe0, 0x00]); // 0x28 original size 0x1fe000
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0x1f, 0xe0, 0x00]); // 0x30 current size
        b.extend_from_slice(&[0, 60]); // 0x38 cylinders 60
        b.push(4); // 0x3a heads 4
        b.push(17); // 0x3b sectors per track 17 (60*4*17*512 = 0x1fe000)
        b.extend_from_slice(&[0, 0, 0, 3]); // 0x3c disk type: dynamic
        b.extend_from_slice(&[0, 0, 0, 0]); // 0x40 checksum (filled below)
        b.extend_from_slice(&[0x11; 16]); // 0x44 unique id
        b.push(0); // 0x54 saved state
        b.resize(512, 0); // 0x55 reserved
        let c = checksum(&b, 0x40);
        b[0x40..0x44].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn footer_round_trip() {
        let b = footer_fixture();
        let f = Footer::parse(&b).unwrap();
        assert_eq!(f.data_offset, 0x200);
        assert_eq!(&f.creator_app, b"qemu");
        assert_eq!(f.current_size, 0x1fe000);
        assert_eq!(f.chs_sectors() * 512, 0x1fe000);
        assert_eq!(f.disk_type, DISK_TYPE_DYNAMIC);
        assert!(f.checksum_ok());
        assert_eq!(f.to_bytes().to_vec(), b);
    }

    #[test]
    fn footer_rules() {
        let mut b = footer_fixture();
        assert!(matches!(Footer::parse(&b[..511]), Err(VhdError::Layout(_))));
        b[0] = b'C';
        assert!(matches!(Footer::parse(&b), Err(VhdError::BadCookie { .. })));
        let mut b = footer_fixture();
        b[0x30] ^= 1;
        let f = Footer::parse(&b).unwrap();
        assert!(!f.checksum_ok());
        // A bad checksum still round-trips byte for byte.
        assert_eq!(f.to_bytes().to_vec(), b);
        let mut g = f.clone();
        g.seal();
        assert!(g.checksum_ok());
    }

    /// A hand-annotated dynamic header of a differencing disk.
    fn dyn_fixture() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"cxsparse"); // 0x000 cookie
        b.extend_from_slice(&[0xff; 8]); // 0x008 data offset: unused
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 6, 0]); // 0x010 table offset 0x600
        b.extend_from_slice(&[0, 1, 0, 0]); // 0x018 version 1.0
        b.extend_from_slice(&[0, 0, 0, 2]); // 0x01c max table entries 2
        b.extend_from_slice(&[0, 0x20, 0, 0]); // 0x020 block size 2 MiB
        b.extend_from_slice(&[0, 0, 0, 0]); // 0x024 checksum (filled below)
        b.extend_from_slice(&[0x22; 16]); // 0x028 parent unique id
        b.extend_from_slice(&[0, 0, 0, 7]); // 0x038 parent time stamp
        b.extend_from_slice(&[0; 4]); // 0x03c reserved
        let mut name = [0u8; 512]; // 0x040 parent name, UTF-16BE "p.vhd"
        for (i, c) in "p.vhd".encode_utf16().enumerate() {
            name[2 * i..2 * i + 2].copy_from_slice(&c.to_be_bytes());
        }
        b.extend_from_slice(&name);
        // 0x240 locator 0: W2ru, 512 bytes of space, 14 bytes, at 0x1000.
        b.extend_from_slice(b"W2ru");
        b.extend_from_slice(&[0, 0, 2, 0]);
        b.extend_from_slice(&[0, 0, 0, 14]);
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x10, 0]);
        b.resize(0x300, 0); // locators 1..8 unused
        b.resize(1024, 0); // 0x300 reserved
        let c = checksum(&b, 0x24);
        b[0x24..0x28].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn dyn_header_round_trip() {
        let b = dyn_fixture();
        let h = DynHeader::parse(&b).unwrap();
        assert_eq!(h.table_offset, 0x600);
        assert_eq!(h.max_table_entries, 2);
        assert_eq!(h.block_size, 2 << 20);
        assert_eq!(h.checksum, h.computed_checksum());
        assert_eq!(h.parent_name().as_deref(), Some("p.vhd"));
        assert_eq!(&h.locators[0].platform_code, b"W2ru");
        assert_eq!(h.locators[0].data_offset, 0x1000);
        assert!(h.locators[1].is_unused());
        assert_eq!(h.to_bytes().to_vec(), b);
    }

    #[test]
    fn dyn_header_rules() {
        let b = dyn_fixture();
        assert!(DynHeader::parse(&b[..1000]).is_err());
        let mut c = b.clone();
        c[1] = b'Y';
        assert!(matches!(
            DynHeader::parse(&c),
            Err(VhdError::BadCookie { .. })
        ));
    }

    #[test]
    fn bat_round_trip() {
        // Entry 0 at sector 4, entry 1 unused, entry 2 at sector 0x1005.
        let raw = [0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x10, 0x05];
        let bat = parse_bat(&raw, 3).unwrap();
        assert_eq!(bat, vec![4, BAT_UNUSED, 0x1005]);
        let mut out = [0u8; 16];
        write_bat(&bat, &mut out);
        assert_eq!(&out[..12], &raw);
        assert_eq!(&out[12..], &[0xff; 4]);
        assert!(parse_bat(&raw, 4).is_err());
    }

    #[test]
    fn bitmaps_are_msb_first() {
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(512), 512);
        assert_eq!(bitmap_size(64 << 20), 16384);
        // 16 sectors: byte 0 = 0b0100_0000 (sector 1), byte 1 = 0xff (sectors 8..16).
        let bm = SectorBitmap::parse(&[0x40, 0xff], 16).unwrap();
        assert!(!bm.is_set(0));
        assert!(bm.is_set(1));
        assert_eq!(bm.run(0), (false, 1));
        assert_eq!(bm.run(1), (true, 1));
        assert_eq!(bm.run(2), (false, 6));
        assert_eq!(bm.run(8), (true, 8));
        assert_eq!(bm.run(16), (false, 0));
        assert!(!bm.is_full());
        let full = SectorBitmap::parse(&[0xff; 512], 4096).unwrap();
        assert!(full.is_full());
        assert_eq!(full, SectorBitmap::all_set(4096));
        let mut out = [1u8; 4];
        bm.write_to(&mut out);
        assert_eq!(out, [0x40, 0xff, 0, 0]);
        assert!(SectorBitmap::parse(&[0xff], 16).is_err());
    }
}

//! VHDX on-disk structures ([MS-VHDX] §2.2 header section, §2.3 log, §2.4 region table,
//! §2.5 BAT, §2.6 metadata), each with `parse` and `write_to`, and the constants that name
//! them. All integers are little-endian; GUIDs are stored in Microsoft's mixed-endian layout
//! and kept here as their 16 on-disk bytes.
//!
//! `parse` checks what makes a structure itself well formed (signature, checksum, sizes that
//! bound its own entries); how its values fit the rest of the file is checked by the reader.

use std::fmt;

use byteorder::{ByteOrder, LittleEndian as LE};

/// 1 MiB: the alignment of every region, log and block.
pub const MIB: u64 = 1 << 20;
/// 64 KiB: the size of each structure of the header section.
pub const KIB64: u64 = 64 << 10;

/// "vhdxfile": the file type identifier at offset 0.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Offset of the file identifier.
pub const FILE_ID_OFFSET: u64 = 0;
/// Offset of header 1.
pub const HEADER1_OFFSET: u64 = KIB64;
/// Offset of header 2.
pub const HEADER2_OFFSET: u64 = 2 * KIB64;
/// Offset of region table 1.
pub const REGION_TABLE1_OFFSET: u64 = 3 * KIB64;
/// Offset of region table 2.
pub const REGION_TABLE2_OFFSET: u64 = 4 * KIB64;
/// End of the header section: nothing else may live below 1 MiB.
pub const HEADER_SECTION_END: u64 = MIB;

/// "head": header signature.
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// Bytes the header checksum covers (the header is 4 KiB, its 64 KiB slot is reserved).
pub const HEADER_SIZE: usize = 4096;
/// The only header version defined.
pub const HEADER_VERSION: u16 = 1;
/// The only log version defined.
pub const LOG_VERSION: u16 = 0;

/// "regi": region table signature.
pub const REGION_SIGNATURE: &[u8; 4] = b"regi";
/// Bytes the region table checksum covers.
pub const REGION_TABLE_SIZE: usize = KIB64 as usize;
/// Most region table entries the 64 KiB table can hold (§2.2.3.1).
pub const REGION_MAX_ENTRIES: u32 = 2047;
/// Region entry flag: the region must be understood to open the file.
pub const REGION_REQUIRED: u32 = 1;

/// "metadata": metadata table signature.
pub const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
/// Size of the metadata table (items follow it in the region).
pub const METADATA_TABLE_SIZE: usize = KIB64 as usize;
/// Most metadata table entries (§2.6.1.1).
pub const METADATA_MAX_ENTRIES: u16 = 2047;
/// Metadata entry flag: user metadata.
pub const META_IS_USER: u32 = 1;
/// Metadata entry flag: virtual disk metadata (as opposed to file metadata).
pub const META_IS_VIRTUAL_DISK: u32 = 2;
/// Metadata entry flag: must be understood to open the file.
pub const META_IS_REQUIRED: u32 = 4;
/// Largest metadata item (§2.6.1.2).
pub const METADATA_ITEM_MAX: u32 = MIB as u32;

/// File parameters flag: blocks stay allocated (a fixed VHDX).
pub const PARAM_LEAVE_BLOCKS_ALLOCATED: u32 = 1;
/// File parameters flag: the file is a differencing VHDX with a parent.
pub const PARAM_HAS_PARENT: u32 = 2;
/// Smallest block size.
pub const BLOCK_SIZE_MIN: u32 = 1 << 20;
/// Largest block size.
pub const BLOCK_SIZE_MAX: u32 = 256 << 20;
/// Largest virtual disk (§2.6.2.2: 64 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Sectors one sector bitmap block describes (2^23): the chunk is this many logical sectors.
pub const SECTORS_PER_BITMAP: u64 = 1 << 23;

/// Payload block state: not present (unallocated; the parent's data in a differencing file).
pub const PAYLOAD_NOT_PRESENT: u8 = 0;
/// Payload block state: undefined contents.
pub const PAYLOAD_UNDEFINED: u8 = 1;
/// Payload block state: reads as zeros.
pub const PAYLOAD_ZERO: u8 = 2;
/// Payload block state: unmapped (trimmed).
pub const PAYLOAD_UNMAPPED: u8 = 3;
/// Payload block state 5: "unmapped" in the v0.95 draft; QEMU still reads it as zeros.
pub const PAYLOAD_UNMAPPED_V095: u8 = 5;
/// Payload block state: every sector is stored at the entry's offset.
pub const PAYLOAD_FULLY_PRESENT: u8 = 6;
/// Payload block state: the sector bitmap says which sectors are stored (differencing only).
pub const PAYLOAD_PARTIALLY_PRESENT: u8 = 7;
/// Sector bitmap block state: not allocated.
pub const SB_NOT_PRESENT: u8 = 0;
/// Sector bitmap block state: stored at the entry's offset.
pub const SB_PRESENT: u8 = 6;

/// "loge": log entry signature.
pub const LOG_ENTRY_SIGNATURE: &[u8; 4] = b"loge";
/// "desc": data descriptor signature.
pub const LOG_DATA_DESC_SIGNATURE: &[u8; 4] = b"desc";
/// "zero": zero descriptor signature.
pub const LOG_ZERO_DESC_SIGNATURE: &[u8; 4] = b"zero";
/// "data": data sector signature.
pub const LOG_DATA_SIGNATURE: &[u8; 4] = b"data";
/// Log sector size: entries, descriptors' targets and lengths are multiples of it.
pub const LOG_SECTOR: u64 = 4096;
/// Size of a log entry header.
pub const LOG_HEADER_SIZE: usize = 64;
/// Size of a log descriptor.
pub const LOG_DESC_SIZE: usize = 32;

/// A GUID as its 16 on-disk bytes (Microsoft layout: the first three fields little-endian).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID (an empty log).
    pub const ZERO: Guid = Guid([0; 16]);

    /// The GUID `d1-d2-d3-d4` as written in the specification.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// A fresh random (version 4) GUID.
    pub fn random() -> Guid {
        Guid(uuid::Uuid::new_v4().to_bytes_le())
    }

    /// True for the all-zero GUID.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Reads a GUID from the first 16 bytes of `b`.
    pub fn read(b: &[u8]) -> Guid {
        let mut g = [0u8; 16];
        g.copy_from_slice(&b[..16]);
        Guid(g)
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", uuid::Uuid::from_bytes_le(self.0).hyphenated())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Region 2DC27766-F623-4200-9D64-115E9BFD4A08: the BAT.
pub const BAT_GUID: Guid = Guid::from_fields(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
/// Region 8B7CA206-4790-4B9A-B8FE-575F050F886E: the metadata.
pub const METADATA_GUID: Guid = Guid::from_fields(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
/// Metadata item CAA16737-FA36-4D43-B3B6-33F0AA44E76B: file parameters.
pub const FILE_PARAMETERS_GUID: Guid = Guid::from_fields(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
/// Metadata item 2FA54224-CD1B-4876-B211-5DBED83BF4B8: virtual disk size.
pub const VIRTUAL_DISK_SIZE_GUID: Guid = Guid::from_fields(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
/// Metadata item BECA12AB-B2E6-4523-93EF-C309E000C746: SCSI page 83 data (disk id).
pub const PAGE83_GUID: Guid = Guid::from_fields(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
/// Metadata item 8141BF1D-A96F-4709-BA47-F233A8FAAB5F: logical sector size.
pub const LOGICAL_SECTOR_SIZE_GUID: Guid = Guid::from_fields(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
/// Metadata item CDA348C7-445D-4471-9CC9-E9885251C556: physical sector size.
pub const PHYSICAL_SECTOR_SIZE_GUID: Guid = Guid::from_fields(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
/// Metadata item A8D35F2D-B30B-454D-ABF7-D3D84834AB0C: parent locator.
pub const PARENT_LOCATOR_GUID: Guid = Guid::from_fields(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
/// Parent locator type B04AEFB7-D19E-4A81-B789-25B8E9445913: the parent is a VHDX.
pub const PARENT_TYPE_VHDX_GUID: Guid = Guid::from_fields(
    0xb04a_efb7,
    0xd19e,
    0x4a81,
    [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13],
);

/// CRC-32C (Castagnoli) of `buf` with the 4-byte checksum field at `field` taken as zero.
pub fn checksum_with_zeroed_field(buf: &[u8], field: usize) -> u32 {
    let crc = crc32c::crc32c(&buf[..field]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &buf[field + 4..])
}

/// A structure too short to parse, or failing its own consistency rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn need(buf: &[u8], n: usize, what: &str) -> Result<(), ParseError> {
    if buf.len() < n {
        return Err(ParseError(format!(
            "{what} needs {n} bytes, only {} available",
            buf.len()
        )));
    }
    Ok(())
}

/// §2.2.1 File type identifier: signature and a diagnostic creator string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileIdentifier {
    /// The creator, UTF-16LE in up to 256 code units (NUL-terminated when shorter).
    pub creator: String,
}

impl FileIdentifier {
    /// Bytes of the identifier that carry content (signature + creator).
    pub const SIZE: usize = 8 + 512;

    /// Parses the identifier; fails on a wrong signature.
    pub fn parse(buf: &[u8]) -> Result<FileIdentifier, ParseError> {
        need(buf, Self::SIZE, "file identifier")?;
        if &buf[..8] != FILE_SIGNATURE {
            return Err(ParseError(format!(
                "signature is {:?}, not \"vhdxfile\"",
                String::from_utf8_lossy(&buf[..8])
            )));
        }
        let units: Vec<u16> = buf[8..Self::SIZE]
            .chunks_exact(2)
            .map(LE::read_u16)
            .take_while(|u| *u != 0)
            .collect();
        Ok(FileIdentifier {
            creator: String::from_utf16_lossy(&units),
        })
    }

    /// Writes signature and creator (truncated to 256 code units) into `buf[..520]`.
    pub fn write_to(&self, buf: &mut [u8]) {
        buf[..8].copy_from_slice(FILE_SIGNATURE);
        buf[8..Self::SIZE].fill(0);
        for (i, u) in self.creator.encode_utf16().take(256).enumerate() {
            LE::write_u16(&mut buf[8 + 2 * i..], u);
        }
    }
}

/// §2.2.2 Header: one of two copies; the valid one with the higher sequence number is current.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Incremented on every header update.
    pub sequence_number: u64,
    /// Changed before the first write to the file in a session.
    pub file_write_guid: Guid,
    /// Changed before the first write of guest-visible data.
    pub data_write_guid: Guid,
    /// Zero when the log is empty; otherwise log entries must carry this GUID.
    pub log_guid: Guid,
    /// Log format version (0).
    pub log_version: u16,
    /// File format version (1).
    pub version: u16,
    /// Log length in bytes (a multiple of 1 MiB).
    pub log_length: u32,
    /// Log offset in bytes (a multiple of 1 MiB, at least 1 MiB).
    pub log_offset: u64,
}

impl Header {
    /// Parses a 4 KiB header; fails on a wrong signature, checksum or version.
    pub fn parse(buf: &[u8]) -> Result<Header, ParseError> {
        need(buf, HEADER_SIZE, "header")?;
        let buf = &buf[..HEADER_SIZE];
        if &buf[..4] != HEADER_SIGNATURE {
            return Err(ParseError(format!(
                "signature is {:?}, not \"head\"",
                String::from_utf8_lossy(&buf[..4])
            )));
        }
        let stored = LE::read_u32(&buf[4..]);
        let computed = checksum_with_zeroed_field(buf, 4);
        if !crate::checksum::checksum_matches(stored, computed) {
            return Err(ParseError(format!(
                "checksum is {stored:#010x}, the CRC-32C of the header is {computed:#010x}"
            )));
        }
        let h = Header {
            sequence_number: LE::read_u64(&buf[8..]),
            file_write_guid: Guid::read(&buf[16..]),
            data_write_guid: Guid::read(&buf[32..]),
            log_guid: Guid::read(&buf[48..]),
            log_version: LE::read_u16(&buf[64..]),
            version: LE::read_u16(&buf[66..]),
            log_length: LE::read_u32(&buf[68..]),
            log_offset: LE::read_u64(&buf[72..]),
        };
        if h.version != HEADER_VERSION {
            return Err(ParseError(format!(
                "version is {}, only {HEADER_VERSION} is defined",
                h.version
            )));
        }
        Ok(h)
    }

    /// Writes the header into `buf[..4096]` (reserved bytes zeroed) with its checksum.
    pub fn write_to(&self, buf: &mut [u8]) {
        let buf = &mut buf[..HEADER_SIZE];
        buf.fill(0);
        buf[..4].copy_from_slice(HEADER_SIGNATURE);
        LE::write_u64(&mut buf[8..], self.sequence_number);
        buf[16..32].copy_from_slice(&self.file_write_guid.0);
        buf[32..48].copy_from_slice(&self.data_write_guid.0);
        buf[48..64].copy_from_slice(&self.log_guid.0);
        LE::write_u16(&mut buf[64..], self.log_version);
        LE::write_u16(&mut buf[66..], self.version);
        LE::write_u32(&mut buf[68..], self.log_length);
        LE::write_u64(&mut buf[72..], self.log_offset);
        let crc = checksum_with_zeroed_field(buf, 4);
        LE::write_u32(&mut buf[4..], crc);
    }
}

/// §2.2.3.2 Region table entry: where a region lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    /// What the region is.
    pub guid: Guid,
    /// File offset (a multiple of 1 MiB, at least 1 MiB).
    pub file_offset: u64,
    /// Length (a multiple of 1 MiB).
    pub length: u32,
    /// Bit 0: required.
    pub flags: u32,
}

impl RegionEntry {
    /// Size of an entry.
    pub const SIZE: usize = 32;

    /// True when the file cannot be opened without understanding the region.
    pub fn required(&self) -> bool {
        self.flags & REGION_REQUIRED != 0
    }

    fn parse(b: &[u8]) -> RegionEntry {
        RegionEntry {
            guid: Guid::read(b),
            file_offset: LE::read_u64(&b[16..]),
            length: LE::read_u32(&b[24..]),
            flags: LE::read_u32(&b[28..]),
        }
    }

    fn write_to(&self, b: &mut [u8]) {
        b[..16].copy_from_slice(&self.guid.0);
        LE::write_u64(&mut b[16..], self.file_offset);
        LE::write_u32(&mut b[24..], self.length);
        LE::write_u32(&mut b[28..], self.flags);
    }
}

/// §2.2.3 Region table: a 64 KiB block with a checksummed header and its entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionTable {
    /// The entries, in table order.
    pub entries: Vec<RegionEntry>,
}

impl RegionTable {
    /// Parses a 64 KiB region table; fails on a wrong signature or checksum, or an entry
    /// count above 2047.
    pub fn parse(buf: &[u8]) -> Result<RegionTable, ParseError> {
        need(buf, REGION_TABLE_SIZE, "region table")?;
        let buf = &buf[..REGION_TABLE_SIZE];
        if &buf[..4] != REGION_SIGNATURE {
            return Err(ParseError(format!(
                "signature is {:?}, not \"regi\"",
                String::from_utf8_lossy(&buf[..4])
            )));
        }
        let stored = LE::read_u32(&buf[4..]);
        let computed = checksum_with_zeroed_field(buf, 4);
        if !crate::checksum::checksum_matches(stored, computed) {
            return Err(ParseError(format!(
                "checksum is {stored:#010x}, the CRC-32C of the table is {computed:#010x}"
            )));
        }
        let count = LE::read_u32(&buf[8..]);
        if count > REGION_MAX_ENTRIES {
            return Err(ParseError(format!(
                "entry count is {count} ({count:#x}); at most {REGION_MAX_ENTRIES} fit in the table"
            )));
        }
        let entries = (0..count as usize)
            .map(|i| RegionEntry::parse(&buf[16 + i * RegionEntry::SIZE..]))
            .collect();
        Ok(RegionTable { entries })
    }

    /// Writes the table into `buf[..65536]` with its checksum.
    pub fn write_to(&self, buf: &mut [u8]) {
        let buf = &mut buf[..REGION_TABLE_SIZE];
        buf.fill(0);
        buf[..4].copy_from_slice(REGION_SIGNATURE);
        LE::write_u32(&mut buf[8..], self.entries.len() as u32);
        for (i, e) in self
            .entries
            .iter()
            .take(REGION_MAX_ENTRIES as usize)
            .enumerate()
        {
            e.write_to(&mut buf[16 + i * RegionEntry::SIZE..]);
        }
        let crc = checksum_with_zeroed_field(buf, 4);
        LE::write_u32(&mut buf[4..], crc);
    }
}

/// §2.6.1.2 Metadata table entry: where an item lives inside the metadata region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataEntry {
    /// What the item is.
    pub item_id: Guid,
    /// Offset from the start of the metadata region (at least 64 KiB when `length > 0`).
    pub offset: u32,
    /// Length (at most 1 MiB).
    pub length: u32,
    /// Bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired.
    pub flags: u32,
}

impl MetadataEntry {
    /// Size of an entry.
    pub const SIZE: usize = 32;

    /// True when the file cannot be opened without understanding the item.
    pub fn required(&self) -> bool {
        self.flags & META_IS_REQUIRED != 0
    }

    fn parse(b: &[u8]) -> MetadataEntry {
        MetadataEntry {
            item_id: Guid::read(b),
            offset: LE::read_u32(&b[16..]),
            length: LE::read_u32(&b[20..]),
            flags: LE::read_u32(&b[24..]),
        }
    }

    fn write_to(&self, b: &mut [u8]) {
        b[..16].copy_from_slice(&self.item_id.0);
        LE::write_u32(&mut b[16..], self.offset);
        LE::write_u32(&mut b[20..], self.length);
        LE::write_u32(&mut b[24..], self.flags);
        LE::write_u32(&mut b[28..], 0);
    }
}

/// §2.6.1 Metadata table: the 64 KiB table at the start of the metadata region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataTable {
    /// The entries, in table order.
    pub entries: Vec<MetadataEntry>,
}

impl MetadataTable {
    /// Parses the 64 KiB table; fails on a wrong signature or an entry count above 2047.
    pub fn parse(buf: &[u8]) -> Result<MetadataTable, ParseError> {
        need(buf, METADATA_TABLE_SIZE, "metadata table")?;
        if &buf[..8] != METADATA_SIGNATURE {
            return Err(ParseError(format!(
                "signature is {:?}, not \"metadata\"",
                String::from_utf8_lossy(&buf[..8])
            )));
        }
        let count = LE::read_u16(&buf[10..]);
        if count > METADATA_MAX_ENTRIES {
            return Err(ParseError(format!(
                "entry count is {count} ({count:#x}); at most {METADATA_MAX_ENTRIES} are allowed"
            )));
        }
        let entries = (0..count as usize)
            .map(|i| MetadataEntry::parse(&buf[32 + i * MetadataEntry::SIZE..]))
            .collect();
        Ok(MetadataTable { entries })
    }

    /// Writes the table into `buf[..65536]`.
    pub fn write_to(&self, buf: &mut [u8]) {
        let buf = &mut buf[..METADATA_TABLE_SIZE];
        buf.fill(0);
        buf[..8].copy_from_slice(METADATA_SIGNATURE);
        LE::write_u16(&mut buf[10..], self.entries.len() as u16);
        for (i, e) in self
            .entries
            .iter()
            .take(METADATA_MAX_ENTRIES as usize)
            .enumerate()
        {
            e.write_to(&mut buf[32 + i * MetadataEntry::SIZE..]);
        }
    }
}

/// §2.6.2.1 File parameters item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileParameters {
    /// Payload block size: a power of two from 1 MiB to 256 MiB.
    pub block_size: u32,
    /// Bit 0 LeaveBlocksAllocated (fixed), bit 1 HasParent (differencing); others reserved.
    pub flags: u32,
}

impl FileParameters {
    /// Size of the item.
    pub const SIZE: usize = 8;

    /// Parses the item.
    pub fn parse(buf: &[u8]) -> Result<FileParameters, ParseError> {
        need(buf, Self::SIZE, "file parameters")?;
        Ok(FileParameters {
            block_size: LE::read_u32(buf),
            flags: LE::read_u32(&buf[4..]),
        })
    }

    /// Writes the item into `buf[..8]`.
    pub fn write_to(&self, buf: &mut [u8]) {
        LE::write_u32(buf, self.block_size);
        LE::write_u32(&mut buf[4..], self.flags);
    }

    /// True for a fixed VHDX.
    pub fn leave_blocks_allocated(&self) -> bool {
        self.flags & PARAM_LEAVE_BLOCKS_ALLOCATED != 0
    }

    /// True for a differencing VHDX.
    pub fn has_parent(&self) -> bool {
        self.flags & PARAM_HAS_PARENT != 0
    }
}

/// §2.6.2.6 Parent locator entry: a key and a value, both UTF-16LE inside the item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParentLocatorEntry {
    /// Offset of the key from the start of the item.
    pub key_offset: u32,
    /// Offset of the value from the start of the item.
    pub value_offset: u32,
    /// Key length in bytes.
    pub key_length: u16,
    /// Value length in bytes.
    pub value_length: u16,
}

impl ParentLocatorEntry {
    /// Size of an entry.
    pub const SIZE: usize = 12;
}

/// §2.6.2.6 Parent locator item: a type GUID and key/value pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentLocator {
    /// The parent's type (VHDX: [`PARENT_TYPE_VHDX_GUID`]).
    pub locator_type: Guid,
    /// `(key, value)` pairs in item order.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// Size of the locator header.
    pub const HEADER_SIZE: usize = 20;

    /// Parses the whole item (`buf` is exactly the item). Keys and values must lie inside
    /// the item, be non-empty and of even length, and not overlap the entry array.
    pub fn parse(buf: &[u8]) -> Result<ParentLocator, ParseError> {
        need(buf, Self::HEADER_SIZE, "parent locator")?;
        let locator_type = Guid::read(buf);
        let count = LE::read_u16(&buf[18..]) as usize;
        let table_end = Self::HEADER_SIZE + count * ParentLocatorEntry::SIZE;
        if table_end > buf.len() {
            return Err(ParseError(format!(
                "{count} key/value entries need {table_end} bytes, the item has {}",
                buf.len()
            )));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let b = &buf[Self::HEADER_SIZE + i * ParentLocatorEntry::SIZE..];
            let e = ParentLocatorEntry {
                key_offset: LE::read_u32(b),
                value_offset: LE::read_u32(&b[4..]),
                key_length: LE::read_u16(&b[8..]),
                value_length: LE::read_u16(&b[10..]),
            };
            let key = utf16_field(buf, e.key_offset, e.key_length, table_end)
                .map_err(|r| ParseError(format!("entry {i} key: {r}")))?;
            let value = utf16_field(buf, e.value_offset, e.value_length, table_end)
                .map_err(|r| ParseError(format!("entry {i} value: {r}")))?;
            entries.push((key, value));
        }
        Ok(ParentLocator {
            locator_type,
            entries,
        })
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The encoded item.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut strings = Vec::new();
        let table_end = Self::HEADER_SIZE + self.entries.len() * ParentLocatorEntry::SIZE;
        let mut out = vec![0u8; table_end];
        out[..16].copy_from_slice(&self.locator_type.0);
        LE::write_u16(&mut out[18..], self.entries.len() as u16);
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let mut put = |s: &str| -> (u32, u16) {
                let off = table_end + strings.len();
                for u in s.encode_utf16() {
                    strings.extend_from_slice(&u.to_le_bytes());
                }
                (off as u32, (table_end + strings.len() - off) as u16)
            };
            let (ko, kl) = put(k);
            let (vo, vl) = put(v);
            let b = &mut out[Self::HEADER_SIZE + i * ParentLocatorEntry::SIZE..];
            LE::write_u32(b, ko);
            LE::write_u32(&mut b[4..], vo);
            LE::write_u16(&mut b[8..], kl);
            LE::write_u16(&mut b[10..], vl);
        }
        out.extend_from_slice(&strings);
        out
    }
}

fn utf16_field(
    item: &[u8],
    offset: u32,
    length: u16,
    table_end: usize,
) -> Result<String, ParseError> {
    let (start, len) = (offset as usize, length as usize);
    if len == 0 || len % 2 != 0 {
        return Err(ParseError(format!(
            "length {len:#x} is not a positive even number"
        )));
    }
    if start < table_end {
        return Err(ParseError(format!(
            "offset {start:#x} lies inside the header and entry array (which end at {table_end:#x})"
        )));
    }
    let end = start
        .checked_add(len)
        .filter(|e| *e <= item.len())
        .ok_or_else(|| {
            ParseError(format!(
                "[{start:#x}, +{len:#x}) extends past the end of the item ({:#x} bytes)",
                item.len()
            ))
        })?;
    let units: Vec<u16> = item[start..end].chunks_exact(2).map(LE::read_u16).collect();
    String::from_utf16(&units).map_err(|_| ParseError("is not valid UTF-16".into()))
}

/// §2.5.1 BAT entry: a 3-bit state, 17 reserved bits, and a 44-bit file offset in MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatEntry(pub u64);

impl BatEntry {
    /// Bits 3..20 are reserved and must be zero.
    pub const RESERVED_MASK: u64 = 0xf_fff8;

    /// An entry with `state` at `offset` (a multiple of 1 MiB).
    pub fn new(state: u8, offset: u64) -> BatEntry {
        BatEntry((offset & !(MIB - 1)) | u64::from(state & 7))
    }

    /// The block state.
    pub fn state(self) -> u8 {
        (self.0 & 7) as u8
    }

    /// The reserved bits.
    pub fn reserved(self) -> u64 {
        self.0 & Self::RESERVED_MASK
    }

    /// The file offset in bytes (the MiB field shifted into place).
    pub fn file_offset(self) -> u64 {
        self.0 & !(MIB - 1)
    }
}

/// §2.3.1.1 Log entry header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogEntryHeader {
    /// CRC-32C over the whole entry with this field zeroed.
    pub checksum: u32,
    /// Entry length in bytes (a multiple of 4 KiB).
    pub entry_length: u32,
    /// Log offset of the oldest entry of the sequence still needed.
    pub tail: u32,
    /// Sequence number (> 0, +1 per entry).
    pub sequence_number: u64,
    /// Descriptors in this entry.
    pub descriptor_count: u32,
    /// Must equal the header's log GUID.
    pub log_guid: Guid,
    /// File size when the entry was written; a shorter file was truncated.
    pub flushed_file_offset: u64,
    /// File size all structures fit into; replay extends the file to it.
    pub last_file_offset: u64,
}

impl LogEntryHeader {
    /// Parses the 64-byte header; fails on a wrong signature.
    pub fn parse(buf: &[u8]) -> Result<LogEntryHeader, ParseError> {
        need(buf, LOG_HEADER_SIZE, "log entry header")?;
        if &buf[..4] != LOG_ENTRY_SIGNATURE {
            return Err(ParseError("signature is not \"loge\"".into()));
        }
        Ok(LogEntryHeader {
            checksum: LE::read_u32(&buf[4..]),
            entry_length: LE::read_u32(&buf[8..]),
            tail: LE::read_u32(&buf[12..]),
            sequence_number: LE::read_u64(&buf[16..]),
            descriptor_count: LE::read_u32(&buf[24..]),
            log_guid: Guid::read(&buf[32..]),
            flushed_file_offset: LE::read_u64(&buf[48..]),
            last_file_offset: LE::read_u64(&buf[56..]),
        })
    }

    /// Writes the header into `buf[..64]` (the checksum as stored in `self`).
    pub fn write_to(&self, buf: &mut [u8]) {
        buf[..4].copy_from_slice(LOG_ENTRY_SIGNATURE);
        LE::write_u32(&mut buf[4..], self.checksum);
        LE::write_u32(&mut buf[8..], self.entry_length);
        LE::write_u32(&mut buf[12..], self.tail);
        LE::write_u64(&mut buf[16..], self.sequence_number);
        LE::write_u32(&mut buf[24..], self.descriptor_count);
        LE::write_u32(&mut buf[28..], 0);
        buf[32..48].copy_from_slice(&self.log_guid.0);
        LE::write_u64(&mut buf[48..], self.flushed_file_offset);
        LE::write_u64(&mut buf[56..], self.last_file_offset);
    }

    /// 4 KiB sectors holding the header and the descriptors: the first sector has room for
    /// 126 descriptors after the header, each further sector for 128.
    pub fn descriptor_sectors(descriptor_count: u32) -> u64 {
        (u64::from(descriptor_count) + 2).div_ceil(128)
    }
}

/// §2.3.1.2/§2.3.1.3 Log descriptor: zero a range, or write one 4 KiB data sector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogDescriptor {
    /// Zero `length` bytes at `file_offset`.
    Zero {
        /// Bytes to zero (a multiple of 4 KiB).
        length: u64,
        /// Where (a multiple of 4 KiB).
        file_offset: u64,
        /// Must match the entry.
        sequence_number: u64,
    },
    /// Write the next data sector at `file_offset`; its first 8 and last 4 bytes live here.
    Data {
        /// Bytes 4092..4096 of the sector.
        trailing_bytes: [u8; 4],
        /// Bytes 0..8 of the sector.
        leading_bytes: [u8; 8],
        /// Where (a multiple of 4 KiB).
        file_offset: u64,
        /// Must match the entry.
        sequence_number: u64,
    },
}

impl LogDescriptor {
    /// Parses a 32-byte descriptor; fails on an unknown signature.
    pub fn parse(buf: &[u8]) -> Result<LogDescriptor, ParseError> {
        need(buf, LOG_DESC_SIZE, "log descriptor")?;
        let file_offset = LE::read_u64(&buf[16..]);
        let sequence_number = LE::read_u64(&buf[24..]);
        match &buf[..4] {
            s if s == LOG_ZERO_DESC_SIGNATURE => Ok(LogDescriptor::Zero {
                length: LE::read_u64(&buf[8..]),
                file_offset,
                sequence_number,
            }),
            s if s == LOG_DATA_DESC_SIGNATURE => {
                let mut trailing_bytes = [0u8; 4];
                trailing_bytes.copy_from_slice(&buf[4..8]);
                let mut leading_bytes = [0u8; 8];
                leading_bytes.copy_from_slice(&buf[8..16]);
                Ok(LogDescriptor::Data {
                    trailing_bytes,
                    leading_bytes,
                    file_offset,
                    sequence_number,
                })
            }
            other => Err(ParseError(format!(
                "descriptor signature {:?} is neither \"zero\" nor \"desc\"",
                String::from_utf8_lossy(other)
            ))),
        }
    }

    /// Writes the descriptor into `buf[..32]`.
    pub fn write_to(&self, buf: &mut [u8]) {
        match *self {
            LogDescriptor::Zero {
                length,
                file_offset,
                sequence_number,
            } => {
                buf[..4].copy_from_slice(LOG_ZERO_DESC_SIGNATURE);
                LE::write_u32(&mut buf[4..], 0);
                LE::write_u64(&mut buf[8..], length);
                LE::write_u64(&mut buf[16..], file_offset);
                LE::write_u64(&mut buf[24..], sequence_number);
            }
            LogDescriptor::Data {
                trailing_bytes,
                leading_bytes,
                file_offset,
                sequence_number,
            } => {
                buf[..4].copy_from_slice(LOG_DATA_DESC_SIGNATURE);
                buf[4..8].copy_from_slice(&trailing_bytes);
                buf[8..16].copy_from_slice(&leading_bytes);
                LE::write_u64(&mut buf[16..], file_offset);
                LE::write_u64(&mut buf[24..], sequence_number);
            }
        }
    }

    /// The descriptor's sequence number.
    pub fn sequence_number(&self) -> u64 {
        match *self {
            LogDescriptor::Zero {
                sequence_number, ..
            }
            | LogDescriptor::Data {
                sequence_number, ..
            } => sequence_number,
        }
    }

    /// The descriptor's target offset.
    pub fn file_offset(&self) -> u64 {
        match *self {
            LogDescriptor::Zero { file_offset, .. } | LogDescriptor::Data { file_offset, .. } => {
                file_offset
            }
        }
    }
}

/// §2.3.1.4 Log data sector: 4084 bytes of a 4 KiB sector, framed by the sequence number.
/// The sector's missing first 8 and last 4 bytes are in its descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogDataSector {
    /// The entry's sequence number, split in two halves around the data.
    pub sequence_number: u64,
}

impl LogDataSector {
    /// Parses the framing of a 4 KiB data sector; fails on a wrong signature.
    pub fn parse(buf: &[u8]) -> Result<LogDataSector, ParseError> {
        need(buf, LOG_SECTOR as usize, "log data sector")?;
        if &buf[..4] != LOG_DATA_SIGNATURE {
            return Err(ParseError("data sector signature is not \"data\"".into()));
        }
        let high = u64::from(LE::read_u32(&buf[4..]));
        let low = u64::from(LE::read_u32(&buf[4092..]));
        Ok(LogDataSector {
            sequence_number: high << 32 | low,
        })
    }

    /// Frames `sector[8..4092]` into `buf[..4096]`.
    pub fn write_to(&self, sector: &[u8], buf: &mut [u8]) {
        buf[..4].copy_from_slice(LOG_DATA_SIGNATURE);
        LE::write_u32(&mut buf[4..], (self.sequence_number >> 32) as u32);
        buf[8..4092].copy_from_slice(&sector[8..4092]);
        LE::write_u32(&mut buf[4092..], self.sequence_number as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn padded(bytes: &[u8], len: usize) -> Vec<u8> {
        let mut v = bytes.to_vec();
        v.resize(len, 0);
        v
    }

    #[test]
    fn guid_layout() {
        // The spec writes GUIDs as text; on disk the first three fields are little-endian.
        assert_eq!(
            BAT_GUID.0,
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
        assert_eq!(BAT_GUID.to_string(), "2dc27766-f623-4200-9d64-115e9bfd4a08");
        assert!(Guid::ZERO.is_zero());
        assert_ne!(Guid::random(), Guid::random());
    }

    #[test]
    fn file_identifier_round_trip() {
        #[rustfmt::skip]
        let fixture: &[u8] = &[
            b'v', b'h', b'd', b'x', b'f', b'i', b'l', b'e', // signature
            b'Q', 0, b'E', 0, b'M', 0, b'U', 0,             // creator "QEMU" in UTF-16LE,
        ]; // NUL-terminated by the padding
        let buf = padded(fixture, FileIdentifier::SIZE);
        let id = FileIdentifier::parse(&buf).unwrap();
        assert_eq!(id.creator, "QEMU");
        let mut out = vec![0xffu8; FileIdentifier::SIZE];
        id.write_to(&mut out);
        assert_eq!(out, buf);
        let mut bad = buf.clone();
        bad[0] = b'V';
        assert!(FileIdentifier::parse(&bad).is_err());
    }

    /// Header 1 of a qemu-img 10.0.2 image (100 MiB dynamic), first 80 bytes; the rest of
    /// the 4 KiB is zero.
    #[rustfmt::skip]
    const HEADER_FIXTURE: &[u8] = &[
        b'h', b'e', b'a', b'd',                         // signature
        0x35, 0xc4, 0x79, 0x96,                         // checksum 0x9679c435
        0x05, 0x19, 0x41, 0x06, 0, 0, 0, 0,             // sequence number 104929541
        0x13, 0x48, 0x72, 0xbc, 0x85, 0x89, 0x4c, 0x2b, // file write GUID
        0xbe, 0x9c, 0x14, 0x29, 0x73, 0x02, 0xdb, 0x1f,
        0xba, 0x4d, 0x36, 0xd7, 0xea, 0xcb, 0x4a, 0x6b, // data write GUID
        0xa0, 0x47, 0xf4, 0x5f, 0x68, 0x52, 0xd4, 0x4b,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // log GUID: zero, no log
        0, 0,                                           // log version 0
        1, 0,                                           // version 1
        0, 0, 0x10, 0,                                  // log length 1 MiB
        0, 0, 0x10, 0, 0, 0, 0, 0,                      // log offset 1 MiB
    ];

    #[test]
    fn header_round_trip() {
        let buf = padded(HEADER_FIXTURE, HEADER_SIZE);
        let h = Header::parse(&buf).unwrap();
        assert_eq!(h.sequence_number, 104_929_541);
        assert_eq!(h.log_length, 1 << 20);
        assert_eq!(h.log_offset, 1 << 20);
        assert!(h.log_guid.is_zero());
        assert_eq!(
            h.file_write_guid.to_string(),
            "bc724813-8985-2b4c-be9c-14297302db1f"
        );
        let mut out = vec![0xffu8; HEADER_SIZE];
        h.write_to(&mut out);
        assert_eq!(out, buf);
    }

    #[test]
    fn header_rules() {
        let good = padded(HEADER_FIXTURE, HEADER_SIZE);
        let mut bad = good.clone();
        bad[100] = 1; // reserved byte: covered by the checksum
        assert!(Header::parse(&bad).unwrap_err().0.contains("checksum"));
        let mut bad = good.clone();
        bad[0] = b'H';
        assert!(Header::parse(&bad).unwrap_err().0.contains("signature"));
        let mut h = Header::parse(&good).unwrap();
        h.version = 2;
        let mut bad = vec![0u8; HEADER_SIZE];
        h.write_to(&mut bad);
        assert!(Header::parse(&bad).unwrap_err().0.contains("version"));
        assert!(Header::parse(&good[..100]).is_err());
    }

    /// The region table of a qemu-img 10.0.2 image: BAT at 2 MiB, metadata at 3 MiB.
    #[rustfmt::skip]
    const REGION_FIXTURE: &[u8] = &[
        b'r', b'e', b'g', b'i',                         // signature
        0x83, 0xce, 0x6f, 0x2c,                         // checksum 0x2c6fce83
        2, 0, 0, 0,                                     // entry count
        0, 0, 0, 0,                                     // reserved
        0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, // BAT GUID
        0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08,
        0, 0, 0x20, 0, 0, 0, 0, 0,                      // file offset 2 MiB
        0, 0, 0x10, 0,                                  // length 1 MiB
        0, 0, 0, 0,                                     // flags: not required (qemu)
        0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, // metadata GUID
        0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e,
        0, 0, 0x30, 0, 0, 0, 0, 0,                      // file offset 3 MiB
        0, 0, 0x10, 0,                                  // length 1 MiB
        0, 0, 0, 0,                                     // flags
    ];

    #[test]
    fn region_table_round_trip() {
        let buf = padded(REGION_FIXTURE, REGION_TABLE_SIZE);
        let t = RegionTable::parse(&buf).unwrap();
        assert_eq!(t.entries.len(), 2);
        assert_eq!(t.entries[0].guid, BAT_GUID);
        assert_eq!(t.entries[0].file_offset, 2 << 20);
        assert_eq!(t.entries[1].guid, METADATA_GUID);
        assert!(!t.entries[1].required());
        let mut out = vec![0xffu8; REGION_TABLE_SIZE];
        t.write_to(&mut out);
        assert_eq!(out, buf);
    }

    #[test]
    fn region_table_rules() {
        let good = padded(REGION_FIXTURE, REGION_TABLE_SIZE);
        let mut bad = good.clone();
        bad[60000] = 1;
        assert!(RegionTable::parse(&bad).unwrap_err().0.contains("checksum"));
        // 5000 entries: more than the table holds, refused even with a valid checksum.
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&5000u32.to_le_bytes());
        let crc = checksum_with_zeroed_field(&bad, 4);
        bad[4..8].copy_from_slice(&crc.to_le_bytes());
        let e = RegionTable::parse(&bad).unwrap_err();
        assert!(e.0.contains("5000"), "{e}");
        let mut bad = good;
        bad[3] = b'I';
        assert!(RegionTable::parse(&bad)
            .unwrap_err()
            .0
            .contains("signature"));
    }

    /// The metadata table and items of a Hyper-V (Windows 10) dynamic image.
    #[rustfmt::skip]
    const METADATA_FIXTURE: &[u8] = &[
        b'm', b'e', b't', b'a', b'd', b'a', b't', b'a', // signature
        0, 0,                                           // reserved
        2, 0,                                           // entry count (2 of the 5 kept)
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // reserved
        0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, // file parameters GUID
        0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b,
        0, 0, 1, 0,                                     // offset 64 KiB
        8, 0, 0, 0,                                     // length 8
        4, 0, 0, 0,                                     // flags: IsRequired
        0, 0, 0, 0,                                     // reserved
        0x24, 0x42, 0xa5, 0x2f, 0x1b, 0xcd, 0x76, 0x48, // virtual disk size GUID
        0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8,
        8, 0, 1, 0,                                     // offset 64 KiB + 8
        8, 0, 0, 0,                                     // length 8
        6, 0, 0, 0,                                     // flags: IsRequired | IsVirtualDisk
        0, 0, 0, 0,                                     // reserved
    ];

    #[test]
    fn metadata_table_round_trip() {
        let buf = padded(METADATA_FIXTURE, METADATA_TABLE_SIZE);
        let t = MetadataTable::parse(&buf).unwrap();
        assert_eq!(t.entries.len(), 2);
        assert_eq!(t.entries[0].item_id, FILE_PARAMETERS_GUID);
        assert_eq!(t.entries[1].item_id, VIRTUAL_DISK_SIZE_GUID);
        assert_eq!(t.entries[1].offset, 65544);
        assert!(t.entries[1].required());
        let mut out = vec![0xffu8; METADATA_TABLE_SIZE];
        t.write_to(&mut out);
        assert_eq!(out, buf);
        let mut bad = buf.clone();
        bad[10..12].copy_from_slice(&2048u16.to_le_bytes());
        assert!(MetadataTable::parse(&bad).unwrap_err().0.contains("2048"));
        let mut bad = buf;
        bad[0] = b'M';
        assert!(MetadataTable::parse(&bad).is_err());
    }

    #[test]
    fn file_parameters_round_trip() {
        #[rustfmt::skip]
        let fixture: &[u8] = &[
            0, 0, 0, 2, // block size 32 MiB
            2, 0, 0, 0, // flags: HasParent
        ];
        let p = FileParameters::parse(fixture).unwrap();
        assert_eq!(p.block_size, 32 << 20);
        assert!(p.has_parent() && !p.leave_blocks_allocated());
        let mut out = [0xffu8; 8];
        p.write_to(&mut out);
        assert_eq!(&out, fixture);
    }

    /// A parent locator as Hyper-V writes it (two of its five entries).
    fn locator_fixture() -> Vec<u8> {
        let key1 = "relative_path";
        let val1 = ".\\base.vhdx";
        let key2 = "parent_linkage";
        let val2 = "{ff34003b-11ed-4cf8-a166-b2be05e20b80}";
        let u = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
        let mut v = Vec::new();
        v.extend_from_slice(&PARENT_TYPE_VHDX_GUID.0); // locator type: VHDX
        v.extend_from_slice(&[0, 0]); // reserved
        v.extend_from_slice(&[2, 0]); // key/value count
        let base = 20 + 2 * 12;
        let mut strings = Vec::new();
        for (k, val) in [(key1, val1), (key2, val2)] {
            let ko = base + strings.len();
            strings.extend(u(k));
            let vo = base + strings.len();
            strings.extend(u(val));
            v.extend_from_slice(&(ko as u32).to_le_bytes()); // key offset
            v.extend_from_slice(&(vo as u32).to_le_bytes()); // value offset
            v.extend_from_slice(&(2 * k.len() as u16).to_le_bytes()); // key length
            v.extend_from_slice(&(2 * val.len() as u16).to_le_bytes()); // value length
        }
        v.extend(strings);
        v
    }

    #[test]
    fn parent_locator_round_trip() {
        let buf = locator_fixture();
        let l = ParentLocator::parse(&buf).unwrap();
        assert_eq!(l.locator_type, PARENT_TYPE_VHDX_GUID);
        assert_eq!(l.get("relative_path"), Some(".\\base.vhdx"));
        assert_eq!(l.entries.len(), 2);
        assert_eq!(l.to_bytes(), buf);
    }

    #[test]
    fn parent_locator_rules() {
        let good = locator_fixture();
        // Value running past the item.
        let mut bad = good.clone();
        bad[30..32].copy_from_slice(&0x7ffeu16.to_le_bytes());
        assert!(ParentLocator::parse(&bad)
            .unwrap_err()
            .0
            .contains("past the end"));
        // Odd length.
        let mut bad = good.clone();
        bad[28..30].copy_from_slice(&3u16.to_le_bytes());
        assert!(ParentLocator::parse(&bad).unwrap_err().0.contains("even"));
        // Key inside the entry array.
        let mut bad = good.clone();
        bad[20..24].copy_from_slice(&4u32.to_le_bytes());
        assert!(ParentLocator::parse(&bad).unwrap_err().0.contains("inside"));
        // More entries than the item holds.
        let mut bad = good;
        bad[18..20].copy_from_slice(&1000u16.to_le_bytes());
        assert!(ParentLocator::parse(&bad).is_err());
    }

    #[test]
    fn bat_entry_fields() {
        // 0x0000000000800006: block at 8 MiB, fully present.
        let e = BatEntry(0x0080_0006);
        assert_eq!(e.state(), PAYLOAD_FULLY_PRESENT);
        assert_eq!(e.file_offset(), 8 << 20);
        assert_eq!(e.reserved(), 0);
        assert_eq!(BatEntry::new(PAYLOAD_FULLY_PRESENT, 8 << 20), e);
        assert_eq!(BatEntry(0x0080_0016).reserved(), 0x10);
        assert_eq!(BatEntry(u64::MAX).file_offset(), 0xffff_ffff_fff0_0000);
    }

    /// The one log entry of qemu's iotest-dirtylog sample: it rewrites the BAT's first
    /// 4 KiB sector (at 2 MiB) so that entry 0 reads 0x800006.
    fn log_entry_fixture() -> Vec<u8> {
        #[rustfmt::skip]
        let head: &[u8] = &[
            b'l', b'o', b'g', b'e',                         // signature
            0, 0, 0, 0,                                     // checksum (filled below)
            0, 0x20, 0, 0,                                  // entry length 8 KiB
            0, 0xc0, 0, 0,                                  // tail 0xc000
            7, 0, 0, 0, 0, 0, 0, 0,                         // sequence number 7
            1, 0, 0, 0,                                     // one descriptor
            0, 0, 0, 0,                                     // reserved
            0xbc, 0x55, 0x27, 0xc8, 0x7f, 0x42, 0x45, 0x12, // log GUID
            0xb7, 0x2c, 0xda, 0x70, 0xaa, 0xab, 0xe0, 0x31,
            0, 0, 0xe0, 0x01, 0, 0, 0, 0,                   // flushed file offset 30 MiB
            0, 0, 0xe0, 0x01, 0, 0, 0, 0,                   // last file offset 30 MiB
            // descriptor 0
            b'd', b'e', b's', b'c',                         // data descriptor
            0, 0, 0, 0,                                     // trailing bytes
            0x06, 0, 0x80, 0, 0, 0, 0, 0,                   // leading bytes: 0x800006
            0, 0, 0x20, 0, 0, 0, 0, 0,                      // file offset 2 MiB
            7, 0, 0, 0, 0, 0, 0, 0,                         // sequence number
        ];
        let mut v = padded(head, 8192);
        v[4096..4100].copy_from_slice(b"data"); // data sector
        v[4100..4104].copy_from_slice(&0u32.to_le_bytes()); // sequence high
        v[8188..8192].copy_from_slice(&7u32.to_le_bytes()); // sequence low
        let crc = checksum_with_zeroed_field(&v, 4);
        v[4..8].copy_from_slice(&crc.to_le_bytes());
        v
    }

    #[test]
    fn log_structures_round_trip() {
        let buf = log_entry_fixture();
        let h = LogEntryHeader::parse(&buf).unwrap();
        assert_eq!(h.entry_length, 8192);
        assert_eq!(h.tail, 0xc000);
        assert_eq!(h.sequence_number, 7);
        assert_eq!(h.descriptor_count, 1);
        assert_eq!(h.flushed_file_offset, 30 << 20);
        assert_eq!(LogEntryHeader::descriptor_sectors(1), 1);
        assert_eq!(LogEntryHeader::descriptor_sectors(126), 1);
        assert_eq!(LogEntryHeader::descriptor_sectors(127), 2);
        let mut out = vec![0u8; 64];
        h.write_to(&mut out);
        assert_eq!(&out[..], &buf[..64]);

        let d = LogDescriptor::parse(&buf[64..]).unwrap();
        assert_eq!(d.file_offset(), 2 << 20);
        assert_eq!(d.sequence_number(), 7);
        let mut out = vec![0u8; 32];
        d.write_to(&mut out);
        assert_eq!(&out[..], &buf[64..96]);
        let z = LogDescriptor::Zero {
            length: 8192,
            file_offset: 4096,
            sequence_number: 9,
        };
        z.write_to(&mut out);
        assert_eq!(LogDescriptor::parse(&out).unwrap(), z);
        out[0] = b'x';
        assert!(LogDescriptor::parse(&out).is_err());

        let s = LogDataSector::parse(&buf[4096..]).unwrap();
        assert_eq!(s.sequence_number, 7);
        let mut out = vec![0u8; 4096];
        s.write_to(&buf[4096..], &mut out);
        assert_eq!(&out[..], &buf[4096..]);
        assert!(LogDataSector::parse(&buf[..4096]).is_err());
    }
}

//! On-disk structures of VMDK sparse extents, little-endian throughout.
//!
//! - The hosted sparse extent header ("KDMV", VMware Virtual Disk Format 1.1, section
//!   "Hosted Sparse Extent Header"), also used as the footer of stream-optimized extents.
//! - Stream-optimized markers (section "Stream-Optimized Compressed Sparse Extents"): the
//!   12-byte grain marker before each compressed grain and the 512-byte metadata markers
//!   (end of stream, grain table, grain directory, footer).
//! - The ESX Server sparse extent header ("COWD", vmfsSparse) and the ESXi seSparse const
//!   and volatile headers, whose layout is not documented by VMware; the field meanings
//!   follow what QEMU's block/vmdk.c and libyal's libvmdk documentation record.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::error::VmdkError;

/// Bytes per sector: every VMDK offset and size is counted in these.
pub const SECTOR: u64 = 512;

/// "KDMV" read as a little-endian u32: hosted sparse extent magic.
pub const SPARSE_MAGIC: u32 = 0x564d_444b;
/// "COWD" read as a little-endian u32: ESX Server (vmfsSparse) sparse extent magic.
pub const COWD_MAGIC: u32 = 0x4457_4f43;
/// seSparse const header magic.
pub const SESPARSE_CONST_MAGIC: u64 = 0xcafe_babe;
/// seSparse volatile header magic.
pub const SESPARSE_VOLATILE_MAGIC: u64 = 0xcafe_cafe;
/// The only seSparse version known (major 2, minor 1).
pub const SESPARSE_VERSION: u64 = 0x0000_0002_0000_0001;

/// Flag: the newline-detection characters are valid.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// Flag: the redundant grain directory is in use.
pub const FLAG_RGD: u32 = 1 << 1;
/// Flag: grain table entry 1 means "zeroed grain" (Virtual Disk Format 5.0; header
/// version 2).
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag: the extent has markers (stream-optimized).
pub const FLAG_MARKERS: u32 = 1 << 17;
/// Flags vimg understands; others are refused (VMware: "unknown incompatible flags").
pub const KNOWN_FLAGS: u32 =
    FLAG_NL_DETECT | FLAG_RGD | FLAG_ZERO_GRAIN | FLAG_COMPRESSED | FLAG_MARKERS;

/// `gdOffset` value meaning "the grain directory location is in the footer".
pub const GD_AT_END: u64 = u64::MAX;
/// `compressAlgorithm`: none.
pub const COMPRESSION_NONE: u16 = 0;
/// `compressAlgorithm`: deflate, stored as zlib streams (RFC 1950).
pub const COMPRESSION_DEFLATE: u16 = 1;

/// Grain table entry meaning "zeroed grain" when [`FLAG_ZERO_GRAIN`] is set.
pub const GTE_ZEROED: u32 = 1;

/// Metadata marker type: end of stream.
pub const MARKER_EOS: u32 = 0;
/// Metadata marker type: a grain table follows.
pub const MARKER_GT: u32 = 1;
/// Metadata marker type: the grain directory follows.
pub const MARKER_GD: u32 = 2;
/// Metadata marker type: the footer follows.
pub const MARKER_FOOTER: u32 = 3;

/// Size of a grain marker: lba (u64) + size (u32); compressed bytes follow.
pub const GRAIN_MARKER_LEN: usize = 12;

/// The hosted sparse extent header (512 bytes on disk; offsets below).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseHeader {
    /// 0x04: 1, 2 or 3.
    pub version: u32,
    /// 0x08: `FLAG_*` bits.
    pub flags: u32,
    /// 0x0c: extent size in sectors.
    pub capacity: u64,
    /// 0x14: grain size in sectors.
    pub grain_size: u64,
    /// 0x1c: embedded descriptor offset in sectors (0 = none).
    pub descriptor_offset: u64,
    /// 0x24: embedded descriptor size in sectors.
    pub descriptor_size: u64,
    /// 0x2c: grain table entries per grain table (512).
    pub num_gtes_per_gt: u32,
    /// 0x30: redundant grain directory offset in sectors.
    pub rgd_offset: u64,
    /// 0x38: grain directory offset in sectors, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// 0x40: sectors of metadata before the first grain ("overHead").
    pub overhead: u64,
    /// 0x48: the extent was not closed cleanly.
    pub unclean_shutdown: u8,
    /// 0x49..0x4d: '\n', ' ', '\r', '\n' (newline-corruption detection).
    pub newline_check: [u8; 4],
    /// 0x4d: [`COMPRESSION_NONE`] or [`COMPRESSION_DEFLATE`].
    pub compress_algorithm: u16,
}

/// The newline detection bytes VMware writes.
pub const NEWLINE_CHECK: [u8; 4] = [b'\n', b' ', b'\r', b'\n'];

impl SparseHeader {
    /// Bytes of a header on disk.
    pub const LEN: usize = 512;

    /// Parses a header found at byte `at` of its file (for messages). `buf` holds at least
    /// 512 bytes.
    pub fn parse(buf: &[u8], at: u64) -> Result<SparseHeader, VmdkError> {
        if buf.len() < Self::LEN {
            return Err(VmdkError::BadField {
                structure: "sparse extent header",
                offset: at,
                field: "length",
                value: buf.len() as u64,
                why: "shorter than 512 bytes",
            });
        }
        let magic = LE::read_u32(&buf[0..4]);
        if magic != SPARSE_MAGIC {
            return Err(VmdkError::BadMagic {
                structure: "sparse extent header",
                offset: at,
                found: magic.into(),
            });
        }
        let mut newline_check = [0u8; 4];
        newline_check.copy_from_slice(&buf[0x49..0x4d]);
        Ok(SparseHeader {
            version: LE::read_u32(&buf[0x04..]),
            flags: LE::read_u32(&buf[0x08..]),
            capacity: LE::read_u64(&buf[0x0c..]),
            grain_size: LE::read_u64(&buf[0x14..]),
            descriptor_offset: LE::read_u64(&buf[0x1c..]),
            descriptor_size: LE::read_u64(&buf[0x24..]),
            num_gtes_per_gt: LE::read_u32(&buf[0x2c..]),
            rgd_offset: LE::read_u64(&buf[0x30..]),
            gd_offset: LE::read_u64(&buf[0x38..]),
            overhead: LE::read_u64(&buf[0x40..]),
            unclean_shutdown: buf[0x48],
            newline_check,
            compress_algorithm: LE::read_u16(&buf[0x4d..]),
        })
    }

    /// Writes the 512-byte header (padding zeroed) into `buf[..512]`.
    pub fn write_to(&self, buf: &mut [u8]) {
        let b = &mut buf[..Self::LEN];
        b.fill(0);
        LE::write_u32(&mut b[0..], SPARSE_MAGIC);
        LE::write_u32(&mut b[0x04..], self.version);
        LE::write_u32(&mut b[0x08..], self.flags);
        LE::write_u64(&mut b[0x0c..], self.capacity);
        LE::write_u64(&mut b[0x14..], self.grain_size);
        LE::write_u64(&mut b[0x1c..], self.descriptor_offset);
        LE::write_u64(&mut b[0x24..], self.descriptor_size);
        LE::write_u32(&mut b[0x2c..], self.num_gtes_per_gt);
        LE::write_u64(&mut b[0x30..], self.rgd_offset);
        LE::write_u64(&mut b[0x38..], self.gd_offset);
        LE::write_u64(&mut b[0x40..], self.overhead);
        b[0x48] = self.unclean_shutdown;
        b[0x49..0x4d].copy_from_slice(&self.newline_check);
        LE::write_u16(&mut b[0x4d..], self.compress_algorithm);
    }

    /// True when grains are deflate-compressed.
    pub fn compressed(&self) -> bool {
        self.compress_algorithm == COMPRESSION_DEFLATE
    }
}

/// A 512-byte metadata marker of a stream-optimized extent (grain marker with size 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marker {
    /// 0x00: sectors of metadata that follow (0 for end of stream).
    pub num_sectors: u64,
    /// 0x08: 0 (what tells a metadata marker from a grain marker).
    pub size: u32,
    /// 0x0c: `MARKER_*`.
    pub kind: u32,
}

impl Marker {
    /// Bytes on disk.
    pub const LEN: usize = 512;

    /// Parses a marker (no validation: callers compare the fields they expect).
    pub fn parse(buf: &[u8]) -> Marker {
        Marker {
            num_sectors: LE::read_u64(&buf[0..]),
            size: LE::read_u32(&buf[8..]),
            kind: LE::read_u32(&buf[12..]),
        }
    }

    /// Writes the 512-byte marker (padding zeroed).
    pub fn write_to(&self, buf: &mut [u8]) {
        let b = &mut buf[..Self::LEN];
        b.fill(0);
        LE::write_u64(&mut b[0..], self.num_sectors);
        LE::write_u32(&mut b[8..], self.size);
        LE::write_u32(&mut b[12..], self.kind);
    }
}

/// The 12-byte marker before each compressed grain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrainMarker {
    /// 0x00: guest sector of the grain's first byte (relative to the extent).
    pub lba: u64,
    /// 0x08: bytes of compressed data that follow.
    pub size: u32,
}

impl GrainMarker {
    /// Parses the first 12 bytes of `buf`.
    pub fn parse(buf: &[u8]) -> GrainMarker {
        GrainMarker {
            lba: LE::read_u64(&buf[0..]),
            size: LE::read_u32(&buf[8..]),
        }
    }

    /// Writes the 12 bytes.
    pub fn write_to(&self, buf: &mut [u8]) {
        LE::write_u64(&mut buf[0..], self.lba);
        LE::write_u32(&mut buf[8..], self.size);
    }
}

/// The ESX Server sparse extent header ("COWD", vmfsSparse), first 44 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CowdHeader {
    /// 0x04: version (1).
    pub version: u32,
    /// 0x08: flags.
    pub flags: u32,
    /// 0x0c: extent size in sectors.
    pub capacity: u32,
    /// 0x10: grain size in sectors.
    pub grain_size: u32,
    /// 0x14: grain directory offset in sectors.
    pub gd_offset: u32,
    /// 0x18: grain directory entries.
    pub num_gd_entries: u32,
    /// 0x1c: next free sector.
    pub free_sector: u32,
}

/// Grain table entries per grain table of a COWD extent (fixed).
pub const COWD_GTES_PER_GT: u64 = 4096;

impl CowdHeader {
    /// Bytes parsed.
    pub const LEN: usize = 0x20;

    /// Parses the header at the start of `buf`.
    pub fn parse(buf: &[u8]) -> Result<CowdHeader, VmdkError> {
        let magic = LE::read_u32(&buf[0..4]);
        if magic != COWD_MAGIC {
            return Err(VmdkError::BadMagic {
                structure: "COWD sparse extent header",
                offset: 0,
                found: magic.into(),
            });
        }
        Ok(CowdHeader {
            version: LE::read_u32(&buf[0x04..]),
            flags: LE::read_u32(&buf[0x08..]),
            capacity: LE::read_u32(&buf[0x0c..]),
            grain_size: LE::read_u32(&buf[0x10..]),
            gd_offset: LE::read_u32(&buf[0x14..]),
            num_gd_entries: LE::read_u32(&buf[0x18..]),
            free_sector: LE::read_u32(&buf[0x1c..]),
        })
    }

    /// Writes the header fields into `buf[..0x20]`.
    pub fn write_to(&self, buf: &mut [u8]) {
        LE::write_u32(&mut buf[0..], COWD_MAGIC);
        LE::write_u32(&mut buf[0x04..], self.version);
        LE::write_u32(&mut buf[0x08..], self.flags);
        LE::write_u32(&mut buf[0x0c..], self.capacity);
        LE::write_u32(&mut buf[0x10..], self.grain_size);
        LE::write_u32(&mut buf[0x14..], self.gd_offset);
        LE::write_u32(&mut buf[0x18..], self.num_gd_entries);
        LE::write_u32(&mut buf[0x1c..], self.free_sector);
    }
}

/// The seSparse const header (512 bytes at offset 0): 26 u64 fields then zero padding.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SeSparseConstHeader {
    /// 0x00: [`SESPARSE_CONST_MAGIC`].
    pub magic: u64,
    /// 0x08: [`SESPARSE_VERSION`].
    pub version: u64,
    /// 0x10: extent size in sectors.
    pub capacity: u64,
    /// 0x18: grain size in sectors (8).
    pub grain_size: u64,
    /// 0x20: grain table size in sectors (64: 4096 entries of 8 bytes).
    pub grain_table_size: u64,
    /// 0x28: flags (0).
    pub flags: u64,
    /// 0x30..0x50: four reserved words (0).
    pub reserved: [u64; 4],
    /// 0x50: volatile header offset in sectors.
    pub volatile_header_offset: u64,
    /// 0x58: volatile header size in sectors.
    pub volatile_header_size: u64,
    /// 0x60: journal header offset.
    pub journal_header_offset: u64,
    /// 0x68: journal header size.
    pub journal_header_size: u64,
    /// 0x70: journal offset.
    pub journal_offset: u64,
    /// 0x78: journal size.
    pub journal_size: u64,
    /// 0x80: grain directory offset in sectors.
    pub grain_dir_offset: u64,
    /// 0x88: grain directory size in sectors.
    pub grain_dir_size: u64,
    /// 0x90: grain tables offset in sectors.
    pub grain_tables_offset: u64,
    /// 0x98: grain tables size in sectors.
    pub grain_tables_size: u64,
    /// 0xa0: free bitmap offset.
    pub free_bitmap_offset: u64,
    /// 0xa8: free bitmap size.
    pub free_bitmap_size: u64,
    /// 0xb0: back map offset.
    pub backmap_offset: u64,
    /// 0xb8: back map size.
    pub backmap_size: u64,
    /// 0xc0: grains offset in sectors.
    pub grains_offset: u64,
    /// 0xc8: grains size in sectors.
    pub grains_size: u64,
}

impl SeSparseConstHeader {
    /// Bytes on disk.
    pub const LEN: usize = 512;
    const FIELDS: usize = 26;

    /// Parses and checks the header (the checks QEMU applies, since the format is not
    /// documented: any other value is "unsupported").
    pub fn parse(buf: &[u8]) -> Result<SeSparseConstHeader, VmdkError> {
        let w = |i: usize| LE::read_u64(&buf[i * 8..]);
        let h = SeSparseConstHeader {
            magic: w(0),
            version: w(1),
            capacity: w(2),
            grain_size: w(3),
            grain_table_size: w(4),
            flags: w(5),
            reserved: [w(6), w(7), w(8), w(9)],
            volatile_header_offset: w(10),
            volatile_header_size: w(11),
            journal_header_offset: w(12),
            journal_header_size: w(13),
            journal_offset: w(14),
            journal_size: w(15),
            grain_dir_offset: w(16),
            grain_dir_size: w(17),
            grain_tables_offset: w(18),
            grain_tables_size: w(19),
            free_bitmap_offset: w(20),
            free_bitmap_size: w(21),
            backmap_offset: w(22),
            backmap_size: w(23),
            grains_offset: w(24),
            grains_size: w(25),
        };
        let bad = |field, value, why| VmdkError::BadField {
            structure: "seSparse const header",
            offset: 0,
            field,
            value,
            why,
        };
        if h.magic != SESPARSE_CONST_MAGIC {
            return Err(VmdkError::BadMagic {
                structure: "seSparse const header",
                offset: 0,
                found: h.magic,
            });
        }
        if h.version != SESPARSE_VERSION {
            return Err(VmdkError::Unsupported(format!(
                "seSparse version {:#x}",
                h.version
            )));
        }
        if h.grain_size != 8 {
            return Err(bad("grain_size", h.grain_size, "only 8 sectors is known"));
        }
        if h.grain_table_size != 64 {
            return Err(bad(
                "grain_table_size",
                h.grain_table_size,
                "only 64 sectors is known",
            ));
        }
        if h.flags != 0 {
            return Err(VmdkError::Unsupported(format!(
                "seSparse flags {:#x}",
                h.flags
            )));
        }
        if h.reserved.iter().any(|&r| r != 0)
            || buf[Self::FIELDS * 8..Self::LEN].iter().any(|&b| b != 0)
        {
            return Err(VmdkError::Unsupported(
                "seSparse const header with non-zero reserved bytes".into(),
            ));
        }
        Ok(h)
    }

    /// Writes the header into `buf[..512]`.
    pub fn write_to(&self, buf: &mut [u8]) {
        let b = &mut buf[..Self::LEN];
        b.fill(0);
        let words = [
            self.magic,
            self.version,
            self.capacity,
            self.grain_size,
            self.grain_table_size,
            self.flags,
            self.reserved[0],
            self.reserved[1],
            self.reserved[2],
            self.reserved[3],
            self.volatile_header_offset,
            self.volatile_header_size,
            self.journal_header_offset,
            self.journal_header_size,
            self.journal_offset,
            self.journal_size,
            self.grain_dir_offset,
            self.grain_dir_size,
            self.grain_tables_offset,
            self.grain_tables_size,
            self.free_bitmap_offset,
            self.free_bitmap_size,
            self.backmap_offset,
            self.backmap_size,
            self.grains_offset,
            self.grains_size,
        ];
        for (i, w) in words.iter().enumerate() {
            LE::write_u64(&mut b[i * 8..], *w);
        }
    }
}

/// The seSparse volatile header: magic, free GT number, next transaction, replay flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeSparseVolatileHeader {
    /// 0x00: [`SESPARSE_VOLATILE_MAGIC`].
    pub magic: u64,
    /// 0x08: next free grain table.
    pub free_gt_number: u64,
    /// 0x10: next journal transaction.
    pub next_txn_seq_number: u64,
    /// 0x18: non-zero when the journal must be replayed (a dirty image).
    pub replay_journal: u64,
}

impl SeSparseVolatileHeader {
    /// Parses and checks the header at byte `at`.
    pub fn parse(buf: &[u8], at: u64) -> Result<SeSparseVolatileHeader, VmdkError> {
        let h = SeSparseVolatileHeader {
            magic: LE::read_u64(&buf[0..]),
            free_gt_number: LE::read_u64(&buf[8..]),
            next_txn_seq_number: LE::read_u64(&buf[16..]),
            replay_journal: LE::read_u64(&buf[24..]),
        };
        if h.magic != SESPARSE_VOLATILE_MAGIC {
            return Err(VmdkError::BadMagic {
                structure: "seSparse volatile header",
                offset: at,
                found: h.magic,
            });
        }
        if h.replay_journal != 0 {
            return Err(VmdkError::Unsupported(
                "seSparse image is dirty (its journal needs replaying)".into(),
            ));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first 0x50 bytes of a header as `qemu-img create -f vmdk x 8M` writes it.
    const QEMU_HEADER: [u8; 0x50] = [
        0x4b, 0x44, 0x4d, 0x56, // "KDMV"
        0x01, 0x00, 0x00, 0x00, // version 1
        0x03, 0x00, 0x00, 0x00, // flags: NL_DETECT | RGD
        0x00, 0x40, 0, 0, 0, 0, 0, 0, // capacity 0x4000 sectors (8 MiB)
        0x80, 0, 0, 0, 0, 0, 0, 0, // grain 128 sectors (64 KiB)
        0x01, 0, 0, 0, 0, 0, 0, 0, // descriptor at sector 1
        0x14, 0, 0, 0, 0, 0, 0, 0, // descriptor 20 sectors
        0x00, 0x02, 0x00, 0x00, // 512 GTEs per GT
        0x15, 0, 0, 0, 0, 0, 0, 0, // redundant GD at sector 21
        0x1a, 0, 0, 0, 0, 0, 0, 0, // GD at sector 26
        0x80, 0, 0, 0, 0, 0, 0, 0,    // overhead 128 sectors
        0x00, // clean
        0x0a, 0x20, 0x0d, 0x0a, // newline check
        0x00, 0x00, // no compression
        0x00, // first padding byte
    ];

    #[test]
    fn sparse_header_round_trip() {
        let mut buf = [0u8; 512];
        buf[..0x50].copy_from_slice(&QEMU_HEADER);
        let h = SparseHeader::parse(&buf, 0).unwrap();
        assert_eq!(h.version, 1);
        assert_eq!(h.flags, FLAG_NL_DETECT | FLAG_RGD);
        assert_eq!(h.capacity, 0x4000);
        assert_eq!(h.grain_size, 128);
        assert_eq!(h.rgd_offset, 21);
        assert_eq!(h.gd_offset, 26);
        assert_eq!(h.overhead, 128);
        assert_eq!(h.newline_check, NEWLINE_CHECK);
        assert!(!h.compressed());
        let mut out = [0xffu8; 512];
        h.write_to(&mut out);
        assert_eq!(out, buf);
        buf[0] = b'X';
        assert!(matches!(
            SparseHeader::parse(&buf, 0),
            Err(VmdkError::BadMagic { .. })
        ));
        assert!(SparseHeader::parse(&buf[..100], 0).is_err());
    }

    #[test]
    fn markers_round_trip() {
        let m = Marker {
            num_sectors: 4,
            size: 0,
            kind: MARKER_GT,
        };
        let mut b = [0xaau8; 512];
        m.write_to(&mut b);
        assert_eq!(&b[..16], &[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert!(b[16..].iter().all(|&x| x == 0));
        assert_eq!(Marker::parse(&b), m);
        let g = GrainMarker {
            lba: 0x80,
            size: 0x138,
        };
        let mut b = [0u8; 12];
        g.write_to(&mut b);
        assert_eq!(b, [0x80, 0, 0, 0, 0, 0, 0, 0, 0x38, 0x01, 0, 0]);
        assert_eq!(GrainMarker::parse(&b), g);
    }

    #[test]
    fn cowd_and_sesparse_round_trip() {
        let c = CowdHeader {
            version: 1,
            flags: 3,
            capacity: 0x2000,
            grain_size: 1,
            gd_offset: 4,
            num_gd_entries: 2,
            free_sector: 100,
        };
        let mut b = [0u8; 512];
        c.write_to(&mut b);
        assert_eq!(&b[..4], b"COWD");
        assert_eq!(CowdHeader::parse(&b).unwrap(), c);
        let s = SeSparseConstHeader {
            magic: SESPARSE_CONST_MAGIC,
            version: SESPARSE_VERSION,
            capacity: 1 << 20,
            grain_size: 8,
            grain_table_size: 64,
            grain_dir_offset: 0x800,
            grain_dir_size: 0x80,
            ..Default::default()
        };
        let mut b = [0u8; 512];
        s.write_to(&mut b);
        assert_eq!(SeSparseConstHeader::parse(&b).unwrap(), s);
        b[500] = 1;
        assert!(matches!(
            SeSparseConstHeader::parse(&b),
            Err(VmdkError::Unsupported(_))
        ));
    }
}

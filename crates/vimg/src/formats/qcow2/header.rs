//! qcow2 on-disk structures (QEMU `docs/interop/qcow2.txt`): the header (v2 and v3), header
//! extensions, the feature name table, the bitmaps extension and bitmap directory entries,
//! snapshot table entries, L1/L2 entries and the compressed cluster descriptor, and refcount
//! entries of every width. Each struct has `parse` and `write_to`; all numbers are big endian.
//!
//! Parsing checks every field against its range ("Header", "Header extensions", "Cluster
//! mapping" and "Snapshots" sections of the spec, with QEMU's implementation limits as the
//! floor). Checks that need the file (past the end, overlaps) live in `read.rs`.

use byteorder::{BigEndian as BE, ByteOrder};

use super::error::{field_err, Qcow2Error};
use crate::error::Result;

/// `QFI\xfb`: the qcow2 magic at offset 0.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Length of the version 2 header (and of the fields every version shares).
pub const V2_HEADER_LEN: usize = 72;
/// Shortest version 3 header (through `header_length`).
pub const V3_MIN_HEADER_LEN: usize = 104;
/// Length of the version 3 header vimg writes: the `compression_type` byte padded to 8.
pub const V3_HEADER_LEN: usize = 112;
/// Smallest cluster: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster QEMU opens: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need subclusters of at least 512 bytes (32 per cluster).
pub const MIN_EXTL2_CLUSTER_BITS: u32 = 14;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u64 = 32;

/// Incompatible feature bit 0: refcounts may be inconsistent (lazy refcounts in use).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image may be corrupt; it must not be written.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: `compression_type` is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended (128-bit) L2 entries with subclusters.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit vimg understands.
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature bit 1: the external data file is a valid raw image by itself.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// `compression_type` 0: zlib (raw deflate, 4 KiB window).
pub const COMPRESSION_ZLIB: u8 = 0;
/// `compression_type` 1: zstd.
pub const COMPRESSION_ZSTD: u8 = 1;

/// Header extension type: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension type: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension type: persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension type: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension type: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Bits 9-55 of an L1 entry: the L2 table offset.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits 0-8 and 56-62 of an L1 entry must be zero.
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Bits 9-55 of a standard L2 entry: the host cluster offset.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits 1-8 and 56-61 of a standard cluster descriptor must be zero.
pub const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Bit 63 of L1/L2 entries: refcount is exactly one.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard cluster descriptor: the cluster reads as zeros (v3 only).
pub const OFLAG_ZERO: u64 = 1;
/// Bits 9-63 of a refcount table entry: the refcount block offset.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Bits 0-8 of a refcount table entry must be zero.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;

/// QEMU's cap on the active L1 table: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's cap on the refcount table: 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's cap on the number of snapshots.
pub const MAX_SNAPSHOTS: u64 = 65536;
/// QEMU's cap on the whole snapshot table: 1 KiB per snapshot on average.
pub const MAX_SNAPSHOTS_BYTES: u64 = 1024 * MAX_SNAPSHOTS;
/// QEMU's cap on a snapshot entry's extra data.
pub const MAX_SNAPSHOT_EXTRA: u64 = 1024;
/// Length of the fixed part of a snapshot table entry.
pub const SNAPSHOT_HEADER_LEN: usize = 40;
/// The spec's longest backing file name.
pub const MAX_BACKING_NAME: u64 = 1023;
/// QEMU's cap on persistent bitmaps.
pub const MAX_BITMAPS: u64 = 65535;
/// QEMU's cap on the bitmap directory.
pub const MAX_BITMAP_DIRECTORY: u64 = 1024 * MAX_BITMAPS;
/// Length of the fixed part of a bitmap directory entry.
pub const BITMAP_ENTRY_LEN: usize = 24;
/// Bitmap flag 0: not saved correctly.
pub const BME_FLAG_IN_USE: u32 = 1 << 0;
/// Bitmap flag 1: enabled (tracks writes).
pub const BME_FLAG_AUTO: u32 = 1 << 1;
/// Bitmap flag 2: unknown extra data may be ignored.
pub const BME_FLAG_EXTRA_COMPAT: u32 = 1 << 2;
/// Length of one feature name table entry.
pub const FEATURE_NAME_LEN: usize = 48;

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// The image header (first cluster, offset 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (not NUL-terminated); 0 when there is none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// v3: incompatible feature bits (0 in v2).
    pub incompatible_features: u64,
    /// v3: compatible feature bits (0 in v2).
    pub compatible_features: u64,
    /// v3: autoclear feature bits (0 in v2).
    pub autoclear_features: u64,
    /// v3: log2 of the refcount width in bits (4 in v2).
    pub refcount_order: u32,
    /// v3: header length in bytes (72 in v2).
    pub header_length: u32,
    /// v3 with `header_length > 104`: 0 zlib, 1 zstd.
    pub compression_type: u8,
}

impl Header {
    /// A fresh header with the given geometry and nothing else set.
    pub fn new(version: u32, cluster_bits: u32, size: u64) -> Header {
        Header {
            version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: if version == 2 {
                V2_HEADER_LEN as u32
            } else {
                V3_HEADER_LEN as u32
            },
            compression_type: COMPRESSION_ZLIB,
        }
    }

    /// Parses and range-checks the header at the start of `buf`, which must hold at least
    /// `header_length` bytes (the caller passes the first cluster).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN {
            return Err(Qcow2Error::Truncated(buf.len() as u64).into());
        }
        if buf[..4] != MAGIC {
            return Err(Qcow2Error::BadMagic(BE::read_u32(&buf[0..])).into());
        }
        let version = BE::read_u32(&buf[4..]);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Version(version).into());
        }
        let cluster_bits = BE::read_u32(&buf[20..]);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Qcow2Error::ClusterBits(cluster_bits).into());
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: BE::read_u64(&buf[8..]),
            backing_file_size: BE::read_u32(&buf[16..]),
            cluster_bits,
            size: BE::read_u64(&buf[24..]),
            crypt_method: BE::read_u32(&buf[32..]),
            l1_size: BE::read_u32(&buf[36..]),
            l1_table_offset: BE::read_u64(&buf[40..]),
            refcount_table_offset: BE::read_u64(&buf[48..]),
            refcount_table_clusters: BE::read_u32(&buf[56..]),
            nb_snapshots: BE::read_u32(&buf[60..]),
            snapshots_offset: BE::read_u64(&buf[64..]),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: COMPRESSION_ZLIB,
        };
        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LEN {
                return Err(Qcow2Error::Truncated(buf.len() as u64).into());
            }
            h.incompatible_features = BE::read_u64(&buf[72..]);
            h.compatible_features = BE::read_u64(&buf[80..]);
            h.autoclear_features = BE::read_u64(&buf[88..]);
            h.refcount_order = BE::read_u32(&buf[96..]);
            h.header_length = BE::read_u32(&buf[100..]);
            let hl = u64::from(h.header_length);
            if hl < V3_MIN_HEADER_LEN as u64 {
                return field_err("header_length", hl, "shorter than 104 bytes");
            }
            if hl > cluster_size {
                return field_err("header_length", hl, "exceeds the cluster size");
            }
            if hl % 8 != 0 {
                return field_err("header_length", hl, "not a multiple of 8");
            }
            if hl > V3_MIN_HEADER_LEN as u64 {
                if buf.len() <= V3_MIN_HEADER_LEN {
                    return Err(Qcow2Error::Truncated(buf.len() as u64).into());
                }
                h.compression_type = buf[V3_MIN_HEADER_LEN];
            }
        }
        h.validate()?;
        Ok(h)
    }

    /// Range checks that need no file access.
    fn validate(&self) -> Result<()> {
        let cs = self.cluster_size();
        if self.backing_file_offset > cs {
            return field_err(
                "backing_file_offset",
                self.backing_file_offset,
                "not inside the first cluster",
            );
        }
        if self.backing_file_offset != 0 {
            let max = MAX_BACKING_NAME.min(cs - self.backing_file_offset);
            if u64::from(self.backing_file_size) > max {
                return field_err(
                    "backing_file_size",
                    self.backing_file_size.into(),
                    "backing file name too long",
                );
            }
        }
        if self.refcount_order > 6 {
            return field_err(
                "refcount_order",
                self.refcount_order.into(),
                "refcount entries may not exceed 64 bits",
            );
        }
        if self.crypt_method > 2 {
            return field_err(
                "crypt_method",
                self.crypt_method.into(),
                "unknown encryption method",
            );
        }
        match self.compression_type {
            COMPRESSION_ZLIB => {
                if self.incompatible_features & INCOMPAT_COMPRESSION != 0 {
                    return field_err(
                        "incompatible_features",
                        self.incompatible_features,
                        "compression type bit set with zlib compression",
                    );
                }
            }
            COMPRESSION_ZSTD => {
                if self.incompatible_features & INCOMPAT_COMPRESSION == 0 {
                    return field_err(
                        "incompatible_features",
                        self.incompatible_features,
                        "compression type bit must be set for zstd compression",
                    );
                }
            }
            other => return field_err("compression_type", other.into(), "unknown compression"),
        }
        if self.extended_l2() && self.cluster_bits < MIN_EXTL2_CLUSTER_BITS {
            return field_err(
                "cluster_bits",
                self.cluster_bits.into(),
                "extended L2 entries need clusters of at least 16 KiB",
            );
        }
        if self.refcount_table_clusters == 0 {
            return field_err("refcount_table_clusters", 0, "no refcount table");
        }
        Ok(())
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// True when the image uses extended L2 entries.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Bytes `write_to` writes: 72 for v2, `header_length` for v3.
    pub fn len(&self) -> usize {
        if self.version == 2 {
            V2_HEADER_LEN
        } else {
            self.header_length as usize
        }
    }

    /// True when the header has no bytes (never; for clippy's `len` convention).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the header into `buf[..self.len()]` (fields past the known ones are zeroed).
    pub fn write_to(&self, buf: &mut [u8]) {
        let n = self.len();
        buf[..n].fill(0);
        buf[..4].copy_from_slice(&MAGIC);
        put32(buf, 4, self.version);
        put64(buf, 8, self.backing_file_offset);
        put32(buf, 16, self.backing_file_size);
        put32(buf, 20, self.cluster_bits);
        put64(buf, 24, self.size);
        put32(buf, 32, self.crypt_method);
        put32(buf, 36, self.l1_size);
        put64(buf, 40, self.l1_table_offset);
        put64(buf, 48, self.refcount_table_offset);
        put32(buf, 56, self.refcount_table_clusters);
        put32(buf, 60, self.nb_snapshots);
        put64(buf, 64, self.snapshots_offset);
        if self.version >= 3 {
            put64(buf, 72, self.incompatible_features);
            put64(buf, 80, self.compatible_features);
            put64(buf, 88, self.autoclear_features);
            put32(buf, 96, self.refcount_order);
            put32(buf, 100, self.header_length);
            if n > V3_MIN_HEADER_LEN {
                buf[V3_MIN_HEADER_LEN] = self.compression_type;
            }
        }
    }
}

/// Numbers derived from the header that the table walk needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Cluster size.
    pub cluster_size: u64,
    /// Extended (128-bit) L2 entries.
    pub extended_l2: bool,
    /// log2 of the entries per L2 table.
    pub l2_bits: u32,
    /// Subcluster size (the cluster size without extended L2).
    pub subcluster_size: u64,
    /// Bit where the compressed sector count starts.
    pub csize_shift: u32,
    /// Mask of the compressed sector count (after shifting).
    pub csize_mask: u64,
    /// Mask of the compressed host offset.
    pub coffset_mask: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// log2 of the entries per refcount block.
    pub refblock_bits: u32,
}

impl Geometry {
    /// The geometry of a cluster size, L2 format and refcount width.
    pub fn new(cluster_bits: u32, extended_l2: bool, refcount_order: u32) -> Geometry {
        let cluster_size = 1u64 << cluster_bits;
        let entry_bits = if extended_l2 { 4 } else { 3 };
        let csize_shift = 62 - (cluster_bits - 8);
        Geometry {
            cluster_bits,
            cluster_size,
            extended_l2,
            l2_bits: cluster_bits - entry_bits,
            subcluster_size: if extended_l2 {
                cluster_size / SUBCLUSTERS
            } else {
                cluster_size
            },
            csize_shift,
            csize_mask: (1u64 << (cluster_bits - 8)) - 1,
            coffset_mask: (1u64 << csize_shift) - 1,
            refcount_order,
            // cluster_size * 8 bits / 2^order bits per entry.
            refblock_bits: cluster_bits + 3 - refcount_order,
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        1u64 << self.l2_bits
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        1u64 << (self.l2_bits + self.cluster_bits)
    }

    /// Entries per refcount block.
    pub fn refblock_entries(&self) -> u64 {
        1u64 << self.refblock_bits
    }

    /// L1 entries needed for a virtual disk of `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let span_bits = self.l2_bits + self.cluster_bits;
        if span_bits >= 64 {
            return u64::from(size > 0);
        }
        size.div_ceil(1u64 << span_bits)
    }

    /// Largest refcount value.
    pub fn refcount_max(&self) -> u64 {
        let bits = 1u32 << self.refcount_order;
        if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    }
}

/// One entry of the feature name table extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number 0..=63.
    pub bit: u8,
    /// Name (at most 46 bytes).
    pub name: String,
}

impl FeatureName {
    /// Parses one 48-byte entry.
    pub fn parse(b: &[u8]) -> Result<FeatureName> {
        if b.len() < FEATURE_NAME_LEN {
            return Err(Qcow2Error::Truncated(b.len() as u64).into());
        }
        let raw = &b[2..FEATURE_NAME_LEN];
        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        Ok(FeatureName {
            kind: b[0],
            bit: b[1],
            name: String::from_utf8_lossy(&raw[..end]).into_owned(),
        })
    }

    /// Writes the 48-byte entry.
    pub fn write_to(&self, b: &mut [u8]) {
        b[..FEATURE_NAME_LEN].fill(0);
        b[0] = self.kind;
        b[1] = self.bit;
        let n = self.name.len().min(FEATURE_NAME_LEN - 2);
        b[2..2 + n].copy_from_slice(&self.name.as_bytes()[..n]);
    }
}

/// The feature names QEMU 10 writes into every v3 image it creates, in its order.
pub fn qemu_feature_table() -> Vec<FeatureName> {
    let f = |kind: u8, bit: u8, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    };
    vec![
        f(0, 0, "dirty bit"),
        f(0, 1, "corrupt bit"),
        f(0, 2, "external data file"),
        f(0, 3, "compression type"),
        f(0, 4, "extended L2 entries"),
        f(1, 0, "lazy refcounts"),
        f(2, 0, "bitmaps"),
        f(2, 1, "raw external data"),
    ]
}

/// Why a bitmaps header extension or a bitmap directory entry is refused (qcow2 spec,
/// "Bitmaps extension" and "Bitmap directory"); the caller adds where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BitmapFault {
    /// The extension data is not 24 bytes.
    #[error("length {0} is not {len}", len = BitmapsExt::LEN)]
    Length(usize),
    /// The reserved field of the extension is not zero.
    #[error("reserved field is not zero")]
    Reserved,
    /// nb_bitmaps outside 1..=65535.
    #[error("{0} bitmaps (allowed 1..={max})", max = MAX_BITMAPS)]
    Count(u32),
    /// bitmap_directory_offset not a multiple of the cluster size.
    #[error("bitmap directory offset {0:#x} is not cluster aligned")]
    DirectoryAlign(u64),
    /// bitmap_directory_size over the limit.
    #[error("bitmap directory size {0} exceeds {max}", max = MAX_BITMAP_DIRECTORY)]
    DirectorySize(u64),
    /// Fewer than 24 bytes for a directory entry.
    #[error("truncated")]
    Truncated,
    /// A bitmap type other than 1 (dirty tracking).
    #[error("unknown bitmap type {0}")]
    Type(u8),
    /// granularity_bits outside 9..=31.
    #[error("granularity 2^{0} is outside 2^9..2^31")]
    Granularity(u8),
    /// Reserved flag bits set.
    #[error("reserved flags set ({0:#x})")]
    Flags(u32),
    /// name_size outside 1..=1023.
    #[error("name length {0} is outside 1..=1023")]
    NameSize(u16),
    /// bitmap_table_offset not a multiple of the cluster size.
    #[error("bitmap table offset {0:#x} is not cluster aligned")]
    TableAlign(u64),
    /// More than 1024 bytes of extra data.
    #[error("{0} bytes of extra data")]
    ExtraData(u32),
}

/// Why an L2 table entry (with its subcluster bitmap) is refused (qcow2 spec, "Cluster
/// mapping"); the caller adds the table, index and raw value ([`Qcow2Error::L2Entry`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum L2Fault {
    /// Compressed descriptor with bit 63 set.
    #[error("compressed cluster with the copied flag (bit 63) set")]
    CompressedCopied,
    /// Compressed cluster while data lives in an external file.
    #[error("compressed cluster in an image with an external data file")]
    CompressedDataFile,
    /// Compressed cluster with subcluster bits.
    #[error("compressed cluster with a non-zero subcluster bitmap {0:#x}")]
    CompressedBitmap(u64),
    /// Compressed cluster offset using bits from 56 up.
    #[error("compressed cluster offset {0:#x} beyond 2^56")]
    CompressedOffset(u64),
    /// Reserved bits of a standard entry set (the reserved bits found).
    #[error("reserved bits set ({0:#x})")]
    Reserved(u64),
    /// Host offset 0 with the copied flag and no external data file.
    #[error("host offset 0 (the header) with the copied flag set")]
    HeaderOffset,
    /// A host offset inside a cluster.
    #[error("host offset {0:#x} is not cluster aligned")]
    Unaligned(u64),
    /// Bit 0 set in an extended L2 entry.
    #[error("zero flag (bit 0) set in an extended L2 entry")]
    ExtendedZeroFlag,
    /// Subclusters marked both allocated and zero.
    #[error("subclusters both allocated and zero (bitmap {0:#018x})")]
    AllocatedAndZero(u64),
    /// Allocated subclusters in a cluster with no host offset.
    #[error("unallocated cluster with allocated subclusters (bitmap {0:#018x})")]
    UnallocatedSubclusters(u64),
    /// A subcluster bitmap in an image without extended L2 entries.
    #[error("bitmap without extended L2 entries")]
    StrayBitmap,
    /// The zero flag in a version 2 image.
    #[error("zero flag (bit 0) set in a version 2 image")]
    ZeroFlagV2,
}

/// The bitmaps header extension (24 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps (1..=65535).
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory.
    pub directory_offset: u64,
}

impl BitmapsExt {
    /// Length of the extension data.
    pub const LEN: usize = 24;

    /// Parses and checks the extension data (`cluster_size` for the alignment rule).
    pub fn parse(b: &[u8], cluster_size: u64) -> std::result::Result<BitmapsExt, BitmapFault> {
        if b.len() != Self::LEN {
            return Err(BitmapFault::Length(b.len()));
        }
        let e = BitmapsExt {
            nb_bitmaps: BE::read_u32(&b[0..]),
            directory_size: BE::read_u64(&b[8..]),
            directory_offset: BE::read_u64(&b[16..]),
        };
        if BE::read_u32(&b[4..]) != 0 {
            return Err(BitmapFault::Reserved);
        }
        if e.nb_bitmaps == 0 || u64::from(e.nb_bitmaps) > MAX_BITMAPS {
            return Err(BitmapFault::Count(e.nb_bitmaps));
        }
        if !e.directory_offset.is_multiple_of(cluster_size) {
            return Err(BitmapFault::DirectoryAlign(e.directory_offset));
        }
        if e.directory_size > MAX_BITMAP_DIRECTORY {
            return Err(BitmapFault::DirectorySize(e.directory_size));
        }
        Ok(e)
    }

    /// Writes the extension data.
    pub fn write_to(&self, b: &mut [u8]) {
        put32(b, 0, self.nb_bitmaps);
        put32(b, 4, 0);
        put64(b, 8, self.directory_size);
        put64(b, 16, self.directory_offset);
    }
}

/// One bitmap directory entry (fixed part; the name follows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// `BME_FLAG_*`.
    pub flags: u32,
    /// 1: dirty tracking bitmap.
    pub kind: u8,
    /// log2 of the bytes per bit.
    pub granularity_bits: u8,
    /// Length of the name.
    pub name_size: u16,
    /// Length of the extra data before the name.
    pub extra_data_size: u32,
}

impl BitmapEntry {
    /// Parses and checks the fixed 24 bytes.
    pub fn parse(b: &[u8], cluster_size: u64) -> std::result::Result<BitmapEntry, BitmapFault> {
        if b.len() < BITMAP_ENTRY_LEN {
            return Err(BitmapFault::Truncated);
        }
        let e = BitmapEntry {
            table_offset: BE::read_u64(&b[0..]),
            table_size: BE::read_u32(&b[8..]),
            flags: BE::read_u32(&b[12..]),
            kind: b[16],
            granularity_bits: b[17],
            name_size: BE::read_u16(&b[18..]),
            extra_data_size: BE::read_u32(&b[20..]),
        };
        if e.kind != 1 {
            return Err(BitmapFault::Type(e.kind));
        }
        if !(9..=31).contains(&e.granularity_bits) {
            return Err(BitmapFault::Granularity(e.granularity_bits));
        }
        if e.flags & !(BME_FLAG_IN_USE | BME_FLAG_AUTO | BME_FLAG_EXTRA_COMPAT) != 0 {
            return Err(BitmapFault::Flags(e.flags));
        }
        if e.name_size == 0 || e.name_size > 1023 {
            return Err(BitmapFault::NameSize(e.name_size));
        }
        if !e.table_offset.is_multiple_of(cluster_size) {
            return Err(BitmapFault::TableAlign(e.table_offset));
        }
        if e.extra_data_size > 1024 {
            return Err(BitmapFault::ExtraData(e.extra_data_size));
        }
        Ok(e)
    }

    /// Bytes of the whole entry, padded to 8.
    pub fn entry_len(&self) -> u64 {
        (BITMAP_ENTRY_LEN as u64 + u64::from(self.extra_data_size) + u64::from(self.name_size))
            .div_ceil(8)
            * 8
    }

    /// Writes the fixed 24 bytes.
    pub fn write_to(&self, b: &mut [u8]) {
        put64(b, 0, self.table_offset);
        put32(b, 8, self.table_size);
        put32(b, 12, self.flags);
        b[16] = self.kind;
        b[17] = self.granularity_bits;
        put16(b, 18, self.name_size);
        put32(b, 20, self.extra_data_size);
    }
}

/// Header extensions found between the header and the backing file name (or the end of the
/// first cluster).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Backing file format name.
    pub backing_format: Option<String>,
    /// Feature name table.
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension, or why it does not parse (callers honour the autoclear bit).
    pub bitmaps: Option<Result<BitmapsExt, Qcow2Error>>,
    /// External data file name.
    pub data_file: Option<String>,
    /// Encryption header pointer (offset, length).
    pub crypto: Option<(u64, u64)>,
    /// Types of extensions vimg does not know (tolerated).
    pub unknown: Vec<u32>,
}

/// Parses the header extensions in `buf[start..end]` (`buf` holds the file from offset 0,
/// zero-padded to `end`).
pub fn parse_extensions(
    buf: &[u8],
    start: usize,
    end: usize,
    cluster_size: u64,
) -> Result<Extensions> {
    let mut ext = Extensions::default();
    let mut seen: Vec<u32> = Vec::new();
    let mut off = start;
    let end = end.min(buf.len());
    while off < end {
        let bad = |why: String, magic: u32| -> crate::Error {
            Qcow2Error::Extension {
                magic,
                offset: off as u64,
                why,
            }
            .into()
        };
        if end - off < 8 {
            return Err(bad("extension header does not fit".into(), 0));
        }
        let magic = BE::read_u32(&buf[off..]);
        let len = BE::read_u32(&buf[off + 4..]) as usize;
        let data_at = off + 8;
        if len > end - data_at {
            return Err(bad(
                format!("length {len} runs past the extension area"),
                magic,
            ));
        }
        let data = &buf[data_at..data_at + len];
        if magic == EXT_END {
            break;
        }
        if magic != EXT_FEATURE_TABLE && seen.contains(&magic) {
            return Err(bad("appears twice".into(), magic));
        }
        seen.push(magic);
        match magic {
            EXT_BACKING_FORMAT => {
                if len >= 16 {
                    return Err(bad(format!("backing format name of {len} bytes"), magic));
                }
                ext.backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            EXT_FEATURE_TABLE => {
                // QEMU reads the table zero-padded and stops at the first entry without a
                // name, so a short last entry still names its bit (iotest 036 writes one).
                for e in data.chunks(FEATURE_NAME_LEN) {
                    let mut entry = [0u8; FEATURE_NAME_LEN];
                    entry[..e.len()].copy_from_slice(e);
                    let f = FeatureName::parse(&entry)?;
                    if f.name.is_empty() {
                        break;
                    }
                    ext.feature_names.push(f);
                }
            }
            EXT_BITMAPS => {
                ext.bitmaps = Some(BitmapsExt::parse(data, cluster_size).map_err(|why| {
                    Qcow2Error::Extension {
                        magic,
                        offset: off as u64,
                        why: why.to_string(),
                    }
                }))
            }
            EXT_DATA_FILE => {
                ext.data_file = Some(String::from_utf8_lossy(data).into_owned());
            }
            EXT_CRYPTO => {
                if len != 16 {
                    return Err(bad(format!("length {len} is not 16"), magic));
                }
                ext.crypto = Some((BE::read_u64(&data[0..]), BE::read_u64(&data[8..])));
            }
            other => ext.unknown.push(other),
        }
        // Extension data is padded to a multiple of 8.
        off = data_at + len.div_ceil(8) * 8;
    }
    Ok(ext)
}

/// Writes one extension (type, length, data, zero padding to 8) at `buf[off..]`; returns the
/// offset after it.
pub fn write_extension(buf: &mut [u8], off: usize, magic: u32, data: &[u8]) -> usize {
    put32(buf, off, magic);
    put32(buf, off + 4, data.len() as u32);
    buf[off + 8..off + 8 + data.len()].copy_from_slice(data);
    let padded = data.len().div_ceil(8) * 8;
    buf[off + 8 + data.len()..off + 8 + padded].fill(0);
    off + 8 + padded
}

/// The fixed 40 bytes of a snapshot table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Length of the ID string.
    pub id_str_size: u16,
    /// Length of the name.
    pub name_size: u16,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest run time in nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size (32-bit; superseded by the extra data).
    pub vm_state_size: u32,
    /// Length of the extra data.
    pub extra_data_size: u32,
}

impl SnapshotHeader {
    /// Parses the fixed part.
    pub fn parse(b: &[u8]) -> Result<SnapshotHeader> {
        if b.len() < SNAPSHOT_HEADER_LEN {
            return Err(Qcow2Error::Truncated(b.len() as u64).into());
        }
        Ok(SnapshotHeader {
            l1_table_offset: BE::read_u64(&b[0..]),
            l1_size: BE::read_u32(&b[8..]),
            id_str_size: BE::read_u16(&b[12..]),
            name_size: BE::read_u16(&b[14..]),
            date_sec: BE::read_u32(&b[16..]),
            date_nsec: BE::read_u32(&b[20..]),
            vm_clock_nsec: BE::read_u64(&b[24..]),
            vm_state_size: BE::read_u32(&b[32..]),
            extra_data_size: BE::read_u32(&b[36..]),
        })
    }

    /// Writes the fixed part.
    pub fn write_to(&self, b: &mut [u8]) {
        put64(b, 0, self.l1_table_offset);
        put32(b, 8, self.l1_size);
        put16(b, 12, self.id_str_size);
        put16(b, 14, self.name_size);
        put32(b, 16, self.date_sec);
        put32(b, 20, self.date_nsec);
        put64(b, 24, self.vm_clock_nsec);
        put32(b, 32, self.vm_state_size);
        put32(b, 36, self.extra_data_size);
    }

    /// Bytes of the whole entry, padded to 8.
    pub fn entry_len(&self) -> u64 {
        (SNAPSHOT_HEADER_LEN as u64
            + u64::from(self.extra_data_size)
            + u64::from(self.id_str_size)
            + u64::from(self.name_size))
        .div_ceil(8)
            * 8
    }
}

/// The known fields of a snapshot's extra data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotExtra {
    /// 64-bit VM state size (bytes 0-7).
    pub vm_state_size_large: Option<u64>,
    /// Virtual disk size at snapshot time (bytes 8-15).
    pub disk_size: Option<u64>,
    /// Instructions executed, when recorded (bytes 16-23; all ones = not recorded).
    pub icount: Option<u64>,
}

impl SnapshotExtra {
    /// Parses what `b` (the extra data) holds.
    pub fn parse(b: &[u8]) -> SnapshotExtra {
        let at = |i: usize| (b.len() >= i + 8).then(|| BE::read_u64(&b[i..]));
        SnapshotExtra {
            vm_state_size_large: at(0),
            disk_size: at(8),
            icount: at(16).filter(|v| *v != u64::MAX),
        }
    }
}

/// What one (standard or extended) L2 entry says about its guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cluster {
    /// Not allocated: backing file or zeros.
    Unallocated,
    /// Reads as zeros (v3 zero flag); `host` is a preallocated cluster, if any.
    Zero {
        /// Preallocated host cluster.
        host: Option<u64>,
    },
    /// Data at a host cluster.
    Normal {
        /// Host cluster offset.
        host: u64,
    },
    /// Compressed data.
    Compressed {
        /// Host offset of the compressed bytes (any alignment).
        offset: u64,
        /// Bytes from `offset` to the end of the last sector the data uses.
        len: u64,
    },
    /// Extended L2: per-subcluster state of a standard cluster.
    Sub {
        /// Host cluster, when the entry has one.
        host: Option<u64>,
        /// Bit i: subcluster i is allocated (data at `host + i * subcluster_size`).
        alloc: u32,
        /// Bit i: subcluster i reads as zeros.
        zero: u32,
    },
}

impl Cluster {
    /// The host cluster the entry reserves, for overlap and sharing checks (compressed
    /// clusters excluded).
    pub fn host(&self) -> Option<u64> {
        match *self {
            Cluster::Zero { host } | Cluster::Sub { host, .. } => host,
            Cluster::Normal { host } => Some(host),
            _ => None,
        }
    }
}

/// Decodes an L2 entry (`bitmap` is the second half of an extended entry, 0 otherwise).
/// `data_file` says whether host offset 0 is valid (external data file with bit 63 set);
/// `version` forbids the zero flag in v2. Returns why the entry is invalid on error.
pub fn decode_l2(
    entry: u64,
    bitmap: u64,
    g: &Geometry,
    version: u32,
    data_file: bool,
) -> std::result::Result<Cluster, L2Fault> {
    if entry & OFLAG_COMPRESSED != 0 {
        if entry & OFLAG_COPIED != 0 {
            return Err(L2Fault::CompressedCopied);
        }
        if data_file {
            return Err(L2Fault::CompressedDataFile);
        }
        if bitmap != 0 {
            return Err(L2Fault::CompressedBitmap(bitmap));
        }
        let offset = entry & g.coffset_mask;
        if offset >> 56 != 0 {
            return Err(L2Fault::CompressedOffset(offset));
        }
        let sectors = ((entry >> g.csize_shift) & g.csize_mask) + 1;
        let len = sectors * 512 - (offset & 511);
        return Ok(Cluster::Compressed { offset, len });
    }
    if entry & L2E_STD_RESERVED_MASK != 0 {
        return Err(L2Fault::Reserved(entry & L2E_STD_RESERVED_MASK));
    }
    let raw_off = entry & L2E_OFFSET_MASK;
    if raw_off == 0 && entry & OFLAG_COPIED != 0 && !data_file {
        // Offset 0 with bit 63 names guest data at the header; only an external data
        // file makes host offset 0 valid.
        return Err(L2Fault::HeaderOffset);
    }
    let host = if raw_off != 0 || (data_file && entry & OFLAG_COPIED != 0) {
        Some(raw_off)
    } else {
        None
    };
    if let Some(h) = host {
        if h & (g.cluster_size - 1) != 0 {
            return Err(L2Fault::Unaligned(h));
        }
    }
    if g.extended_l2 {
        if entry & OFLAG_ZERO != 0 {
            return Err(L2Fault::ExtendedZeroFlag);
        }
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(L2Fault::AllocatedAndZero(bitmap));
        }
        if host.is_none() && alloc != 0 {
            return Err(L2Fault::UnallocatedSubclusters(bitmap));
        }
        return Ok(Cluster::Sub { host, alloc, zero });
    }
    if bitmap != 0 {
        return Err(L2Fault::StrayBitmap);
    }
    if entry & OFLAG_ZERO != 0 {
        if version < 3 {
            return Err(L2Fault::ZeroFlagV2);
        }
        return Ok(Cluster::Zero { host });
    }
    Ok(match host {
        Some(host) => Cluster::Normal { host },
        None => Cluster::Unallocated,
    })
}

/// Encodes a compressed cluster descriptor for `len` bytes at host `offset`.
pub fn encode_compressed(g: &Geometry, offset: u64, len: u64) -> u64 {
    // Additional sectors beyond the one holding `offset`.
    let extra = ((offset + len - 1) >> 9) - (offset >> 9);
    OFLAG_COMPRESSED | (extra << g.csize_shift) | offset
}

/// Reads refcount entry `index` of a refcount block of width `2^order` bits.
pub fn refcount_get(block: &[u8], order: u32, index: usize) -> u64 {
    if order < 3 {
        let per_byte_bits = 3 - order;
        let byte = block[index >> per_byte_bits];
        let shift = (index & ((1 << per_byte_bits) - 1)) << order;
        let mask = (1u16 << (1u32 << order)) - 1;
        u64::from((u16::from(byte) >> shift) & mask)
    } else {
        let w = 1usize << (order - 3);
        let at = index * w;
        block[at..at + w]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// Sets refcount entry `index` (the value is truncated to the width).
pub fn refcount_set(block: &mut [u8], order: u32, index: usize, value: u64) {
    if order < 3 {
        let per_byte_bits = 3 - order;
        let at = index >> per_byte_bits;
        let shift = (index & ((1 << per_byte_bits) - 1)) << order;
        let mask = ((1u16 << (1u32 << order)) - 1) as u8;
        block[at] = (block[at] & !(mask << shift)) | (((value as u8) & mask) << shift);
    } else {
        let w = 1usize << (order - 3);
        let at = index * w;
        for (i, b) in block[at..at + w].iter_mut().enumerate() {
            let shift = 8 * (w - 1 - i);
            *b = if shift >= 64 {
                0
            } else {
                (value >> shift) as u8
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first 0x70 bytes of `qemu-img create -f qcow2 a.qcow2 1G` (QEMU 10.0).
    fn qemu_v3_header() -> Vec<u8> {
        let hex = concat!(
            "514649fb",         // magic "QFI\xfb"
            "00000003",         // version 3
            "0000000000000000", // backing_file_offset: none
            "00000000",         // backing_file_size
            "00000010",         // cluster_bits 16 (64 KiB)
            "0000000040000000", // size 1 GiB
            "00000000",         // crypt_method none
            "00000002",         // l1_size 2
            "0000000000030000", // l1_table_offset 0x30000
            "0000000000010000", // refcount_table_offset 0x10000
            "00000001",         // refcount_table_clusters 1
            "00000000",         // nb_snapshots 0
            "0000000000000000", // snapshots_offset 0
            "0000000000000000", // incompatible_features
            "0000000000000000", // compatible_features
            "0000000000000000", // autoclear_features
            "00000004",         // refcount_order 4 (16-bit)
            "00000070",         // header_length 112
            "00",               // compression_type zlib
            "00000000000000",   // padding to 112
        );
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn v3_header_round_trip() {
        let raw = qemu_v3_header();
        assert_eq!(raw.len(), 112);
        let h = Header::parse(&raw).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.l1_size, 2);
        assert_eq!(h.l1_table_offset, 0x30000);
        assert_eq!(h.header_length, 112);
        let mut out = vec![0xffu8; 112];
        h.write_to(&mut out);
        assert_eq!(out, raw);
        let mut fresh = Header::new(3, 16, 1 << 30);
        fresh.l1_size = 2;
        fresh.l1_table_offset = 0x30000;
        fresh.refcount_table_offset = 0x10000;
        fresh.refcount_table_clusters = 1;
        assert_eq!(fresh, h);
    }

    #[test]
    fn v2_header_round_trip() {
        let mut raw = qemu_v3_header();
        raw[7] = 2;
        raw.truncate(72);
        let h = Header::parse(&raw).unwrap();
        assert_eq!((h.version, h.refcount_order, h.header_length), (2, 4, 72));
        let mut out = vec![0u8; 72];
        h.write_to(&mut out);
        assert_eq!(out, raw);
    }

    fn parse_err(patch: impl Fn(&mut Vec<u8>)) -> String {
        let mut raw = qemu_v3_header();
        patch(&mut raw);
        Header::parse(&raw).unwrap_err().to_string()
    }

    #[test]
    fn header_rules() {
        assert!(parse_err(|r| r[0] = b'X').contains("not in qcow2 format"));
        assert!(parse_err(|r| r[7] = 4).contains("version 4"));
        assert!(parse_err(|r| r[23] = 8).contains("2^8"));
        assert!(parse_err(|r| r[23] = 22).contains("2^22"));
        assert!(parse_err(|r| r[103] = 96).contains("shorter than 104"));
        assert!(parse_err(|r| r[103] = 108).contains("multiple of 8"));
        assert!(parse_err(|r| {
            r[23] = 9;
            r[102] = 4; // header_length 0x470 > 512
        })
        .contains("exceeds the cluster size"));
        assert!(parse_err(|r| r[99] = 7).contains("64 bits"));
        assert!(parse_err(|r| r[35] = 3).contains("encryption"));
        assert!(parse_err(|r| r[104] = 1).contains("must be set"));
        assert!(parse_err(|r| r[104] = 2).contains("unknown compression"));
        assert!(parse_err(|r| r[79] = INCOMPAT_COMPRESSION as u8).contains("zlib"));
        assert!(parse_err(|r| {
            r[79] = INCOMPAT_EXTL2 as u8;
            r[23] = 13;
        })
        .contains("16 KiB"));
        assert!(parse_err(|r| r[59] = 0).contains("no refcount table"));
        assert!(parse_err(|r| r[13] = 2).contains("backing_file_offset"));
        assert!(parse_err(|r| {
            r[14] = 0xff; // backing_file_offset 0xff00
            r[15] = 0x00;
            r[18] = 0x04; // 1024 bytes
        })
        .contains("too long"));
        assert!(parse_err(|r| r.truncate(50)).contains("truncated"));
    }

    fn g64() -> Geometry {
        Geometry::new(16, false, 4)
    }

    #[test]
    fn geometry() {
        let g = g64();
        assert_eq!((g.l2_entries(), g.l2_span()), (8192, 512 << 20));
        assert_eq!((g.csize_shift, g.csize_mask), (54, 255));
        assert_eq!(g.refblock_entries(), 32768);
        assert_eq!(g.l1_entries_for(1 << 30), 2);
        assert_eq!(g.l1_entries_for((1 << 30) + 1), 3);
        assert_eq!(g.refcount_max(), 65535);
        let x = Geometry::new(14, true, 6);
        assert_eq!((x.l2_entries(), x.subcluster_size), (1024, 512));
        assert_eq!(x.refcount_max(), u64::MAX);
        assert_eq!(Geometry::new(9, false, 0).refcount_max(), 1);
    }

    #[test]
    fn extensions_parse_and_round_trip() {
        // Header of 112 bytes, then: backing format "qcow2", data file "d.bin", one
        // feature name, an unknown extension, the end marker.
        let mut buf = vec![0u8; 4096];
        let mut off = 112;
        off = write_extension(&mut buf, off, EXT_BACKING_FORMAT, b"qcow2");
        off = write_extension(&mut buf, off, EXT_DATA_FILE, b"d.bin");
        let mut f = [0u8; FEATURE_NAME_LEN];
        FeatureName {
            kind: 0,
            bit: 20,
            name: "flux capacitor".into(),
        }
        .write_to(&mut f);
        off = write_extension(&mut buf, off, EXT_FEATURE_TABLE, &f);
        off = write_extension(&mut buf, off, 0x1234_5678, &[1, 2, 3]);
        assert_eq!(off, 112 + 16 + 16 + 56 + 16);
        let e = parse_extensions(&buf, 112, 4096, 65536).unwrap();
        assert_eq!(e.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(e.data_file.as_deref(), Some("d.bin"));
        assert_eq!(e.feature_names[0].name, "flux capacitor");
        assert_eq!(e.feature_names[0].bit, 20);
        assert_eq!(e.unknown, vec![0x1234_5678]);
        assert!(e.bitmaps.is_none());
    }

    /// A feature table whose last entry is cut short still names its bit, as QEMU reads
    /// it zero-padded (iotest 036 writes a 14-byte table).
    #[test]
    fn short_feature_table_entry_names_its_bit() {
        let mut buf = vec![0u8; 4096];
        write_extension(&mut buf, 112, EXT_FEATURE_TABLE, b"\x00\x3fTest feature");
        let e = parse_extensions(&buf, 112, 4096, 65536).unwrap();
        assert_eq!(e.feature_names.len(), 1);
        assert_eq!(
            (e.feature_names[0].bit, e.feature_names[0].name.as_str()),
            (63, "Test feature")
        );
    }

    fn ext_err(magic: u32, data: &[u8], end: usize) -> String {
        let mut buf = vec![0u8; 4096];
        write_extension(&mut buf, 112, magic, data);
        parse_extensions(&buf, 112, end, 65536)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn extension_rules() {
        // Runs past the extension area.
        assert!(ext_err(EXT_DATA_FILE, &[b'x'; 100], 150).contains("runs past"));
        // Header does not fit.
        assert!(ext_err(EXT_DATA_FILE, b"x", 116).contains("does not fit"));
        // Backing format name too long (QEMU's buffer is 16 bytes).
        assert!(ext_err(EXT_BACKING_FORMAT, &[b'a'; 16], 4096).contains("backing format"));
        // Crypto header pointer of the wrong size.
        assert!(ext_err(EXT_CRYPTO, &[0; 8], 4096).contains("not 16"));
        // Twice the same extension.
        let mut buf = vec![0u8; 4096];
        let off = write_extension(&mut buf, 112, EXT_DATA_FILE, b"a");
        write_extension(&mut buf, off, EXT_DATA_FILE, b"b");
        let e = parse_extensions(&buf, 112, 4096, 65536).unwrap_err();
        assert!(e.to_string().contains("twice"));
    }

    #[test]
    fn feature_name_round_trip() {
        let raw: Vec<u8> = [0u8, 4]
            .iter()
            .copied()
            .chain(b"extended L2 entries".iter().copied())
            .chain(std::iter::repeat_n(0, 27))
            .collect();
        let f = FeatureName::parse(&raw).unwrap();
        assert_eq!(
            (f.kind, f.bit, f.name.as_str()),
            (0, 4, "extended L2 entries")
        );
        let mut out = [0xffu8; FEATURE_NAME_LEN];
        f.write_to(&mut out);
        assert_eq!(&out[..], &raw[..]);
        assert!(FeatureName::parse(&raw[..47]).is_err());
        // A full-length name has no terminating zero.
        let long = [b'n'; FEATURE_NAME_LEN];
        assert_eq!(FeatureName::parse(&long).unwrap().name.len(), 46);
    }

    #[test]
    fn bitmaps_extension_rules() {
        let ok = BitmapsExt {
            nb_bitmaps: 2,
            directory_size: 64,
            directory_offset: 0x50000,
        };
        let mut raw = [0u8; 24];
        ok.write_to(&mut raw);
        // nb_bitmaps 2, reserved 0, directory size 64, directory offset 0x50000.
        assert_eq!(&raw[..8], &[0, 0, 0, 2, 0, 0, 0, 0]);
        assert_eq!(BitmapsExt::parse(&raw, 65536).unwrap(), ok);
        let bad = |patch: &dyn Fn(&mut [u8; 24])| {
            let mut r = raw;
            patch(&mut r);
            BitmapsExt::parse(&r, 65536).unwrap_err().to_string()
        };
        assert!(bad(&|r| r[7] = 1).contains("reserved"));
        assert!(bad(&|r| r[3] = 0).contains("bitmaps"));
        assert!(bad(&|r| r[23] = 0x10).contains("aligned"));
        assert!(bad(&|r| r[8] = 1).contains("exceeds"));
        assert!(BitmapsExt::parse(&raw[..20], 65536).is_err());
    }

    #[test]
    fn bitmap_entry_rules() {
        let e = BitmapEntry {
            table_offset: 0x60000,
            table_size: 1,
            flags: BME_FLAG_AUTO,
            kind: 1,
            granularity_bits: 16,
            name_size: 3,
            extra_data_size: 0,
        };
        let mut raw = [0u8; BITMAP_ENTRY_LEN];
        e.write_to(&mut raw);
        assert_eq!(BitmapEntry::parse(&raw, 65536).unwrap(), e);
        assert_eq!(e.entry_len(), 32);
        let bad = |patch: &dyn Fn(&mut [u8; BITMAP_ENTRY_LEN])| {
            let mut r = raw;
            patch(&mut r);
            BitmapEntry::parse(&r, 65536).unwrap_err().to_string()
        };
        assert!(bad(&|r| r[16] = 2).contains("type"));
        assert!(bad(&|r| r[17] = 8).contains("granularity"));
        assert!(bad(&|r| r[17] = 32).contains("granularity"));
        assert!(bad(&|r| r[15] |= 8).contains("reserved flags"));
        assert!(bad(&|r| r[19] = 0).contains("name length"));
        assert!(bad(&|r| r[18] = 4).contains("name length"));
        assert!(bad(&|r| r[7] = 1).contains("aligned"));
        assert!(bad(&|r| r[22] = 8).contains("extra data"));
    }

    #[test]
    fn snapshot_header_round_trip() {
        // One entry as `qemu-img snapshot -c snap1` wrote it (QEMU 10.0).
        let hex = concat!(
            "0000000000360000", // L1 table offset
            "00000001",         // L1 entries
            "0001",             // ID length
            "0005",             // name length
            "6b07480c",         // date, seconds
            "00cff260",         // date, nanoseconds
            "0000000000000000", // VM clock
            "00000000",         // VM state size (32-bit)
            "00000018",         // 24 bytes of extra data
        );
        let raw: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let h = SnapshotHeader::parse(&raw).unwrap();
        assert_eq!(
            (h.l1_table_offset, h.id_str_size, h.name_size),
            (0x360000, 1, 5)
        );
        assert_eq!(h.entry_len(), 40 + 24 + 8);
        let mut out = vec![0u8; 40];
        h.write_to(&mut out);
        assert_eq!(out, raw);
        assert!(SnapshotHeader::parse(&raw[..39]).is_err());
        let mut extra = vec![0u8; 24];
        extra[15] = 0x40; // disk size 64
        let x = SnapshotExtra::parse(&extra);
        assert_eq!(x.vm_state_size_large, Some(0));
        assert_eq!(x.disk_size, Some(64));
        assert_eq!(x.icount, Some(0));
        extra[16..].fill(0xff);
        assert_eq!(SnapshotExtra::parse(&extra).icount, None);
        assert_eq!(SnapshotExtra::parse(&extra[..8]).disk_size, None);
    }

    #[test]
    fn l2_entries_decode() {
        let g = g64();
        let d = |e: u64| decode_l2(e, 0, &g, 3, false);
        assert_eq!(d(0), Ok(Cluster::Unallocated));
        assert_eq!(
            d(OFLAG_COPIED | 0x50000),
            Ok(Cluster::Normal { host: 0x50000 })
        );
        assert_eq!(d(0x50000), Ok(Cluster::Normal { host: 0x50000 }));
        assert_eq!(d(OFLAG_ZERO), Ok(Cluster::Zero { host: None }));
        assert_eq!(
            d(OFLAG_ZERO | 0x50000),
            Ok(Cluster::Zero {
                host: Some(0x50000)
            })
        );
        // External data file: offset 0 with the copied flag is guest cluster 0.
        assert_eq!(
            decode_l2(OFLAG_COPIED, 0, &g, 3, true),
            Ok(Cluster::Normal { host: 0 })
        );
        // Without one, it would point at the header.
        assert!(decode_l2(OFLAG_COPIED, 0, &g, 3, false)
            .unwrap_err()
            .to_string()
            .contains("header"));
    }

    #[test]
    fn l2_entry_rules() {
        let g = g64();
        let d = |e: u64| decode_l2(e, 0, &g, 3, false).unwrap_err().to_string();
        assert!(d(0x50000 | 1 << 60).contains("reserved"));
        assert!(d(0x50000 | 1 << 3).contains("reserved"));
        assert!(d(0x50200).contains("aligned"));
        assert!(decode_l2(OFLAG_ZERO, 0, &g, 2, false)
            .unwrap_err()
            .to_string()
            .contains("version 2"));
        assert!(decode_l2(0x50000, 1, &g, 3, false)
            .unwrap_err()
            .to_string()
            .contains("bitmap"));
        let c = encode_compressed(&g, 0x12345, 1000);
        assert!(decode_l2(c | OFLAG_COPIED, 0, &g, 3, false)
            .unwrap_err()
            .to_string()
            .contains("copied"));
        assert!(decode_l2(c, 0, &g, 3, true)
            .unwrap_err()
            .to_string()
            .contains("data file"));
        let x = Geometry::new(14, true, 4);
        assert!(decode_l2(c, 1, &x, 3, false)
            .unwrap_err()
            .to_string()
            .contains("bitmap"));
        // Small clusters: compressed offsets may not use bits past 55.
        let small = Geometry::new(9, false, 4);
        assert!(decode_l2(OFLAG_COMPRESSED | 1 << 57, 0, &small, 3, false)
            .unwrap_err()
            .to_string()
            .contains("2^56"));
    }

    #[test]
    fn extended_l2_rules() {
        let g = Geometry::new(16, true, 4);
        let d = |e: u64, b: u64| decode_l2(e, b, &g, 3, false);
        assert_eq!(
            d(OFLAG_COPIED | 0x70000, 0x0000_0003_ffff_fff0),
            Ok(Cluster::Sub {
                host: Some(0x70000),
                alloc: 0xffff_fff0,
                zero: 3
            })
        );
        assert_eq!(
            d(0, 0xffff_ffff_0000_0000),
            Ok(Cluster::Sub {
                host: None,
                alloc: 0,
                zero: u32::MAX
            })
        );
        assert!(d(0x70000, 0x0000_0001_0000_0001)
            .unwrap_err()
            .to_string()
            .contains("both"));
        assert!(d(0, 1).unwrap_err().to_string().contains("unallocated"));
        assert!(d(0x70000 | OFLAG_ZERO, 0)
            .unwrap_err()
            .to_string()
            .contains("zero flag"));
    }

    #[test]
    fn compressed_descriptor_round_trip() {
        for cb in [9u32, 12, 16, 21] {
            let g = Geometry::new(cb, false, 4);
            for (off, len) in [(0x10_0000u64, 1u64), (0x10_01ffu64, 2), (0x1234_5677, 3000)] {
                let len = len.min(g.cluster_size - 1);
                let e = encode_compressed(&g, off, len);
                let Ok(Cluster::Compressed { offset, len: l }) = decode_l2(e, 0, &g, 3, false)
                else {
                    panic!("not compressed");
                };
                assert_eq!(offset, off);
                // The decoded length runs to the end of the last sector used.
                assert_eq!(offset + l, (off + len).div_ceil(512) * 512);
            }
        }
    }

    #[test]
    fn refcounts_of_every_width() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                refcount_set(&mut block, order, i, (i as u64 * 7 + 1) & max);
            }
            for i in 0..n {
                assert_eq!(
                    refcount_get(&block, order, i),
                    (i as u64 * 7 + 1) & max,
                    "order {order}"
                );
            }
            refcount_set(&mut block, order, 0, max);
            assert_eq!(refcount_get(&block, order, 0), max);
            assert_eq!(refcount_get(&block, order, 1), 8 & max);
        }
        // Sub-byte widths start at the least significant bit.
        let mut b = [0u8; 1];
        refcount_set(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        refcount_set(&mut b, 1, 3, 2);
        assert_eq!(b[0], 0b1000_0001);
        // 16-bit entries are big endian.
        let mut w = [0u8; 4];
        refcount_set(&mut w, 4, 1, 0x0102);
        assert_eq!(w, [0, 0, 1, 2]);
    }

    #[test]
    fn qemu_feature_table_bytes() {
        let t = qemu_feature_table();
        assert_eq!(t.len() * FEATURE_NAME_LEN, 384);
        assert_eq!(t[4].name, "extended L2 entries");
    }
}

//! The VHDX writer: dynamic (blocks allocated as data arrives) and fixed (every block
//! reserved in place), with an empty log.
//!
//! Layout (every offset a multiple of 1 MiB, as [MS-VHDX] §2.1 requires):
//!
//! ```text
//! 0        file identifier, header 1 (64 KiB), header 2 (128 KiB),
//!          region table 1 (192 KiB), region table 2 (256 KiB)
//! 1 MiB    log (log_size, left empty: both headers carry a zero log GUID)
//!          BAT (its entries rounded up to 1 MiB)
//!          metadata region (1 MiB: the table, then the five items at 64 KiB)
//!          payload blocks
//! ```
//!
//! qemu puts the same structures in the same order but leaves 4 MiB unused after the
//! metadata; vimg does not. Data writes are positional and may come in any order from many
//! threads: a block gets its file offset under a short lock the first time data for it
//! arrives, and the bytes are written outside the lock. Parts of a block that receive no
//! data stay holes and read as zeros. Headers, region tables, metadata and BAT are written
//! once, at `finish`.
//!
//! `block_state_zero` (default on, as in qemu) decides how blocks that received no data are
//! recorded: `PAYLOAD_BLOCK_ZERO` when on; otherwise `PAYLOAD_BLOCK_NOT_PRESENT` in a
//! dynamic image and a zero-filled `PAYLOAD_BLOCK_FULLY_PRESENT` block in a fixed one. A
//! fixed image always reserves every block in the file (qemu with the default
//! `block_state_zero=on` instead appends written blocks after the reserved area).

use super::error::VhdxError;
use super::geometry::Geometry;
use super::header::*;
use crate::error::{Error, Result};
use crate::formats::block_table::{BlockTable, Placement};
use crate::limits;
use crate::options::{parse_bool, CreateOptions};
use crate::output::{OutFile, Output};
use crate::writer::{EncodedUnit, ImageWriter, WriterCaps};

/// qemu's default log size.
pub const DEFAULT_LOG_SIZE: u64 = MIB;
/// Logical and physical sector size of images vimg writes (qemu writes the same).
pub const SECTOR_SIZE: u32 = 512;

/// Checked creation settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Virtual size, rounded up to 512 bytes.
    pub size: u64,
    /// `subformat=fixed`.
    pub fixed: bool,
    /// Payload block size.
    pub block_size: u32,
    /// Log size.
    pub log_size: u32,
    /// `block_state_zero`.
    pub zero_blocks: bool,
}

/// The block size qemu picks when none is given.
pub fn default_block_size(size: u64) -> u32 {
    if size > 32 << 40 {
        64 << 20
    } else if size > 100 << 30 {
        32 << 20
    } else if size > 1 << 30 {
        16 << 20
    } else {
        8 << 20
    }
}

impl Settings {
    /// Checks `opts` the way qemu's vhdx_co_create does (sizes silently rounded up to what
    /// the format needs; impossible values refused with qemu's messages).
    pub fn from_options(size: u64, opts: &CreateOptions) -> Result<Settings> {
        let size = size
            .checked_next_multiple_of(512)
            .filter(|s| *s <= MAX_VIRTUAL_SIZE)
            .ok_or_else(|| Error::invalid_argument("Image size too large; max of 64TB"))?;
        let fixed = super::CAPABILITIES.choice("subformat", opts)? == "fixed";
        let log_size = match opts.get_size("log_size")? {
            None => DEFAULT_LOG_SIZE,
            Some(l) => l.checked_next_multiple_of(MIB).unwrap_or(u64::MAX),
        };
        if log_size > u64::from(u32::MAX) {
            return Err(Error::invalid_argument(
                "Log size must be smaller than 4 GB",
            ));
        }
        if log_size < MIB {
            return Err(Error::invalid_argument(
                "Log size must be a multiple of 1 MB",
            ));
        }
        let block_size = match opts.get_size("block_size")? {
            None | Some(0) => u64::from(default_block_size(size)),
            Some(b) => b
                .checked_next_multiple_of(MIB)
                .unwrap_or(u64::MAX)
                .min(u64::from(BLOCK_SIZE_MAX)),
        };
        if !block_size.is_power_of_two() {
            return Err(Error::invalid_argument("Block size must be a power of two"));
        }
        let zero_blocks = opts.get_bool("block_state_zero", true)?;
        super::CAPABILITIES.choice("preallocation", opts)?;
        if let Some(v) = opts.get_str("nocow") {
            parse_bool(v).ok_or_else(|| {
                Error::invalid_argument("Parameter 'nocow' expects 'on' or 'off'")
            })?;
        }
        opts.get_size("extent_size_hint")?;
        Ok(Settings {
            size,
            fixed,
            block_size: block_size as u32,
            log_size: log_size as u32,
            zero_blocks,
        })
    }
}

/// Where everything goes in a new image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Block arithmetic.
    pub geometry: Geometry,
    /// Log offset (1 MiB).
    pub log_offset: u64,
    /// Log length.
    pub log_length: u64,
    /// BAT offset.
    pub bat_offset: u64,
    /// BAT region length.
    pub bat_length: u64,
    /// Metadata region offset.
    pub metadata_offset: u64,
    /// First payload block.
    pub data_offset: u64,
}

/// Length of the metadata region vimg writes.
const METADATA_LENGTH: u64 = MIB;

impl Layout {
    /// The layout for `s`; fails when the BAT would exceed what vimg reads back.
    pub fn new(s: &Settings) -> Result<Layout> {
        let geometry = Geometry::new(
            s.size,
            u64::from(s.block_size),
            u64::from(SECTOR_SIZE),
            false,
        );
        let bat_bytes = geometry.bat_entries() * 8;
        if bat_bytes > limits::MAX_TABLE_BYTES {
            return Err(VhdxError::Limit {
                what: format!(
                    "a BAT of {bat_bytes:#x} bytes ({} blocks of {} MiB) exceeds vimg's table limit of {:#x} bytes; choose a larger block_size",
                    geometry.payload_blocks,
                    s.block_size >> 20,
                    limits::MAX_TABLE_BYTES
                ),
            }
            .into());
        }
        let log_offset = HEADER_SECTION_END;
        let log_length = u64::from(s.log_size);
        let bat_offset = log_offset + log_length;
        let bat_length = if geometry.payload_blocks == 0 {
            // qemu computes the BAT size of an empty disk with a 32-bit underflow
            // ((0 - 1) >> log2(chunk ratio) entries) and refuses a smaller region, so an
            // empty disk gets that region, left as a hole.
            let qemu_entries = u64::from(u32::MAX) >> geometry.chunk_ratio.trailing_zeros();
            (qemu_entries * 8)
                .next_multiple_of(MIB)
                .min(u64::from(u32::MAX) & !(MIB - 1))
        } else {
            bat_bytes.next_multiple_of(MIB).max(MIB)
        };
        let metadata_offset = bat_offset + bat_length;
        Ok(Layout {
            geometry,
            log_offset,
            log_length,
            bat_offset,
            bat_length,
            metadata_offset,
            data_offset: metadata_offset + METADATA_LENGTH,
        })
    }

    /// File length of a fixed image, or of a dynamic one with `blocks` blocks allocated.
    pub fn file_len(&self, blocks: u64) -> u64 {
        self.data_offset + blocks * self.geometry.block_size
    }
}

/// BAT entries of payload blocks in the writer's table: the block's file offset in MiB (0:
/// not placed). Dynamic images append blocks in placement order; fixed ones keep block `i`
/// at its reserved place.
struct VhdxPlacement {
    data_offset: u64,
    block_size: u64,
    fixed: bool,
}

impl Placement for VhdxPlacement {
    const UNUSED: u32 = 0;

    fn place(&self, block: u64, nth: u64) -> Result<u32> {
        let index = if self.fixed { block } else { nth };
        Ok(((self.data_offset + index * self.block_size) / MIB) as u32)
    }

    fn data_offset(&self, entry: u32) -> u64 {
        u64::from(entry) * MIB
    }
}

/// Writes a VHDX image.
pub struct VhdxWriter {
    file: OutFile,
    settings: Settings,
    layout: Layout,
    table: BlockTable<VhdxPlacement>,
}

impl VhdxWriter {
    /// Creates the main file of `out` for an image of `size` bytes.
    pub fn create(out: &Output, size: u64, opts: &CreateOptions) -> Result<VhdxWriter> {
        let settings = Settings::from_options(size, opts)?;
        let layout = Layout::new(&settings)?;
        let file = out.create_main()?;
        if file.is_stream() {
            return Err(Error::unsupported(
                "vhdx writes its tables at the start of the file last and cannot be written to a stream",
            ));
        }
        let blocks = usize::try_from(layout.geometry.payload_blocks)
            .map_err(|_| Error::unsupported("too many VHDX blocks"))?;
        let placement = VhdxPlacement {
            data_offset: layout.data_offset,
            block_size: layout.geometry.block_size,
            fixed: settings.fixed,
        };
        let table = BlockTable::new(
            "VHDX",
            settings.size,
            layout.geometry.block_size,
            placement,
            vec![0; blocks],
            0,
        );
        Ok(VhdxWriter {
            file,
            settings,
            layout,
            table,
        })
    }

    fn write_metadata(&self) -> Result<()> {
        let l = &self.layout;
        let mut table = vec![0u8; METADATA_TABLE_SIZE];
        let vd = META_IS_REQUIRED | META_IS_VIRTUAL_DISK;
        let items: [(Guid, u32, u32); 5] = [
            (FILE_PARAMETERS_GUID, 8, META_IS_REQUIRED),
            (VIRTUAL_DISK_SIZE_GUID, 8, vd),
            (PAGE83_GUID, 16, vd),
            (LOGICAL_SECTOR_SIZE_GUID, 4, vd),
            (PHYSICAL_SECTOR_SIZE_GUID, 4, vd),
        ];
        let mut entries = Vec::new();
        let mut off = KIB64 as u32;
        for (g, len, flags) in items {
            entries.push(MetadataEntry {
                item_id: g,
                offset: off,
                length: len,
                flags,
            });
            off += len;
        }
        MetadataTable { entries }.write_to(&mut table);
        self.file.write_all_at(&table, l.metadata_offset)?;
        let mut data = [0u8; 40];
        FileParameters {
            block_size: self.settings.block_size,
            flags: if self.settings.fixed {
                PARAM_LEAVE_BLOCKS_ALLOCATED
            } else {
                0
            },
        }
        .write_to(&mut data[..8]);
        data[8..16].copy_from_slice(&self.settings.size.to_le_bytes());
        data[16..32].copy_from_slice(&Guid::random().0);
        data[32..36].copy_from_slice(&SECTOR_SIZE.to_le_bytes());
        data[36..40].copy_from_slice(&SECTOR_SIZE.to_le_bytes());
        self.file.write_all_at(&data, l.metadata_offset + KIB64)
    }

    fn write_bat(&self, blocks: &[u32]) -> Result<()> {
        let l = &self.layout;
        let g = &l.geometry;
        let n = g.bat_entries();
        let unused = if self.settings.zero_blocks {
            BatEntry::new(PAYLOAD_ZERO, 0)
        } else {
            BatEntry::new(PAYLOAD_NOT_PRESENT, 0)
        };
        // 1 MiB of entries at a time.
        const PER_WRITE: u64 = MIB / 8;
        let mut buf = Vec::with_capacity((PER_WRITE * 8) as usize);
        let mut i = 0u64;
        while i < n {
            buf.clear();
            let stop = (i + PER_WRITE).min(n);
            for idx in i..stop {
                let e = if g.is_bitmap_entry(idx) {
                    BatEntry::new(SB_NOT_PRESENT, 0)
                } else {
                    let b = g.block_of_entry(idx);
                    match blocks.get(b as usize).copied().unwrap_or(0) {
                        0 if self.settings.fixed && !self.settings.zero_blocks => {
                            BatEntry::new(PAYLOAD_FULLY_PRESENT, l.data_offset + b * g.block_size)
                        }
                        0 => unused,
                        mib => BatEntry::new(PAYLOAD_FULLY_PRESENT, u64::from(mib) * MIB),
                    }
                };
                buf.extend_from_slice(&e.0.to_le_bytes());
            }
            self.file.write_all_at(&buf, l.bat_offset + i * 8)?;
            i = stop;
        }
        Ok(())
    }
}

impl ImageWriter for VhdxWriter {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            unit: u64::from(SECTOR_SIZE),
            ordered: false,
            encodes: false,
        }
    }

    /// Blocks are placed in the order they are first allocated: the engine calls this in
    /// guest order, so the layout does not depend on thread timing.
    fn allocate(&self, offset: u64, len: u64) -> Result<bool> {
        let end = self.table.check(offset, len)?;
        self.table.allocate(&self.file, offset, end)?;
        Ok(true)
    }

    fn write(&self, offset: u64, data: &[u8], _encoded: &[EncodedUnit]) -> Result<()> {
        self.table.write(&self.file, offset, data)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let l = self.layout;
        let alloc = self.table.lock()?;
        let mut id = vec![0u8; FileIdentifier::SIZE];
        FileIdentifier {
            creator: format!("vimg v{}", env!("CARGO_PKG_VERSION")),
        }
        .write_to(&mut id);
        self.file.write_all_at(&id, FILE_ID_OFFSET)?;

        let file_write_guid = Guid::random();
        let data_write_guid = Guid::random();
        let mut buf = vec![0u8; HEADER_SIZE];
        for (seq, off) in [(1, HEADER1_OFFSET), (2, HEADER2_OFFSET)] {
            Header {
                sequence_number: seq,
                file_write_guid,
                data_write_guid,
                log_guid: Guid::ZERO,
                log_version: LOG_VERSION,
                version: HEADER_VERSION,
                log_length: l.log_length as u32,
                log_offset: l.log_offset,
            }
            .write_to(&mut buf);
            self.file.write_all_at(&buf, off)?;
        }

        let table = RegionTable {
            entries: vec![
                RegionEntry {
                    guid: BAT_GUID,
                    file_offset: l.bat_offset,
                    length: l.bat_length as u32,
                    flags: REGION_REQUIRED,
                },
                RegionEntry {
                    guid: METADATA_GUID,
                    file_offset: l.metadata_offset,
                    length: METADATA_LENGTH as u32,
                    flags: REGION_REQUIRED,
                },
            ],
        };
        let mut buf = vec![0u8; REGION_TABLE_SIZE];
        table.write_to(&mut buf);
        self.file.write_all_at(&buf, REGION_TABLE1_OFFSET)?;
        self.file.write_all_at(&buf, REGION_TABLE2_OFFSET)?;

        self.write_metadata()?;
        self.write_bat(&alloc.entries)?;
        let len = if self.settings.fixed {
            l.file_len(l.geometry.payload_blocks)
        } else {
            l.file_len(alloc.placed)
        };
        self.file.set_len(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(size: u64, o: &str) -> Result<Settings> {
        let mut opts = CreateOptions::new();
        opts.parse_into(o).unwrap();
        Settings::from_options(size, &opts)
    }

    #[test]
    fn options_follow_qemu() {
        let s = settings(1000, "").unwrap();
        assert_eq!(s.size, 1024);
        assert_eq!((s.block_size, s.log_size), (8 << 20, 1 << 20));
        assert!(s.zero_blocks && !s.fixed);
        assert_eq!(settings(1 << 30, "").unwrap().block_size, 8 << 20);
        assert_eq!(settings((1 << 30) + 512, "").unwrap().block_size, 16 << 20);
        assert_eq!(settings(101 << 30, "").unwrap().block_size, 32 << 20);
        assert_eq!(settings(33 << 40, "").unwrap().block_size, 64 << 20);
        assert_eq!(
            settings(1 << 30, "block_size=100").unwrap().block_size,
            1 << 20
        );
        assert_eq!(
            settings(1 << 30, "block_size=512M").unwrap().block_size,
            256 << 20
        );
        assert_eq!(settings(1 << 30, "log_size=100").unwrap().log_size, 1 << 20);
        let msg = |o: &str, size| settings(size, o).unwrap_err().to_string();
        assert_eq!(
            msg("block_size=3M", 1 << 30),
            "Block size must be a power of two"
        );
        assert_eq!(
            msg("log_size=0", 1 << 30),
            "Log size must be a multiple of 1 MB"
        );
        assert_eq!(
            msg("log_size=5G", 1 << 30),
            "Log size must be smaller than 4 GB"
        );
        assert_eq!(
            msg("subformat=foo", 1 << 30),
            "Parameter 'subformat' does not accept value 'foo'"
        );
        assert_eq!(msg("", 65 << 40), "Image size too large; max of 64TB");
        assert_eq!(
            msg("preallocation=foo", 1 << 20),
            "invalid parameter value: foo"
        );
        assert!(settings(
            1 << 20,
            "subformat=fixed,block_state_zero=off,preallocation=full,nocow=on,extent_size_hint=1M"
        )
        .is_ok());
    }

    #[test]
    fn layout_is_aligned_and_bounded() {
        let s = settings(100 << 20, "").unwrap();
        let l = Layout::new(&s).unwrap();
        assert_eq!(l.bat_offset, 2 << 20);
        assert_eq!(l.metadata_offset, 3 << 20);
        assert_eq!(l.data_offset, 4 << 20);
        let big = settings(64 << 40, "block_size=1M").unwrap();
        assert_eq!(
            Layout::new(&big).unwrap_err().kind(),
            crate::ErrorKind::Unsupported
        );
        let zero = Layout::new(&settings(0, "").unwrap()).unwrap();
        assert_eq!(
            zero.bat_length,
            64 * MIB,
            "what qemu expects of an empty disk"
        );
    }
}

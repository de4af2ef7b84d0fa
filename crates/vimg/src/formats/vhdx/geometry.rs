//! Block arithmetic shared by the reader, the writer and `measure` ([MS-VHDX] §2.4, §2.5):
//! payload blocks, chunks, and where their BAT entries sit.
//!
//! A sector bitmap block describes 2^23 logical sectors, so a chunk (the guest range one
//! bitmap block covers) holds `chunk_ratio = 2^23 * logical_sector_size / block_size`
//! payload blocks. In the BAT, each chunk's payload entries are followed by the entry of its
//! sector bitmap block.

use super::header::SECTORS_PER_BITMAP;

/// The block layout of one image. Built from validated values only (block size a power of
/// two in 1..256 MiB, logical sector size 512 or 4096).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Guest-visible size.
    pub virtual_size: u64,
    /// Payload block size.
    pub block_size: u64,
    /// Logical sector size.
    pub logical_sector: u64,
    /// Payload blocks per chunk (per sector bitmap block).
    pub chunk_ratio: u64,
    /// Payload blocks the virtual size needs.
    pub payload_blocks: u64,
    /// A differencing image (its BAT covers whole chunks).
    pub differencing: bool,
}

impl Geometry {
    /// The geometry of an image.
    pub fn new(
        virtual_size: u64,
        block_size: u64,
        logical_sector: u64,
        differencing: bool,
    ) -> Self {
        Geometry {
            virtual_size,
            block_size,
            logical_sector,
            chunk_ratio: SECTORS_PER_BITMAP * logical_sector / block_size,
            payload_blocks: virtual_size.div_ceil(block_size),
            differencing,
        }
    }

    /// Sector bitmap blocks (chunks) the virtual size spans.
    pub fn bitmap_blocks(&self) -> u64 {
        self.payload_blocks.div_ceil(self.chunk_ratio)
    }

    /// BAT entries the image needs (§2.5): a dynamic or fixed BAT ends with the last
    /// payload block's entry, a differencing BAT with the last chunk's bitmap entry.
    pub fn bat_entries(&self) -> u64 {
        if self.differencing {
            self.bitmap_blocks() * (self.chunk_ratio + 1)
        } else if self.payload_blocks == 0 {
            0
        } else {
            self.payload_blocks + (self.payload_blocks - 1) / self.chunk_ratio
        }
    }

    /// BAT index of payload block `block`.
    pub fn payload_entry(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector bitmap block of chunk `chunk`.
    pub fn bitmap_entry(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// True when BAT index `index` holds a sector bitmap entry.
    pub fn is_bitmap_entry(&self, index: u64) -> bool {
        index % (self.chunk_ratio + 1) == self.chunk_ratio
    }

    /// The payload block a payload BAT index describes.
    pub fn block_of_entry(&self, index: u64) -> u64 {
        index - index / (self.chunk_ratio + 1)
    }

    /// Logical sectors per payload block.
    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.logical_sector
    }

    /// Guest bytes payload block `block` holds (the last one may be short).
    pub fn block_len(&self, block: u64) -> u64 {
        self.block_size
            .min(self.virtual_size.saturating_sub(block * self.block_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ratio_and_interleaving() {
        // 32 MiB blocks, 512-byte sectors: 128 payload blocks per chunk.
        let g = Geometry::new(10 << 30, 32 << 20, 512, false);
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.payload_blocks, 320);
        // 320 payload entries and 2 bitmap entries between them (after blocks 127, 255).
        assert_eq!(g.bat_entries(), 322);
        assert_eq!(g.payload_entry(127), 127);
        assert_eq!(g.payload_entry(128), 129);
        assert_eq!(g.bitmap_entry(0), 128);
        assert!(g.is_bitmap_entry(128) && !g.is_bitmap_entry(129));
        assert_eq!(g.block_of_entry(129), 128);
        let d = Geometry {
            differencing: true,
            ..g
        };
        assert_eq!(d.bat_entries(), 3 * 129);
        // Extremes: 256 MiB blocks with 512-byte sectors, 1 MiB blocks with 4 KiB sectors.
        assert_eq!(
            Geometry::new(1 << 40, 256 << 20, 512, false).chunk_ratio,
            16
        );
        assert_eq!(
            Geometry::new(1 << 40, 1 << 20, 4096, false).chunk_ratio,
            32768
        );
        assert_eq!(Geometry::new(0, 1 << 20, 512, false).bat_entries(), 0);
        assert_eq!(g.block_len(319), 32 << 20);
        let odd = Geometry::new((32 << 20) + 512, 32 << 20, 512, false);
        assert_eq!(odd.block_len(1), 512);
    }
}

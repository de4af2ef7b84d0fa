//! `qemu-img bitmap` with QEMU's layout (spec: "Bitmaps", "Bitmap table", "Bitmap
//! directory").
//!
//! qemu-img opens the image, loads every consistent bitmap, applies the action, and on
//! closing stores every loaded bitmap anew: for each, in directory order, its data
//! clusters (one per bitmap cluster with a bit set, first free cluster each, written
//! whole) and then its table (the first free run, written to its last entry), then a new
//! directory (first free run, written to its last byte), the header, and only then frees
//! the old directory and the old tables and data. A removal first writes a directory
//! without the bitmap (and frees its clusters), then stores the rest the same way. vimg
//! does the same, so its file ends where qemu-img's does (`measure -f raw` of it agrees,
//! iotest 190), with the same crash rule: everything new is written and flushed before the
//! header sector names the new directory; a crash leaves the old directory or the new one,
//! with at worst leaked clusters. Bitmaps in use (inconsistent) are kept as they are, as
//! QEMU keeps them.

use super::*;

/// What a bitmap holds when it is stored.
pub(super) enum Content {
    /// What its table says now (copied cluster by cluster).
    Stored,
    /// No bit set.
    Zero,
    /// These bits (bit `i` of byte `i / 8`).
    Bits(Vec<u8>),
    /// Left where it is (not stored anew).
    Keep,
}

impl Qcow2Update {
    /// `bitmap` then changes only the bitmap it names, leaving the others' tables and data
    /// where they are (`convert --bitmaps` adds many bitmaps one action at a time; storing
    /// all of them at each would copy them over and over).
    pub fn keep_other_bitmaps(&mut self) {
        self.store_all_bitmaps = false;
    }

    /// What the bitmaps of `dir` an action does not change hold when stored.
    pub(super) fn others(&self, dir: &[Dirent]) -> Vec<Content> {
        dir.iter()
            .map(|_| {
                if self.store_all_bitmaps {
                    Content::Stored
                } else {
                    Content::Keep
                }
            })
            .collect()
    }
}

impl Qcow2Update {
    /// Stores every bitmap of `dir` (with `contents`, one per entry) as qemu-img does on
    /// closing the image, then switches the header to the new directory and frees the old
    /// directory (`old`), the old tables and data, and `garbage`.
    pub(super) fn store_bitmaps(
        &mut self,
        old: Option<BitmapsExt>,
        mut dir: Vec<Dirent>,
        contents: Vec<Content>,
        mut garbage: Vec<(u64, u64)>,
    ) -> Result<()> {
        for (d, content) in dir.iter_mut().zip(contents) {
            if d.e.flags & BME_FLAG_IN_USE != 0 || matches!(content, Content::Keep) {
                continue;
            }
            let old_table = if d.e.table_offset != 0 {
                garbage.extend(self.bitmap_clusters(d)?);
                self.read_bitmap_table(d)?
            } else {
                Vec::new()
            };
            let entries = u64::from(d.e.table_size);
            d.e.table_offset = self.store_bitmap(d, entries, &old_table, &content)?;
        }
        self.sync()?;
        self.switch_bitmap_dir(old, &dir, garbage)
    }

    /// One bitmap's data clusters and table, in fresh clusters (not flushed). Returns the
    /// table's offset.
    fn store_bitmap(
        &mut self,
        d: &Dirent,
        entries: u64,
        old_table: &[u64],
        content: &Content,
    ) -> Result<u64> {
        let cs = self.cs();
        let cb = self.cb();
        // Bytes of bits the bitmap has: bits past them are never stored.
        let nbits = self.header.size.div_ceil(1u64 << d.e.granularity_bits);
        let total = nbits.div_ceil(8);
        let mut table = vec![0u64; entries as usize];
        for (i, t) in table.iter_mut().enumerate() {
            let lo = i as u64 * cs;
            if lo >= total {
                break;
            }
            let valid = (total - lo).min(cs) as usize;
            let mut buf = vec![0u8; cs as usize];
            match content {
                Content::Zero | Content::Keep => continue,
                Content::Bits(bits) => {
                    let hi = (lo as usize + valid).min(bits.len());
                    if let Some(src) = bits.get(lo as usize..hi) {
                        buf[..src.len()].copy_from_slice(src);
                    }
                }
                Content::Stored => {
                    let v = old_table.get(i).copied().unwrap_or(0);
                    let off = v & BTE_OFFSET_MASK;
                    if off != 0 {
                        self.pread(&mut buf[..valid], off)?;
                    } else if v & BTE_ALL_ONES != 0 {
                        buf[..valid].fill(0xff);
                    } else {
                        continue;
                    }
                }
            }
            buf[valid..].fill(0);
            let tail = nbits % 8;
            if lo + valid as u64 == total && tail != 0 {
                buf[valid - 1] &= (1u8 << tail) - 1;
            }
            if buf.iter().all(|b| *b == 0) {
                continue;
            }
            let at = self.alloc_with(1, false)? << cb;
            self.pwrite(&buf, at)?;
            *t = at;
        }
        if entries == 0 {
            return Ok(0);
        }
        let raw: Vec<u8> = table.iter().flat_map(|v| v.to_be_bytes()).collect();
        let n = (raw.len() as u64).div_ceil(cs);
        let at = self.alloc_with(n, false)? << cb;
        self.pwrite(&raw, at)?;
        Ok(at)
    }

    /// Writes `dir` as the new directory (its exact bytes, in the first free clusters),
    /// flushes, switches the header to it, then frees the old directory and `garbage`.
    pub(super) fn switch_bitmap_dir(
        &mut self,
        old: Option<BitmapsExt>,
        dir: &[Dirent],
        garbage: Vec<(u64, u64)>,
    ) -> Result<()> {
        let cs = self.cs();
        let cb = self.cb();
        let raw: Vec<u8> = dir.iter().flat_map(Dirent::bytes).collect();
        if raw.len() as u64 > MAX_BITMAP_DIRECTORY {
            return Err(Error::unsupported(
                "the bitmap directory would be too large",
            ));
        }
        let new_ext = if dir.is_empty() {
            None
        } else {
            let n = (raw.len() as u64).div_ceil(cs);
            let at = self.alloc_with(n, false)? << cb;
            self.pwrite(&raw, at)?;
            self.sync()?;
            Some(BitmapsExt {
                nb_bitmaps: dir.len() as u32,
                directory_size: raw.len() as u64,
                directory_offset: at,
            })
        };
        self.point_header_at_bitmap_dir(new_ext, old, garbage)
    }
}

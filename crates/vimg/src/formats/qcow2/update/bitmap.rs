//! Persistent dirty bitmaps changed in place: `qemu-img bitmap --add/--remove/--clear/
//! --enable/--disable/--merge` (spec: "Bitmaps", "Bitmaps extension", "Bitmap directory",
//! "Bitmap table", "Bitmap data"; the autoclear bit 0).
//!
//! Nothing in use is written over: every change builds the new bitmap table and data (when
//! they change) and a whole new bitmap directory in fresh clusters, flushes, then points
//! the header at the new directory in one write of the first sector (the bitmaps extension
//! and the autoclear bit with it), flushes, and only then frees what the old directory
//! used. A crash leaves the old directory or the new one, with at worst leaked clusters.

#[path = "bitmap_writes.rs"]
mod writes;

#[path = "bitmap_store.rs"]
mod store;
use store::Content;

use super::*;

/// Bitmap table entry: offset of the data cluster.
const BTE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry without a cluster: all bits set.
const BTE_ALL_ONES: u64 = 1;
/// vimg reads a whole bitmap into memory for `--merge`; larger ones are refused.
const MAX_MERGE_BYTES: u64 = 64 << 20;

/// One action of `qemu-img bitmap`, applied in command-line order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BitmapOp {
    /// `--add` with the granularity in bytes (None: qemu's default) and `--disable`d or not.
    Add {
        /// Bytes per bit.
        granularity: Option<u64>,
    },
    /// `--remove`.
    Remove,
    /// `--clear`.
    Clear,
    /// `--enable`.
    Enable,
    /// `--disable`.
    Disable,
    /// `--merge SOURCE` (a bitmap of the same image).
    Merge(String),
    /// `--merge SOURCE -b FILE`: a bitmap of another qcow2 image (opened read-only; the
    /// files it names are not opened).
    MergeFrom {
        /// The other image.
        file: PathBuf,
        /// Its bitmap.
        source: String,
    },
}

/// A bitmap's bits as bytes (bit `i` of byte `i / 8`, least significant first, as the
/// spec lays them out), from its table; `read` reads the image holding it.
fn bits_from(
    read: &dyn Fn(&mut [u8], u64) -> Result<()>,
    table: &[u64],
    cs: u64,
    size: u64,
    granularity_bits: u8,
    name: &str,
) -> Result<Vec<u8>> {
    let nbits = size.div_ceil(1u64 << granularity_bits);
    let bytes = nbits.div_ceil(8);
    if bytes > MAX_MERGE_BYTES {
        return Err(Error::unsupported(format!(
            "bitmap '{name}' takes {bytes} bytes; vimg merges bitmaps up to {MAX_MERGE_BYTES}"
        )));
    }
    let mut out = vec![0u8; bytes as usize];
    for (i, &v) in table.iter().enumerate() {
        let lo = i * cs as usize;
        if lo >= out.len() {
            break;
        }
        let hi = (lo + cs as usize).min(out.len());
        let off = v & BTE_OFFSET_MASK;
        if off != 0 {
            read(&mut out[lo..hi], off)?;
        } else if v & BTE_ALL_ONES != 0 {
            out[lo..hi].fill(0xff);
        }
    }
    Ok(out)
}

/// Sets in `target` (granularity `gt`) every bit covering a range set in `source`
/// (granularity `gs`), over `size` bytes.
fn merge_bits(target: &mut [u8], gt: u64, source: &[u8], gs: u64, size: u64) {
    for k in 0..size.div_ceil(gs) {
        if source
            .get((k / 8) as usize)
            .is_none_or(|b| b & (1 << (k % 8)) == 0)
        {
            continue;
        }
        let lo = k * gs;
        let hi = ((k + 1) * gs).min(size) - 1;
        for t in lo / gt..=hi / gt {
            if let Some(b) = target.get_mut((t / 8) as usize) {
                *b |= 1 << (t % 8);
            }
        }
    }
}

/// The bits of bitmap `name` of the qcow2 image `file` (opened read-only), with its
/// granularity, for `--merge -b`.
fn bits_of_file(file: &Path, name: &str, size: u64) -> Result<(Vec<u8>, u64)> {
    let storage: Arc<dyn Storage> =
        Arc::new(FileStorage::open(file).map_err(|e| io_err(file, "open", e))?);
    let ctx = OpenContext::new(Some(file), ExternalPolicy::Deny);
    let r = Qcow2Reader::open(storage.clone(), &ctx)?;
    let Some(b) = r.bitmaps.iter().find(|b| b.name == name) else {
        return Err(not_found(name));
    };
    if b.flags & BME_FLAG_IN_USE != 0 {
        return Err(Error::invalid_argument(format!(
            "Bitmap '{name}' is inconsistent and cannot be used"
        )));
    }
    if r.header.size != size {
        return Err(Error::invalid_argument(format!(
            "Bitmaps are of different sizes (destination size is {size}, source size is {}) and can't be merged",
            r.header.size
        )));
    }
    let read = |buf: &mut [u8], off: u64| -> Result<()> {
        let got = super::super::read::read_padded(&*storage, off, buf.len(), "bitmap data")?;
        buf.copy_from_slice(&got);
        Ok(())
    };
    let mut raw = vec![0u8; b.table_size as usize * 8];
    read(&mut raw, b.table_offset)?;
    let table: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    let bits = bits_from(
        &read,
        &table,
        r.g.cluster_size,
        size,
        b.granularity.trailing_zeros() as u8,
        name,
    )?;
    Ok((bits, b.granularity))
}

#[derive(Clone, Debug)]
struct Dirent {
    e: BitmapEntry,
    extra: Vec<u8>,
    name: String,
}

impl Dirent {
    fn bytes(&self) -> Vec<u8> {
        let mut raw = vec![0u8; self.e.entry_len() as usize];
        self.e.write_to(&mut raw);
        let x = BITMAP_ENTRY_LEN + self.extra.len();
        raw[BITMAP_ENTRY_LEN..x].copy_from_slice(&self.extra);
        raw[x..x + self.name.len()].copy_from_slice(self.name.as_bytes());
        raw
    }
}

impl Qcow2Update {
    /// The bitmaps extension in force (the autoclear bit set) and the directory.
    fn read_bitmap_dir(&self) -> Result<(Option<BitmapsExt>, Vec<Dirent>)> {
        if self.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok((None, Vec::new()));
        }
        let cs = self.cs();
        let mut first = vec![0u8; self.file_len.min(cs) as usize];
        self.pread(&mut first, 0)?;
        let end = if self.header.backing_file_offset != 0 {
            self.header.backing_file_offset
        } else {
            cs
        };
        let exts = parse_extensions(
            &first,
            self.header.len(),
            (end as usize).min(first.len()),
            cs,
        )?;
        let Some(ext) = exts.bitmaps else {
            return Ok((None, Vec::new()));
        };
        let ext = ext.map_err(|why| Error::corrupt(format!("bitmaps extension: {why}")))?;
        let mut raw = vec![0u8; ext.directory_size as usize];
        self.pread(&mut raw, ext.directory_offset)?;
        let mut out = Vec::new();
        let mut at = 0usize;
        for i in 0..ext.nb_bitmaps {
            let bad = |why: String| {
                Error::corrupt(format!(
                    "bitmap directory entry {i} at {:#x}: {why}",
                    ext.directory_offset + at as u64
                ))
            };
            let e = BitmapEntry::parse(raw.get(at..).unwrap_or(&[]), cs)
                .map_err(|f| bad(f.to_string()))?;
            let len = e.entry_len() as usize;
            let x = at + BITMAP_ENTRY_LEN + e.extra_data_size as usize;
            let n = x + usize::from(e.name_size);
            if at + len > raw.len() {
                return Err(bad("runs past the end of the directory".into()));
            }
            out.push(Dirent {
                extra: raw[at + BITMAP_ENTRY_LEN..x].to_vec(),
                name: String::from_utf8_lossy(&raw[x..n]).into_owned(),
                e,
            });
            at += len;
        }
        Ok((Some(ext), out))
    }

    /// The header switched to the directory `new_ext` (written and flushed; `None`: no
    /// bitmaps), in one sector, flushed; then the old directory and the clusters in
    /// `garbage` freed. The crash-safe last step of every directory change.
    pub(super) fn point_header_at_bitmap_dir(
        &mut self,
        new_ext: Option<BitmapsExt>,
        old: Option<BitmapsExt>,
        garbage: Vec<(u64, u64)>,
    ) -> Result<()> {
        let cs = self.cs();
        let cb = self.cb();
        let present = new_ext.is_some();
        let mut h = self.header.clone();
        if present {
            h.autoclear_features |= AUTOCLEAR_BITMAPS;
        } else {
            h.autoclear_features &= !AUTOCLEAR_BITMAPS;
        }
        let sector = self.first_sector_with(&mut h, None, Some(new_ext), None)?;
        self.pwrite(&sector, 0)?;
        self.sync()?;
        self.header = h;
        self.has_bitmaps = present;
        if let Some(o) = old {
            let n = o.directory_size.div_ceil(cs);
            if n > 0 {
                self.free(o.directory_offset >> cb, n)?;
            }
        }
        for (c, n) in garbage {
            self.free(c, n)?;
        }
        self.sync()
    }

    /// Writes `dir` as the new directory, switches the header to it, frees the old
    /// directory and then the clusters in `garbage` (runs of clusters no longer used).
    fn replace_bitmap_dir(
        &mut self,
        old: Option<BitmapsExt>,
        dir: &[Dirent],
        garbage: Vec<(u64, u64)>,
    ) -> Result<()> {
        let cs = self.cs();
        let cb = self.cb();
        let mut raw = Vec::new();
        for d in dir {
            raw.extend_from_slice(&d.bytes());
        }
        if raw.len() as u64 > MAX_BITMAP_DIRECTORY {
            return Err(Error::unsupported(
                "the bitmap directory would be too large",
            ));
        }
        let new_ext = if dir.is_empty() {
            None
        } else {
            let n = (raw.len() as u64).div_ceil(cs);
            let at = self.alloc(n)?;
            let size = raw.len() as u64;
            raw.resize((n * cs) as usize, 0);
            self.pwrite(&raw, at << cb)?;
            self.sync()?;
            Some(BitmapsExt {
                nb_bitmaps: dir.len() as u32,
                directory_size: size,
                directory_offset: at << cb,
            })
        };
        self.point_header_at_bitmap_dir(new_ext, old, garbage)
    }

    /// The bitmap table of `d` as entries.
    fn read_bitmap_table(&self, d: &Dirent) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; d.e.table_size as usize * 8];
        self.pread(&mut raw, d.e.table_offset)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    /// The clusters `d` uses: its table and its data clusters, as runs.
    fn bitmap_clusters(&self, d: &Dirent) -> Result<Vec<(u64, u64)>> {
        let cb = self.cb();
        let mut out = Vec::new();
        if d.e.table_size > 0 {
            let n = (u64::from(d.e.table_size) * 8).div_ceil(self.cs());
            out.push((d.e.table_offset >> cb, n));
        }
        for v in self.read_bitmap_table(d)? {
            let off = v & BTE_OFFSET_MASK;
            if off != 0 {
                out.push((off >> cb, 1));
            }
        }
        Ok(out)
    }

    /// Entries of a bitmap table for granularity `2^bits` over this image's size.
    fn bitmap_table_entries(&self, bits: u8) -> u64 {
        let nbits = self.header.size.div_ceil(1u64 << bits);
        nbits.div_ceil(8).div_ceil(self.cs())
    }

    /// Writes a new bitmap table (and data clusters for `data`'s non-zero clusters; all
    /// zeros when `data` is None) into fresh clusters, flushed. Returns its offset.
    fn write_bitmap_table(&mut self, entries: u64, data: Option<&[u8]>) -> Result<u64> {
        let cs = self.cs();
        let cb = self.cb();
        let mut table = vec![0u64; entries as usize];
        if let Some(data) = data {
            for (i, chunk) in data.chunks(cs as usize).enumerate() {
                if chunk.iter().all(|b| *b == 0) {
                    continue;
                }
                let at = self.alloc(1)?;
                let mut c = chunk.to_vec();
                c.resize(cs as usize, 0);
                self.pwrite(&c, at << cb)?;
                if let Some(t) = table.get_mut(i) {
                    *t = at << cb;
                }
            }
        }
        if entries == 0 {
            self.sync()?;
            return Ok(0);
        }
        let n = (entries * 8).div_ceil(cs);
        let at = self.alloc(n)?;
        let mut raw = Vec::with_capacity((n * cs) as usize);
        for v in &table {
            raw.extend_from_slice(&v.to_be_bytes());
        }
        raw.resize((n * cs) as usize, 0);
        self.pwrite(&raw, at << cb)?;
        self.sync()?;
        Ok(at << cb)
    }

    /// A bitmap of this image as bytes.
    fn read_bitmap_bits(&self, d: &Dirent) -> Result<Vec<u8>> {
        let table = self.read_bitmap_table(d)?;
        let read = |buf: &mut [u8], off: u64| self.pread(buf, off);
        bits_from(
            &read,
            &table,
            self.cs(),
            self.header.size,
            d.e.granularity_bits,
            &d.name,
        )
    }

    /// `qemu-img bitmap`: applies `ops` in order to the bitmap `name`, each as one crash-safe
    /// change. Errors (in qemu-img's words) come before that action writes anything. `disable` after `--add` is its own action, as in qemu-img.
    pub fn bitmap(&mut self, name: &str, op: &BitmapOp) -> Result<()> {
        if self.header.version < 3 {
            return Err(Error::unsupported(format!(
                "Can't make bitmap '{name}' persistent: Cannot store dirty bitmaps in qcow2 v2 files"
            )));
        }
        if self.has_data_file {
            return Err(Error::unsupported(
                "vimg does not change bitmaps of images with an external data file",
            ));
        }
        self.require_consistent()?;
        let (ext, mut dir) = self.read_bitmap_dir()?;
        let find = |dir: &[Dirent], n: &str| dir.iter().position(|d| d.name == n);
        let usable = |d: &Dirent| -> Result<()> {
            if d.e.flags & BME_FLAG_IN_USE != 0 {
                return Err(Error::invalid_argument(format!(
                    "Bitmap '{}' is inconsistent and cannot be used",
                    d.name
                )));
            }
            Ok(())
        };
        match op {
            BitmapOp::Add { granularity } => {
                if find(&dir, name).is_some() {
                    return Err(Error::invalid_argument(format!(
                        "Bitmap already exists: {name}"
                    )));
                }
                let g = granularity.unwrap_or(self.cs().max(4096));
                if !g.is_power_of_two() || !(512..=1u64 << 31).contains(&g) {
                    return Err(Error::invalid_argument(
                        "Granularity must be power of 2 and at least 512",
                    ));
                }
                if name.len() > 1023 {
                    return Err(Error::invalid_argument(format!(
                        "Can't make bitmap '{name}' persistent: Name length exceeds maximum (1023 characters)"
                    )));
                }
                if name.is_empty() {
                    return Err(Error::invalid_argument("Bitmap name must not be empty"));
                }
                if dir.len() as u64 >= MAX_BITMAPS {
                    return Err(Error::unsupported("the image already has 65535 bitmaps"));
                }
                let bits = g.trailing_zeros() as u8;
                let entries = self.bitmap_table_entries(bits);
                dir.push(Dirent {
                    e: BitmapEntry {
                        table_offset: 0,
                        table_size: entries as u32,
                        flags: BME_FLAG_AUTO,
                        kind: 1,
                        granularity_bits: bits,
                        name_size: name.len() as u16,
                        extra_data_size: 0,
                    },
                    extra: Vec::new(),
                    name: name.to_string(),
                });
                let mut contents = self.others(&dir);
                if let Some(c) = contents.last_mut() {
                    *c = Content::Zero;
                }
                self.store_bitmaps(ext, dir, contents, Vec::new())
            }
            BitmapOp::Remove => {
                // QEMU's removal: a directory without it, its clusters freed; then, on
                // closing, every other (consistent) bitmap stored anew.
                let i = find(&dir, name).ok_or_else(|| not_found(name))?;
                let garbage = self.bitmap_clusters(&dir[i])?;
                dir.remove(i);
                self.switch_bitmap_dir(ext, &dir, garbage)?;
                if !self.store_all_bitmaps || dir.iter().all(|d| d.e.flags & BME_FLAG_IN_USE != 0) {
                    return Ok(());
                }
                let (ext, dir) = self.read_bitmap_dir()?;
                let contents = self.others(&dir);
                self.store_bitmaps(ext, dir, contents, Vec::new())
            }
            BitmapOp::Enable | BitmapOp::Disable => {
                let i = find(&dir, name).ok_or_else(|| not_found(name))?;
                usable(&dir[i])?;
                let f = dir[i].e.flags;
                dir[i].e.flags = if *op == BitmapOp::Enable {
                    f | BME_FLAG_AUTO
                } else {
                    f & !BME_FLAG_AUTO
                };
                // Stored anew even when the flag was already so, as qemu-img does.
                let contents = self.others(&dir);
                self.store_bitmaps(ext, dir, contents, Vec::new())
            }
            BitmapOp::Clear => {
                let i = find(&dir, name).ok_or_else(|| not_found(name))?;
                usable(&dir[i])?;
                let mut contents = self.others(&dir);
                contents[i] = Content::Zero;
                self.store_bitmaps(ext, dir, contents, Vec::new())
            }
            BitmapOp::Merge(_) | BitmapOp::MergeFrom { .. } => {
                let i = find(&dir, name).ok_or_else(|| not_found(name))?;
                let size = self.header.size;
                let (from, gs) = match op {
                    BitmapOp::MergeFrom { file, source } => bits_of_file(file, source, size)?,
                    BitmapOp::Merge(src) => {
                        let j = find(&dir, src).ok_or_else(|| not_found(src))?;
                        usable(&dir[j])?;
                        (
                            self.read_bitmap_bits(&dir[j])?,
                            1u64 << dir[j].e.granularity_bits,
                        )
                    }
                    _ => return Err(Error::invalid_argument("not a merge")),
                };
                usable(&dir[i])?;
                let mut bits = self.read_bitmap_bits(&dir[i])?;
                merge_bits(
                    &mut bits,
                    1u64 << dir[i].e.granularity_bits,
                    &from,
                    gs,
                    size,
                );
                let mut contents = self.others(&dir);
                contents[i] = Content::Bits(bits);
                self.store_bitmaps(ext, dir, contents, Vec::new())
            }
        }
    }
}

fn not_found(name: &str) -> Error {
    Error::invalid_argument(format!("Dirty bitmap '{name}' not found"))
}

#[cfg(test)]
mod tests {
    use super::merge_bits;

    #[test]
    fn merge_maps_granularities() {
        // Source 512 B per bit, bits 0 and 130 (byte 66560): target 64 KiB per bit.
        let mut src = vec![0u8; 32];
        src[0] = 1;
        src[130 / 8] |= 1 << (130 % 8);
        let mut t = vec![0u8; 1];
        merge_bits(&mut t, 65536, &src, 512, 256 * 512);
        assert_eq!(t, [0b11]);
        // Coarse source, fine target: one source bit sets every target bit it covers,
        // and none past the size.
        let mut t = vec![0u8; 2];
        merge_bits(&mut t, 512, &[1], 4096, 5 * 512);
        assert_eq!(t, [0b1_1111, 0]);
    }
}

//! The qcow2 writer. The layout follows what `qemu-img convert -O qcow2` produces, so sizes
//! match: header (cluster 0), refcount table (cluster 1), the first refcount block (cluster
//! 2), the L1 table (cluster 3 on), then L2 tables and data clusters in the order guest
//! clusters are first written, with further refcount blocks where the file grows past what
//! the previous ones cover.
//!
//! - Uncompressed writes are parallel and unordered: clusters (and L2 tables) are allocated
//!   under one short lock, the data is written with `pwrite` outside it.
//! - Compressed writes (`-c`) compress in [`ImageWriter::encode`] on the worker threads and
//!   arrive in guest order; `write` packs them byte by byte as QEMU does (a compressed
//!   cluster may continue into the next host cluster when that one is the next allocated).
//!   zlib clusters are raw deflate with a 4 KiB window, which is what QEMU inflates with; a
//!   cluster that does not shrink below one cluster is stored uncompressed.
//! - Metadata is written once: refcount blocks when the allocation passes them, L2 tables
//!   when they leave the cache or at `finish`, the refcount table, L1 table and header at
//!   `finish`. No fsync here: the [`Output`] commit does it once.
//!
//! Memory bound: the L1 table (8 bytes per 2^(2*cluster_bits-3) guest bytes, at most 32
//! MiB, 8 KiB for a 1 TiB disk with 64 KiB clusters), the refcount table (8 bytes per
//! refcount block, at most 8 MiB), an L2 cache of at most 16 MiB (and 4..=1024 tables), and
//! a handful of refcount blocks (one cluster each). Nothing grows with the amount of data.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use byteorder::{BigEndian as BE, ByteOrder};

use super::crypt_prealloc::{split_gap, Coverage, GapPiece};
use super::error::Qcow2Error;
use super::header::*;
use super::refcount::Alloc;
use crate::codec;
use crate::error::{Error, ErrorKind, Result};
use crate::formats::Format;
use crate::formats::{Choice, ChoiceRefusal};
use crate::limits;
use crate::mapping::Codec;
use crate::options::{parse_bool, CreateOptions};
use crate::output::{OutFile, Output};
use crate::writer::{EncodedUnit, ImageWriter, WriterCaps};

/// Deflate level for `-c` with zlib: the fastest level whose output stays within 5% of
/// qemu-img's (level 6, zlib). On the issue 6 workload (2 GiB with 96 MiB random and 96 MiB
/// text-like data; CPU seconds, output bytes; qemu-img 4.75 s, 132644864): level 1 0.62 s
/// but +15.7% (static Huffman only); level 2 0.87 s, +2.7%; level 3 0.98 s, +1.1%; level 6
/// 1.37 s, +0.7%.
pub const DEFLATE_LEVEL: u32 = 2;
/// zstd level for `-c` with `compression_type=zstd` (QEMU uses zstd's default, 3).
pub const ZSTD_LEVEL: i32 = 3;

/// Preallocation modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prealloc {
    /// Allocate as data is written.
    Off,
    /// Allocate every L2 table and data cluster at creation.
    Metadata,
    /// Metadata, plus `fallocate` of the whole file.
    Falloc,
    /// Metadata, plus zeros written over every data cluster.
    Full,
}

/// `preallocation`: qemu-img's qcow2 modes.
const PREALLOCATION: Choice = Choice {
    option: "preallocation",
    values: &["off", "metadata", "falloc", "full"],
    default: "off",
    refusal: ChoiceRefusal::DoesNotAccept("preallocation"),
};

/// `compression_type`, which qemu-img names `compression-type` in its refusal.
const COMPRESSION_TYPE: Choice = Choice {
    option: "compression_type",
    values: &["zlib", "zstd"],
    default: "zlib",
    refusal: ChoiceRefusal::DoesNotAccept("compression-type"),
};

/// The create options with fixed choices (the driver's declared capabilities).
pub(super) const CHOICES: &[Choice] = &[PREALLOCATION, COMPRESSION_TYPE];

/// Checked creation options for a qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`, the default).
    pub version: u32,
    /// log2 of the cluster size (9..=21, default 16).
    pub cluster_bits: u32,
    /// log2 of the refcount width in bits (0..=6, default 4).
    pub refcount_order: u32,
    /// Set the lazy refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// Preallocation.
    pub prealloc: Prealloc,
    /// `-c`: compress clusters with this codec.
    pub compress: Option<Codec>,
    /// The header's compression type (zstd sets the incompatible bit).
    pub compression_type: u8,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing file format name.
    pub backing_fmt: Option<String>,
    /// External data file name (a file next to the image).
    pub data_file: Option<String>,
    /// The data file stays a valid raw image.
    pub data_file_raw: bool,
    /// `encrypt.format=luks` (see `encrypt_write.rs`).
    pub encrypt: bool,
}

fn bad(msg: impl Into<String>) -> Error {
    Qcow2Error::BadOption(msg.into()).into()
}

impl WriteOptions {
    /// Checks `opts` as `qemu-img create -f qcow2` does, for a disk of `size` bytes.
    pub fn from_options(opts: &CreateOptions, size: u64) -> Result<WriteOptions> {
        let encrypt = super::encrypt_write::requested(opts)?;
        let version = match opts.get_str("compat").unwrap_or("1.1") {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            other => return Err(bad(format!("Invalid compatibility level: '{other}'"))),
        };
        let cs = opts.get_size("cluster_size")?.unwrap_or(65536);
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(bad(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        let cluster_bits = cs.trailing_zeros();
        let refcount_bits = opts.get_number("refcount_bits")?.unwrap_or(16);
        if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
            return Err(bad(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if version < 3 && refcount_bits != 16 {
            return Err(bad("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"));
        }
        let lazy_refcounts = opts.get_bool("lazy_refcounts", false)?;
        if version < 3 && lazy_refcounts {
            return Err(bad("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"));
        }
        let extended_l2 = opts.get_bool("extended_l2", false)?;
        if extended_l2 {
            if version < 3 {
                return Err(bad("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"));
            }
            if cluster_bits < MIN_EXTL2_CLUSTER_BITS {
                return Err(bad(
                    "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
                ));
            }
        }
        let compression_type = match COMPRESSION_TYPE.value(opts)? {
            "zstd" if cfg!(feature = "zstd") => COMPRESSION_ZSTD,
            "zstd" => {
                return Err(Error::unsupported(
                    "compression_type=zstd: vimg was built without the `zstd` cargo feature",
                ))
            }
            _ => COMPRESSION_ZLIB,
        };
        if version < 3 && compression_type != COMPRESSION_ZLIB {
            return Err(bad("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)"));
        }
        let prealloc = match PREALLOCATION.value(opts)? {
            "metadata" => Prealloc::Metadata,
            "falloc" => Prealloc::Falloc,
            "full" => Prealloc::Full,
            _ => Prealloc::Off,
        };
        let backing_file = opts.get_str("backing_file").map(str::to_string);
        let backing_fmt = opts.get_str("backing_fmt").map(str::to_string);
        if backing_file.is_some() && backing_fmt.is_none() {
            // As qemu-img: probing the backing file on every open is how format confusion
            // attacks start.
            return Err(bad("Backing file specified without backing format"));
        }
        // QEMU's order: before the backing format's own check. Without subclusters a
        // preallocated cluster would hide the backing file's data.
        if backing_file.is_some() && prealloc != Prealloc::Off && !extended_l2 {
            return Err(bad(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            ));
        }
        if backing_fmt.is_some() && backing_file.is_none() {
            return Err(bad("Backing format cannot be used without backing file"));
        }
        if let Some(f) = &backing_fmt {
            if Format::from_name(f).is_none() {
                return Err(bad(format!("Unknown backing file format '{f}'")));
            }
        }
        if let Some(b) = &backing_file {
            if b.is_empty() || b.len() as u64 > MAX_BACKING_NAME {
                return Err(bad("Backing file name too long"));
            }
        }
        let data_file = opts.get_str("data_file").map(str::to_string);
        let data_file_raw = match opts.get_str("data_file_raw") {
            None => false,
            Some(v) => parse_bool(v)
                .ok_or_else(|| bad("Parameter 'data_file_raw' expects 'on' or 'off'"))?,
        };
        if data_file.is_some() && version < 3 {
            return Err(bad("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)"));
        }
        if data_file_raw && data_file.is_none() {
            return Err(bad("data-file-raw requires data-file"));
        }
        if data_file_raw && backing_file.is_some() {
            return Err(bad(
                "Backing file and data-file-raw cannot be used at the same time",
            ));
        }
        let compress = if opts.compress {
            if prealloc != Prealloc::Off {
                return Err(Error::refusal(
                    ErrorKind::InvalidArgument,
                    "Compression and preallocation not supported at the same time",
                ));
            }
            if data_file.is_some() {
                return Err(bad(
                    "Compression is not supported with an external data file",
                ));
            }
            Some(if compression_type == COMPRESSION_ZSTD {
                Codec::Zstd
            } else {
                Codec::Deflate
            })
        } else {
            None
        };
        // A raw data file must map every cluster: QEMU preallocates the metadata then.
        let prealloc = if data_file_raw && prealloc == Prealloc::Off {
            Prealloc::Metadata
        } else {
            prealloc
        };
        let o = WriteOptions {
            version,
            cluster_bits,
            refcount_order: refcount_bits.trailing_zeros(),
            lazy_refcounts,
            extended_l2,
            prealloc,
            compress,
            compression_type,
            backing_file,
            backing_fmt,
            data_file,
            data_file_raw,
            encrypt,
        };
        super::encrypt_write::check_combination(&o)?;
        let g = o.geometry();
        if g.l1_entries_for(size) * 8 > MAX_L1_BYTES || size > limits::MAX_VIRTUAL_SIZE {
            return Err(bad(
                "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
            ));
        }
        Ok(o)
    }

    /// The table geometry these options give.
    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.cluster_bits, self.extended_l2, self.refcount_order)
    }
}

/// One cached L2 table.
struct Slot {
    /// Entries as u64 words (two per entry with extended L2).
    words: Vec<u64>,
    dirty: bool,
    used: u64,
}

struct State {
    l1: Vec<u64>,
    tables: HashMap<u64, Slot>,
    tick: u64,
    capacity: usize,
    alloc: Alloc,
    /// Guest clusters zeroed in part over a backing file: they must be written as data
    /// before `finish`.
    partial_zero: Vec<u64>,
    /// What has been written, when the image is encrypted and preallocated (its clusters
    /// do not start out reading zeros; see `crypt_prealloc.rs`).
    cover: Option<Coverage>,
}

/// Writes a qcow2 image.
pub struct Qcow2Writer {
    file: OutFile,
    data: Option<OutFile>,
    o: WriteOptions,
    g: Geometry,
    size: u64,
    l1_offset: u64,
    state: Mutex<State>,
    /// Largest end offset of anything written to the image file.
    max_end: AtomicU64,
    /// LUKS encryption and where its header area lies.
    crypt: Option<(super::encrypt_write::Crypt, u64)>,
}

/// Where the bytes of one piece of a write come from.
enum Src {
    /// `data[start..start + len]`.
    Data(usize),
    /// The encoded unit with this index.
    Enc(usize),
    /// Zeros.
    Zero,
}

struct Piece {
    host: u64,
    /// Guest offset of the first byte (the legacy AES counts guest sectors).
    guest: u64,
    len: u64,
    src: Src,
    to_data_file: bool,
}

impl Qcow2Writer {
    /// Creates the image (and its data file) in `out`.
    pub fn create(out: &Output, size: u64, o: WriteOptions) -> Result<Qcow2Writer> {
        Self::create_encrypted(out, size, o, None)
    }

    /// [`Qcow2Writer::create`], encrypting with `crypt` (its LUKS area is stored in the
    /// clusters after the L1 table).
    pub fn create_encrypted(
        out: &Output,
        size: u64,
        o: WriteOptions,
        crypt: Option<super::encrypt_write::Crypt>,
    ) -> Result<Qcow2Writer> {
        // QEMU counts disks in 512-byte sectors and reads a qcow2 size rounded down to one,
        // so a size that is not a multiple of 512 is rounded up, as qemu-img does.
        let size = size
            .checked_next_multiple_of(512)
            .ok_or_else(|| bad("The image size is too large for file format 'qcow2'"))?;
        let file = out.create_main()?;
        if file.is_stream() {
            return Err(Error::unsupported(
                "qcow2 images cannot be written to a stream (the header is written last)",
            ));
        }
        let data = match &o.data_file {
            Some(name) => {
                let d = out.create_named(name)?;
                d.set_len(size)?;
                Some(d)
            }
            None => None,
        };
        let g = o.geometry();
        let cs = g.cluster_size;
        let l1_entries = g.l1_entries_for(size);
        let mut alloc = Alloc {
            cb: g.cluster_bits,
            cs,
            order: g.refcount_order,
            region_bits: g.refblock_bits,
            max_refcount: g.refcount_max(),
            next: 3,
            free_byte: 0,
            reftable: vec![2 << g.cluster_bits],
            blocks: BTreeMap::new(),
            written_end: 0,
            unborn: Default::default(),
            table_at: 1,
            table_clusters: 1,
        };
        // QEMU's layout: header, refcount table, refcount block, then the L1 table.
        let mut block0 = vec![0u8; cs as usize];
        for c in 0..3 {
            refcount_set(&mut block0, g.refcount_order, c, 1);
        }
        alloc.blocks.insert(0, block0);
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let l1_offset = if l1_clusters > 0 {
            alloc.alloc(&file, l1_clusters, true)? << g.cluster_bits
        } else {
            0
        };
        let mut max_end = (l1_offset + l1_entries * 8).max(cs);
        // The LUKS area takes the clusters after the L1 table, or after the preallocated
        // ones: QEMU sets encryption up after the size (and preallocation) is in place.
        let preallocated_crypt = crypt.is_some() && o.prealloc != Prealloc::Off;
        let (crypt, later) = match crypt {
            Some(c) if !preallocated_crypt => {
                let (c, at, end) = Self::store_area(&file, &mut alloc, c, cs)?;
                max_end = max_end.max(end);
                (Some((c, at)), None)
            }
            later => (None, later),
        };
        let capacity = ((limits::TABLE_CACHE_BYTES >> g.cluster_bits) as usize).clamp(4, 1024);
        let w = Qcow2Writer {
            file,
            data,
            g,
            size,
            l1_offset,
            state: Mutex::new(State {
                l1: vec![0u64; l1_entries as usize],
                tables: HashMap::new(),
                tick: 0,
                capacity,
                alloc,
                partial_zero: Vec::new(),
                cover: preallocated_crypt.then(Coverage::default),
            }),
            max_end: AtomicU64::new(max_end),
            o,
            crypt,
        };
        if w.o.prealloc != Prealloc::Off {
            w.preallocate()?;
        }
        let mut w = w;
        if let Some(c) = later {
            let (c, at, end) = {
                let mut st = w.lock()?;
                Self::store_area(&w.file, &mut st.alloc, c, cs)?
            };
            w.note_end(end);
            w.crypt = Some((c, at));
        }
        Ok(w)
    }

    /// Allocates the LUKS area's clusters at the frontier and writes the area there.
    fn store_area(
        file: &OutFile,
        alloc: &mut Alloc,
        mut c: super::encrypt_write::Crypt,
        cs: u64,
    ) -> Result<(super::encrypt_write::Crypt, u64, u64)> {
        let at = match c.clusters(cs) {
            0 => 0,
            n => alloc.alloc(file, n, true)? << alloc.cb,
        };
        let mut end = 0;
        if let Some(area) = c.take_area(cs) {
            file.write_all_at(&area, at)?;
            end = at + area.len() as u64;
        }
        Ok((c, at, end))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::msg(ErrorKind::Io, "qcow2 writer lock poisoned"))
    }

    fn note_end(&self, end: u64) {
        self.max_end.fetch_max(end, Ordering::Relaxed);
    }

    /// Allocates every L2 table and data cluster, in QEMU's order: for `metadata` (and any
    /// mode with a data file) each L2 table, then the clusters it maps; for `falloc` and
    /// `full` as QEMU's truncate does it ([`Self::preallocate_area`]).
    fn preallocate(&self) -> Result<()> {
        let g = self.g;
        let cs = g.cluster_size;
        let total = self.size.div_ceil(cs);
        // (Size 0 too: QEMU still places its refcount area then.)
        if self.data.is_none() && matches!(self.o.prealloc, Prealloc::Falloc | Prealloc::Full) {
            return self.preallocate_area(total);
        }
        let mut st = self.lock()?;
        let l1_len = st.l1.len() as u64;
        for l1i in 0..l1_len {
            let l2c = st.alloc.alloc(&self.file, 1, true)?;
            st.l1[l1i as usize] = l2c << g.cluster_bits;
            let first_guest = l1i << g.l2_bits;
            let n = (total - first_guest).min(g.l2_entries());
            let host0 = if let Some(d) = &self.data {
                // The data file gets the space as qemu-img gives it (iotest 243): falloc
                // reserves it, full writes zeros. (A size that is not a whole number of
                // clusters: see after the loop.)
                let h = first_guest << g.cluster_bits;
                if self.size.is_multiple_of(cs) {
                    match self.o.prealloc {
                        Prealloc::Falloc => d.allocate(h, n * cs)?,
                        Prealloc::Full => write_zeros(d, h, n * cs)?,
                        _ => {}
                    }
                }
                h
            } else {
                let h = st.alloc.alloc(&self.file, n, true)? << g.cluster_bits;
                match self.o.prealloc {
                    Prealloc::Falloc => self.file.allocate(h, n * cs)?,
                    Prealloc::Full => write_zeros(&self.file, h, n * cs)?,
                    _ => {}
                }
                self.note_end(h + n * cs);
                h
            };
            let step = if g.extended_l2 { 2 } else { 1 };
            let mut words = vec![0u64; (g.l2_entries() * step) as usize];
            for i in 0..n {
                words[(i * step) as usize] = (host0 + i * cs) | OFLAG_COPIED;
            }
            let off = l2c << g.cluster_bits;
            self.file.write_all_at(&words_to_bytes(&words), off)?;
            self.note_end(off + cs);
        }
        // With a partial last cluster, qemu-img writes that whole cluster of the data file
        // (zeros; the file then ends on a cluster boundary) and reserves nothing else,
        // whatever the preallocation mode.
        if let Some(d) = &self.data {
            if !self.size.is_multiple_of(cs) {
                write_zeros(d, self.size / cs * cs, cs)?;
            }
        }
        Ok(())
    }

    /// `falloc`/`full` without a data file, laid out as QEMU's `qcow2_co_truncate` lays it
    /// out: a refcount area at the frontier (new blocks as needed and a new refcount table,
    /// the old one in cluster 1 freed) sized for the data and one L2 table more than they
    /// need, then the data clusters in one contiguous run (reserved or written as zeros),
    /// then the L2 tables, the first in the freed cluster 1 and the others after the data.
    fn preallocate_area(&self, total: u64) -> Result<()> {
        let g = self.g;
        let cs = g.cluster_size;
        let cb = g.cluster_bits;
        let per = g.l2_entries();
        let mut st = self.lock()?;
        let l1_len = st.l1.len() as u64;
        let start = st.alloc.next;
        // QEMU wrote the first refcount table at create; the area frees its cluster, and
        // only an L2 table placed there later overwrites it (none for an empty disk).
        let mut old_table = st.alloc.reftable.clone();
        old_table.resize((st.alloc.table_clusters * cs / 8) as usize, 0);
        self.file
            .write_all_at(&words_to_bytes(&old_table), st.alloc.table_at << cb)?;
        let data = st
            .alloc
            .refcount_area(&self.file, start, total + total.div_ceil(per) + 1)?;
        // The data run, a table's worth at a time (so that passed refcount blocks are
        // written and dropped as the run goes).
        let mut done = 0;
        while done < total {
            let k = (total - done).min(per);
            let at = st.alloc.alloc(&self.file, k, true)?;
            if at != data + done {
                return Err(Error::msg(
                    ErrorKind::Io,
                    "qcow2 preallocated data run is not contiguous",
                ));
            }
            done += k;
        }
        let (h, len) = (data << cb, total << cb);
        match self.o.prealloc {
            _ if len == 0 => {}
            Prealloc::Falloc => self.file.allocate(h, len)?,
            _ => write_zeros(&self.file, h, len)?,
        }
        self.note_end(h + len);
        let step = if g.extended_l2 { 2 } else { 1 };
        for l1i in 0..l1_len {
            let l2c = if l1i == 0 && st.alloc.get(1) == 0 {
                st.alloc.bump(1)?;
                1
            } else {
                st.alloc.alloc(&self.file, 1, true)?
            };
            st.l1[l1i as usize] = l2c << cb;
            let first = l1i * per;
            let n = (total - first).min(per);
            let mut words = vec![0u64; (per * step) as usize];
            for i in 0..n {
                words[(i * step) as usize] = ((data + first + i) << cb) | OFLAG_COPIED;
            }
            let off = l2c << cb;
            self.file.write_all_at(&words_to_bytes(&words), off)?;
            self.note_end(off + cs);
        }
        Ok(())
    }

    /// The cached L2 table of `l1i`, loading it back from the file or allocating it.
    fn table<'s>(&self, st: &'s mut State, l1i: u64, create: bool) -> Result<Option<&'s mut Slot>> {
        st.tick += 1;
        let tick = st.tick;
        if !st.tables.contains_key(&l1i) && !self.load_table(st, l1i, create, tick)? {
            return Ok(None);
        }
        let slot = st
            .tables
            .get_mut(&l1i)
            .ok_or_else(|| Error::msg(ErrorKind::Io, "qcow2 L2 table missing from cache"))?;
        slot.used = tick;
        Ok(Some(slot))
    }

    /// Brings the L2 table of `l1i` into the cache (evicting the least recently used one);
    /// false when it does not exist and `create` is not set.
    fn load_table(&self, st: &mut State, l1i: u64, create: bool, tick: u64) -> Result<bool> {
        let off = st.l1.get(l1i as usize).copied().ok_or_else(|| {
            Error::invalid_argument(format!("qcow2 write past the L1 table (index {l1i})"))
        })?;
        if off == 0 && !create {
            return Ok(false);
        }
        if st.tables.len() >= st.capacity {
            let victim = st
                .tables
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(&k, _)| k);
            if let Some(s) = victim.and_then(|k| st.tables.remove(&k).map(|s| (k, s))) {
                let (k, s) = s;
                if s.dirty {
                    let at = st.l1[k as usize];
                    self.file.write_all_at(&words_to_bytes(&s.words), at)?;
                    self.note_end(at + self.g.cluster_size);
                }
            }
        }
        let cs = self.g.cluster_size;
        let slot = if off != 0 {
            let f = self
                .file
                .file()
                .ok_or_else(|| Error::unsupported("qcow2 output must be a regular file"))?;
            let mut raw = vec![0u8; cs as usize];
            f.read_exact_at(&mut raw, off)
                .map_err(|e| Error::io(format_args!("read back L2 table at {off:#x}"), e))?;
            Slot {
                words: bytes_to_words(&raw),
                dirty: false,
                used: tick,
            }
        } else {
            let c = st.alloc.alloc(&self.file, 1, true)?;
            st.l1[l1i as usize] = c << self.g.cluster_bits;
            self.note_end((c + 1) << self.g.cluster_bits);
            Slot {
                words: vec![0u64; (cs / 8) as usize],
                dirty: true,
                used: tick,
            }
        };
        st.tables.insert(l1i, slot);
        Ok(true)
    }

    fn slot_index(&self, guest_cluster: u64) -> (u64, usize) {
        let l1i = guest_cluster >> self.g.l2_bits;
        let i = (guest_cluster & (self.g.l2_entries() - 1)) as usize;
        (l1i, if self.g.extended_l2 { 2 * i } else { i })
    }

    /// How many of the write's units from `u` on (at most to `units`, within `u`'s L2
    /// table, which is loaded) have no host cluster yet.
    fn unallocated_run(&self, st: &mut State, offset: u64, u: u64, units: u64) -> Result<u64> {
        let g = self.g;
        let gc0 = (offset >> g.cluster_bits) + u;
        let (l1i, _) = self.slot_index(gc0);
        let Some(slot) = self.table(st, l1i, false)? else {
            return Ok(1);
        };
        let mut k = 0;
        for v in u..units {
            let (l1v, idx) = self.slot_index(gc0 + (v - u));
            if l1v != l1i {
                break;
            }
            let bitmap = if g.extended_l2 {
                slot.words[idx + 1]
            } else {
                0
            };
            if self.write_host(slot.words[idx], bitmap).is_some() {
                break;
            }
            k += 1;
        }
        Ok(k.max(1))
    }

    /// The host cluster a write of a whole cluster goes to: the entry's data cluster, or, in
    /// an extended L2 entry, the standard cluster it has even when no subcluster is marked
    /// allocated yet (a preallocated one), as QEMU writes into it. Allocating another would
    /// leak it.
    fn write_host(&self, entry: u64, bitmap: u64) -> Option<u64> {
        self.data_host(entry, bitmap).or_else(|| {
            let off = entry & L2E_OFFSET_MASK;
            (self.g.extended_l2 && entry & OFLAG_COMPRESSED == 0 && off != 0).then_some(off)
        })
    }

    /// Standard host cluster of an entry, if it holds data (not compressed, not zero).
    fn data_host(&self, entry: u64, bitmap: u64) -> Option<u64> {
        if entry & OFLAG_COMPRESSED != 0 {
            return None;
        }
        let off = entry & L2E_OFFSET_MASK;
        let has = off != 0 || (self.data.is_some() && entry & OFLAG_COPIED != 0);
        if !has {
            return None;
        }
        if self.g.extended_l2 {
            (bitmap as u32 == u32::MAX).then_some(off)
        } else {
            (entry & OFLAG_ZERO == 0).then_some(off)
        }
    }

    /// Finds or allocates the host place of every cluster of `[offset, offset + len)`
    /// (with `encoded`, compressed clusters are allocated byte-packed) and updates the L2
    /// entries; returns the pieces to write.
    fn place(&self, offset: u64, len: u64, encoded: &[EncodedUnit]) -> Result<Vec<Piece>> {
        let g = self.g;
        let cs = g.cluster_size;
        if !offset.is_multiple_of(cs) || offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::invalid_argument(format!(
                "qcow2 write of {len} bytes at {offset:#x} is not cluster aligned or passes the end of the disk"
            )));
        }
        let mut pieces: Vec<Piece> = Vec::new();
        {
            let mut st = self.lock()?;
            if let Some(c) = st.cover.as_mut() {
                c.add(offset, offset + len);
            }
            let units = len.div_ceil(cs);
            // Clusters still to hand out from the last allocation, and the next one.
            let mut run: (u64, u64) = (0, 0);
            for u in 0..units {
                let guest = offset + u * cs;
                let dstart = (u * cs) as usize;
                let dlen = (len - u * cs).min(cs);
                let (l1i, idx) = self.slot_index(guest >> g.cluster_bits);
                let enc = encoded.get(u as usize).and_then(|e| e.as_ref());
                let (entry, bitmap) = {
                    let slot = self
                        .table(&mut st, l1i, true)?
                        .ok_or_else(|| Error::msg(ErrorKind::Io, "qcow2 L2 table missing"))?;
                    (
                        slot.words[idx],
                        if g.extended_l2 {
                            slot.words[idx + 1]
                        } else {
                            0
                        },
                    )
                };
                if let (Some(bytes), None) = (enc, self.data_host(entry, bitmap)) {
                    let n = bytes.len() as u64;
                    let host = st.alloc.alloc_bytes(&self.file, n)?;
                    if host + n > 1u64 << g.csize_shift {
                        return Err(Error::unsupported(
                            "compressed qcow2 data would pass the largest offset a compressed cluster descriptor holds",
                        ));
                    }
                    let slot = self
                        .table(&mut st, l1i, true)?
                        .ok_or_else(|| Error::msg(ErrorKind::Io, "qcow2 L2 table missing"))?;
                    slot.words[idx] = encode_compressed(&g, host, n);
                    if g.extended_l2 {
                        slot.words[idx + 1] = 0;
                    }
                    slot.dirty = true;
                    pieces.push(Piece {
                        host,
                        guest,
                        len: n,
                        src: Src::Enc(u as usize),
                        to_data_file: false,
                    });
                    continue;
                }
                let host = match self.write_host(entry, bitmap) {
                    Some(h) => h,
                    None if self.data.is_some() => guest,
                    None if run.0 > 0 => {
                        run = (run.0 - 1, run.1 + cs);
                        run.1 - cs
                    }
                    None => {
                        // One allocation for the clusters of this write in this L2 table
                        // that have none, as QEMU's allocator makes: a refcount block the
                        // run needs goes after the run, not into it.
                        let k = if encoded.is_empty() {
                            self.unallocated_run(&mut st, offset, u, units)?
                        } else {
                            1
                        };
                        let h = st.alloc.alloc(&self.file, k, true)? << g.cluster_bits;
                        run = (k - 1, h + cs);
                        h
                    }
                };
                let slot = self
                    .table(&mut st, l1i, true)?
                    .ok_or_else(|| Error::msg(ErrorKind::Io, "qcow2 L2 table missing"))?;
                slot.words[idx] = host | OFLAG_COPIED;
                if g.extended_l2 {
                    slot.words[idx + 1] = u64::from(u32::MAX);
                }
                slot.dirty = true;
                let to_data_file = self.data.is_some();
                match pieces.last_mut() {
                    Some(p)
                        if matches!(p.src, Src::Data(s) if s + p.len as usize == dstart)
                            && p.host + p.len == host
                            && p.to_data_file == to_data_file =>
                    {
                        p.len += dlen;
                    }
                    _ => pieces.push(Piece {
                        host,
                        guest,
                        len: dlen,
                        src: Src::Data(dstart),
                        to_data_file,
                    }),
                }
            }
        }
        Ok(pieces)
    }

    fn write_pieces(&self, pieces: &[Piece], data: &[u8], encoded: &[EncodedUnit]) -> Result<()> {
        for p in pieces {
            let out = if p.to_data_file {
                self.data.as_ref().unwrap_or(&self.file)
            } else {
                &self.file
            };
            match (&p.src, &self.crypt) {
                (&Src::Data(start), Some((c, _))) => {
                    // The last cluster of a disk that ends inside it is encrypted whole, the
                    // rest as zeros (QEMU's copy-on-write fills it so).
                    let cs = self.g.cluster_size;
                    let end = p.host + p.len;
                    let pad = match p.guest + p.len == self.size {
                        true => end.next_multiple_of(cs) - end,
                        false => 0,
                    };
                    let mut plain = data[start..start + p.len as usize].to_vec();
                    plain.resize((p.len + pad) as usize, 0);
                    let buf = c.encrypt(p.host, p.guest, &plain)?;
                    out.write_all_at(&buf, p.host)?;
                    if !p.to_data_file {
                        self.note_end(p.host + p.len + pad);
                    }
                }
                (&Src::Zero, Some((c, _))) => {
                    let mut pos = 0;
                    while pos < p.len {
                        let n = (p.len - pos).min(1 << 20);
                        let buf = c.encrypt(p.host + pos, p.guest + pos, &vec![0u8; n as usize])?;
                        out.write_all_at(&buf, p.host + pos)?;
                        pos += n;
                    }
                }
                (&Src::Data(start), None) => {
                    out.write_all_at(&data[start..start + p.len as usize], p.host)?;
                }
                (&Src::Enc(u), _) => {
                    if let Some(Some(bytes)) = encoded.get(u) {
                        out.write_all_at(bytes, p.host)?;
                    }
                }
                (&Src::Zero, None) => write_zeros(out, p.host, p.len)?,
            }
            if !p.to_data_file {
                self.note_end(p.host + p.len);
            }
        }
        Ok(())
    }
}

/// One whole cluster compressed as QEMU compresses it (zlib: raw deflate with a 4 KiB
/// window; zstd), or `None` when the result would not be shorter than the cluster (QEMU
/// then stores it uncompressed). Shared by `convert -c` and the updater's compressed
/// writes (`rebase -c`, update/compress.rs).
pub(crate) fn compress_cluster(c: Codec, input: &[u8]) -> Option<Vec<u8>> {
    let cs = input.len();
    match c {
        Codec::Zstd => codec::zstd_compress(input, ZSTD_LEVEL, cs),
        _ if looks_incompressible(input) => None,
        _ => codec::deflate(input, DEFLATE_LEVEL, 12, false, cs),
    }
}

/// True when `data` is so close to uniformly random that deflate with a 4 KiB window cannot
/// shrink it below its size: its byte entropy is within three expected sampling deficits of
/// 8 bits. Any repetition deflate could use (a period under 4 KiB) lowers the entropy far
/// more than that, and Huffman coding gains under 0.1% at this entropy, less than the
/// stored-block overhead. Skipping the attempt halves the CPU time of `-c` on data that is
/// already compressed or encrypted; the result is the same (the cluster is stored as is).
fn looks_incompressible(data: &[u8]) -> bool {
    let n = data.len();
    if n < 16384 {
        return false;
    }
    let mut counts = [[0u32; 256]; 4];
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        counts[0][c[0] as usize] += 1;
        counts[1][c[1] as usize] += 1;
        counts[2][c[2] as usize] += 1;
        counts[3][c[3] as usize] += 1;
    }
    for &b in chunks.remainder() {
        counts[0][b as usize] += 1;
    }
    let nf = n as f64;
    let mut h = 0.0f64;
    let [a, b, c, d] = &counts;
    for (((x, y), z), w) in a.iter().zip(b).zip(c).zip(d) {
        let c = x + y + z + w;
        if c > 0 {
            let p = f64::from(c) / nf;
            h -= p * p.log2();
        }
    }
    // Expected entropy deficit of n uniform random bytes: 255 / (2 n ln 2).
    let deficit = 255.0 / (2.0 * nf * std::f64::consts::LN_2);
    h >= 8.0 - 3.0 * deficit
}

fn write_zeros(f: &OutFile, offset: u64, len: u64) -> Result<()> {
    static ZEROS: [u8; 1 << 16] = [0u8; 1 << 16];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(ZEROS.len() as u64) as usize;
        f.write_all_at(&ZEROS[..n], offset + pos)?;
        pos += n as u64;
    }
    Ok(())
}

fn bytes_to_words(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8).map(BE::read_u64).collect()
}

fn words_to_bytes(words: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(words.len() * 8);
    for w in words {
        v.extend_from_slice(&w.to_be_bytes());
    }
    v
}

impl ImageWriter for Qcow2Writer {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            unit: self.g.cluster_size,
            ordered: self.o.compress.is_some(),
            encodes: self.o.compress.is_some(),
        }
    }

    fn encode(&self, offset: u64, data: &[u8]) -> Result<Vec<EncodedUnit>> {
        let Some(c) = self.o.compress else {
            return Ok(Vec::new());
        };
        let _ = offset;
        let cs = self.g.cluster_size as usize;
        let mut out = Vec::with_capacity(data.len().div_ceil(cs));
        let mut padded = Vec::new();
        for unit in data.chunks(cs) {
            // The last cluster of a disk that is not cluster aligned is compressed padded
            // with zeros, as QEMU does.
            let input = if unit.len() < cs {
                padded.clear();
                padded.extend_from_slice(unit);
                padded.resize(cs, 0);
                &padded[..]
            } else {
                unit
            };
            out.push(compress_cluster(c, input));
        }
        Ok(out)
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<bool> {
        if self.o.compress.is_some() {
            return Ok(false);
        }
        self.place(offset, len, &[]).map(|_| true)
    }

    fn write(&self, offset: u64, data: &[u8], encoded: &[EncodedUnit]) -> Result<()> {
        let pieces = self.place(offset, data.len() as u64, encoded)?;
        self.write_pieces(&pieces, data, encoded)
    }

    fn starts_zero(&self) -> bool {
        // QEMU's qcow2_has_zero_init: a preallocated encrypted image does not.
        self.crypt.is_none() || self.o.prealloc == Prealloc::Off
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if !self.starts_zero() {
            return self.zero_preallocated(offset, len);
        }
        let g = self.g;
        let cs = g.cluster_size;
        let end = offset.saturating_add(len).min(self.size);
        let backing = self.o.backing_file.is_some();
        let mut pieces = Vec::new();
        {
            let mut st = self.lock()?;
            let mut pos = offset;
            while pos < end {
                let cstart = pos & !(cs - 1);
                let cend = (cstart + cs).min(self.size);
                let ze = end.min(cend);
                let full = pos == cstart && ze == cend;
                let gc = cstart >> g.cluster_bits;
                let (l1i, idx) = self.slot_index(gc);
                let (entry, bitmap) = match self.table(&mut st, l1i, false)? {
                    Some(s) => (
                        s.words[idx],
                        if g.extended_l2 { s.words[idx + 1] } else { 0 },
                    ),
                    None => (0, 0),
                };
                if let Some(h) = self.data_host(entry, bitmap) {
                    pieces.push(Piece {
                        host: h + (pos - cstart),
                        guest: pos,
                        len: ze - pos,
                        src: Src::Zero,
                        to_data_file: self.data.is_some(),
                    });
                } else if backing {
                    if g.extended_l2 {
                        // Zero the subclusters the range covers whole.
                        let scs = g.subcluster_size;
                        let mut bits = 0u32;
                        for sc in 0..SUBCLUSTERS {
                            let s = cstart + sc * scs;
                            let e = (s + scs).min(cend);
                            if s < e && s >= pos && e <= ze {
                                bits |= 1 << sc;
                            } else if s < ze && e > pos {
                                st.partial_zero.push(gc);
                            }
                        }
                        let slot = self
                            .table(&mut st, l1i, true)?
                            .ok_or_else(|| Error::msg(ErrorKind::Io, "qcow2 L2 table missing"))?;
                        slot.words[idx + 1] |= u64::from(bits) << 32;
                        slot.dirty = true;
                    } else if !full {
                        st.partial_zero.push(gc);
                    } else if self.o.version >= 3 {
                        let slot = self
                            .table(&mut st, l1i, true)?
                            .ok_or_else(|| Error::msg(ErrorKind::Io, "qcow2 L2 table missing"))?;
                        slot.words[idx] = OFLAG_ZERO;
                        slot.dirty = true;
                    } else {
                        // v2 has no zero flag: zeros are data.
                        let host = match &self.data {
                            Some(_) => cstart,
                            None => st.alloc.alloc(&self.file, 1, true)? << g.cluster_bits,
                        };
                        let slot = self
                            .table(&mut st, l1i, true)?
                            .ok_or_else(|| Error::msg(ErrorKind::Io, "qcow2 L2 table missing"))?;
                        slot.words[idx] = host | OFLAG_COPIED;
                        slot.dirty = true;
                        pieces.push(Piece {
                            host,
                            guest: cstart,
                            len: cs,
                            src: Src::Zero,
                            to_data_file: self.data.is_some(),
                        });
                    }
                }
                pos = ze;
            }
        }
        self.write_pieces(&pieces, &[], &[])
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let g = self.g;
        let cs = g.cluster_size;
        let cb = g.cluster_bits;
        let mut guard = self.lock()?;
        self.settle_preallocated(&mut guard)?;
        let State {
            l1,
            tables,
            alloc,
            partial_zero,
            ..
        } = &mut *guard;
        let file = &self.file;
        let max_end = AtomicU64::new(self.max_end.load(Ordering::Relaxed));
        let note = |e: u64| {
            max_end.fetch_max(e, Ordering::Relaxed);
        };

        // L2 tables still in memory.
        for (l1i, s) in tables.iter() {
            if s.dirty {
                let at = l1[*l1i as usize];
                file.write_all_at(&words_to_bytes(&s.words), at)?;
                note(at + cs);
            }
        }
        // Partly zeroed clusters over a backing file must have become data.
        for &gc in partial_zero.iter() {
            let (l1i, idx) = self.slot_index(gc);
            let entry = match tables.get(&l1i) {
                Some(s) => s.words[idx],
                None if l1[l1i as usize] != 0 => {
                    let mut raw = [0u8; 8];
                    let f = file
                        .file()
                        .ok_or_else(|| Error::unsupported("not a file"))?;
                    f.read_exact_at(&mut raw, l1[l1i as usize] + idx as u64 * 8)
                        .map_err(|e| Error::io("read back an L2 entry", e))?;
                    u64::from_be_bytes(raw)
                }
                None => 0,
            };
            if entry & L2E_OFFSET_MASK == 0 && entry & OFLAG_COMPRESSED == 0 {
                return Err(Error::unsupported(format!(
                    "cannot zero part of guest cluster {:#x} over a backing file without its data",
                    gc << cb
                )));
            }
        }

        // The refcount table: the reserved cluster 1 (or where preallocation put it)
        // unless the file outgrew it.
        let per_cluster = cs / 8;
        let entries = g.refblock_entries();
        let (table_at, table_clusters) = (alloc.table_at, alloc.table_clusters);
        let mut t = table_clusters;
        // A table a refcount area sized (preallocation) stays while its entries suffice.
        let moved = table_at != 1 && alloc.reftable.len() as u64 > t * per_cluster;
        if table_at == 1 || moved {
            loop {
                let extra = if t > table_clusters { t } else { 0 };
                let regions = (alloc.next + extra + 2).div_ceil(entries) + 1;
                let need = regions
                    .div_ceil(per_cluster)
                    .max((alloc.reftable.len() as u64).div_ceil(per_cluster));
                if need <= t && !(moved && t == table_clusters) {
                    break;
                }
                t = need.max(t + 1);
            }
        }
        let reftable_offset = if t > table_clusters {
            for c in table_at..table_at + table_clusters {
                alloc.release(file, c)?;
            }
            let at = alloc.alloc(file, t, true)? << cb;
            note(at + t * cs);
            at
        } else {
            table_at << cb
        };
        if alloc.reftable.len() as u64 > t * per_cluster {
            return Err(Error::msg(
                ErrorKind::Io,
                "qcow2 refcount table sizing failed",
            ));
        }
        // Every refcount block still in memory.
        let blocks = std::mem::take(&mut alloc.blocks);
        for (r, b) in &blocks {
            let at = alloc.reftable[*r as usize];
            file.write_all_at(b, at)?;
            note(at + cs);
        }
        // Blocks a refcount area placed that count nothing: zeros, as QEMU writes them.
        let zeros = vec![0u8; cs as usize];
        for r in std::mem::take(&mut alloc.unborn) {
            let at = alloc.reftable[r as usize];
            file.write_all_at(&zeros, at)?;
            note(at + cs);
        }
        let mut rt = alloc.reftable.clone();
        rt.resize((t * per_cluster) as usize, 0);
        file.write_all_at(&words_to_bytes(&rt), reftable_offset)?;
        note(reftable_offset + t * cs);

        // The L1 table.
        let l1_words: Vec<u64> = l1
            .iter()
            .map(|&o| if o != 0 { o | OFLAG_COPIED } else { 0 })
            .collect();
        if !l1_words.is_empty() {
            file.write_all_at(&words_to_bytes(&l1_words), self.l1_offset)?;
        }

        // The header cluster.
        let mut h = Header::new(self.o.version, cb, self.size);
        h.l1_size = l1.len() as u32;
        h.l1_table_offset = self.l1_offset;
        h.refcount_table_offset = reftable_offset;
        h.refcount_table_clusters = t as u32;
        h.refcount_order = self.o.refcount_order;
        if self.o.version >= 3 {
            if self.o.lazy_refcounts {
                h.compatible_features |= COMPAT_LAZY_REFCOUNTS;
            }
            if self.o.extended_l2 {
                h.incompatible_features |= INCOMPAT_EXTL2;
            }
            if self.o.compression_type == COMPRESSION_ZSTD {
                h.incompatible_features |= INCOMPAT_COMPRESSION;
                h.compression_type = COMPRESSION_ZSTD;
            }
            if self.o.data_file.is_some() {
                h.incompatible_features |= INCOMPAT_DATA_FILE;
            }
            if self.o.data_file_raw {
                h.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW;
            }
        }
        let buf = self.header_cluster(&mut h)?;
        file.write_all_at(&buf, 0)?;

        // Every allocated cluster starts inside the file. As with qemu-img, the file ends
        // where the last write ended (mid-cluster after a short L1 table), and after
        // compressed data it is rounded up to a sector.
        let mut end = max_end
            .load(Ordering::Relaxed)
            .max(alloc.written_end)
            .max(((alloc.next - 1) << cb) + 1);
        if self.o.compress.is_some() {
            end = end.div_ceil(512) * 512;
        }
        if self.o.prealloc != Prealloc::Off {
            end = end.max(alloc.next << cb);
        }
        file.set_len(end)?;
        Ok(())
    }
}

impl Qcow2Writer {
    /// Zeroes `[offset, offset + len)` of a preallocated encrypted image as QEMU's
    /// `qcow2_co_pwrite_zeroes` with `BDRV_REQ_MAY_UNMAP` does (what qemu-img's convert
    /// asks for, such an image not reading zeros from the start): a whole cluster (or the
    /// disk's last cluster to the disk's end) becomes a zero flag in version 3, unallocated
    /// in version 2 (QEMU's discard), and its host cluster is freed and punched out of the
    /// file; the rest of a cluster is written as encrypted zeros in place.
    fn zero_preallocated(&self, offset: u64, len: u64) -> Result<()> {
        let g = self.g;
        let cs = g.cluster_size;
        let end = offset.saturating_add(len).min(self.size);
        let mut pieces = Vec::new();
        let mut punch = Vec::new();
        {
            let mut st = self.lock()?;
            if let Some(c) = st.cover.as_mut() {
                c.add(offset, end);
            }
            let mut pos = offset;
            while pos < end {
                let cstart = pos & !(cs - 1);
                let cend = (cstart + cs).min(self.size);
                let ze = end.min(cend);
                let (l1i, idx) = self.slot_index(cstart >> g.cluster_bits);
                let Some(slot) = self.table(&mut st, l1i, false)? else {
                    pos = ze;
                    continue;
                };
                // Extended L2 entries are refused with this mode (encrypt_write.rs).
                let Some(host) = self.data_host(slot.words[idx], 0) else {
                    // Already zero (a zero flag, or unallocated without a backing file).
                    pos = ze;
                    continue;
                };
                if pos == cstart && ze == cend {
                    slot.words[idx] = if self.o.version >= 3 { OFLAG_ZERO } else { 0 };
                    slot.dirty = true;
                    if self.data.is_none() {
                        st.alloc.release(&self.file, host >> g.cluster_bits)?;
                    }
                    punch.push(host);
                } else {
                    pieces.push(Piece {
                        host: host + (pos - cstart),
                        guest: pos,
                        len: ze - pos,
                        src: Src::Zero,
                        to_data_file: self.data.is_some(),
                    });
                }
                pos = ze;
            }
        }
        self.write_pieces(&pieces, &[], &[])?;
        // The freed clusters give their space back, as QEMU's discard does.
        let out = self.data.as_ref().unwrap_or(&self.file);
        for host in punch {
            out.zero_range(host, cs)?;
        }
        Ok(())
    }

    /// At `finish`, makes what no write defined in a preallocated encrypted image read as
    /// zeros (the whole image after `create`): a whole cluster gets the zero flag over its
    /// allocation in version 3 (it stays preallocated), encrypted zeros otherwise.
    fn settle_preallocated(&self, st: &mut State) -> Result<()> {
        let Some(cover) = st.cover.take() else {
            return Ok(());
        };
        let g = self.g;
        let cs = g.cluster_size;
        for (start, end) in cover.gaps(self.size) {
            for piece in split_gap(start, end, cs, self.size) {
                let (gstart, gend, whole) = match piece {
                    GapPiece::Whole(gc) => {
                        let s = gc << g.cluster_bits;
                        (s, (s + cs).min(self.size), true)
                    }
                    GapPiece::Part(s, e) => (s, e, false),
                };
                let cstart = gstart & !(cs - 1);
                let (l1i, idx) = self.slot_index(cstart >> g.cluster_bits);
                let Some(slot) = self.table(st, l1i, false)? else {
                    continue;
                };
                let Some(host) = self.data_host(slot.words[idx], 0) else {
                    continue;
                };
                if whole && self.o.version >= 3 {
                    slot.words[idx] |= OFLAG_ZERO;
                    slot.dirty = true;
                    continue;
                }
                let piece = Piece {
                    host: host + (gstart - cstart),
                    guest: gstart,
                    len: gend - gstart,
                    src: Src::Zero,
                    to_data_file: self.data.is_some(),
                };
                self.write_pieces(std::slice::from_ref(&piece), &[], &[])?;
            }
        }
        Ok(())
    }

    /// Header, extensions (backing format, data file, feature names when they fit, end),
    /// and the backing file name, in QEMU's order.
    fn header_cluster(&self, h: &mut Header) -> Result<Vec<u8>> {
        let cs = self.g.cluster_size as usize;
        let mut buf = vec![0u8; cs];
        let name = self.o.backing_file.as_deref().unwrap_or("");
        let fmt = self.o.backing_fmt.as_deref();
        let df = self.o.data_file.as_deref();
        let ext_len = |d: usize| 8 + d.div_ceil(8) * 8;
        let crypt = self.crypt.as_ref().and_then(|(c, at)| c.extension(*at));
        if let Some((c, _)) = &self.crypt {
            h.crypt_method = c.method();
        }
        let mut need = h.len() + 8 + name.len() + crypt.map_or(0, |_| ext_len(16));
        need += fmt.map_or(0, |f| ext_len(f.len()));
        need += df.map_or(0, |d| ext_len(d.len()));
        if need > cs {
            return Err(bad(format!(
                "the backing file or data file name does not fit in a {cs}-byte header cluster"
            )));
        }
        let features = qemu_feature_table();
        let ft_len = features.len() * FEATURE_NAME_LEN;
        // QEMU 10 leaves the table out for clusters of 4 KiB and less, where it would take
        // most of the header cluster.
        let with_features = h.version >= 3 && cs > 4096 && need + ext_len(ft_len) <= cs;
        let mut off = h.len();
        if let Some(f) = fmt {
            off = write_extension(&mut buf, off, EXT_BACKING_FORMAT, f.as_bytes());
        }
        if let Some(d) = df {
            off = write_extension(&mut buf, off, EXT_DATA_FILE, d.as_bytes());
        }
        if let Some((magic, data)) = crypt {
            off = write_extension(&mut buf, off, magic, &data);
        }
        if with_features {
            let mut ft = vec![0u8; ft_len];
            for (i, f) in features.iter().enumerate() {
                f.write_to(&mut ft[i * FEATURE_NAME_LEN..]);
            }
            off = write_extension(&mut buf, off, EXT_FEATURE_TABLE, &ft);
        }
        // End of extensions.
        off += 8;
        if !name.is_empty() {
            h.backing_file_offset = off as u64;
            h.backing_file_size = name.len() as u32;
            buf[off..off + name.len()].copy_from_slice(name.as_bytes());
        }
        h.write_to(&mut buf);
        Ok(buf)
    }
}

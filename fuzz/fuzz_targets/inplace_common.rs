//! Shared by the in-place targets (`qed_update`, `bat_update`): a private folder on tmpfs,
//! a program of in-place operations run through `vimg::formats::updater` (and
//! `vimg::inplace`, `convert -n`), a model of what the guest writes put where, and the
//! invariants checked after the program:
//!
//! - no panic, abort or hang (libFuzzer's own checks), no allocation sized by the image
//!   (`-rss_limit_mb`, which also caps a single `malloc`);
//! - the file's length grows by no more than what the operations asked for (the bytes
//!   written, each rounded out to the format's allocation unit, plus one table per write),
//!   and the space it occupies (`st_blocks`) by no more than twice the bytes written plus
//!   a few units capped at 4 MiB (so a header claiming 1 GiB blocks cannot make a one-byte
//!   write store a gigabyte of zeros);
//! - every byte the successful writes put in (guest writes, zero writes, `convert -n`,
//!   `commit` into the image) reads back as written, through a fresh `Image::open`;
//! - the file, as left, gets the read-side property (`vimg::fuzzing::open_at_and_read_all`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vimg::formats::qcow2::{Prealloc, Repair};
use vimg::formats::updater::{self, Updater};
use vimg::gate::ExternalPolicy;
use vimg::inplace::{self, CommitOptions};
use vimg::{ConvertOptions, CreateOptions, Format, Image, OpenOptions, OutputMode};

/// Program bytes before the image.
pub const PROGRAM: usize = 8;
/// Growth per resize step (the size is the user's: trusted, so kept small here).
const GROW: u64 = 64 << 10;
/// The largest virtual size a program grows to.
const MAX_SIZE: u64 = 64 << 20;
/// Largest write one operation asks for.
const MAX_WRITE: u64 = 40 << 10;
/// The unit counted per write in the space bound (a bigger unit must not be written whole
/// when most of it only needs to read as zeros).
const UNIT_CAP: u64 = 4 << 20;
/// Files at most this long are read back whole for the read-side property.
const READ_BACK: u64 = 64 << 20;

/// The folder of this process (on tmpfs when there is one), with a 256 KiB raw file `b`
/// for images that name it as their backing file.
pub fn folder(tag: &str) -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("vimg-fuzz-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("fuzz folder");
        d
    })
}

/// Removes everything in `dir` and writes a fresh backing file `b`.
pub fn reset(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    std::fs::write(dir.join("b"), pattern(256 << 10, 0x5a)).expect("backing file");
}

/// Data with runs of zeros and a seed, so misplaced bytes show.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if (i >> 12) % 3 == 2 {
                0
            } else {
                (i as u8).wrapping_mul(31) ^ (i >> 8) as u8 ^ seed
            }
        })
        .collect()
}

/// What the guest should read where the program wrote: later entries win; `None` is a
/// range whose content is unknown (a write that failed half-way, an area cut off).
#[derive(Default)]
pub struct Model {
    entries: Vec<(u64, u64, Option<Vec<u8>>)>,
}

impl Model {
    fn data(&mut self, off: u64, data: Vec<u8>) {
        self.entries.push((off, data.len() as u64, Some(data)));
    }
    fn unknown(&mut self, off: u64, len: u64) {
        self.entries.push((off, len, None));
    }
    fn expected(&self, pos: u64) -> Option<u8> {
        for (o, l, d) in self.entries.iter().rev() {
            if pos >= *o && pos - *o < *l {
                return d.as_ref().map(|d| d[(pos - *o) as usize]);
            }
        }
        None
    }
    fn known(&self) -> bool {
        self.entries.iter().any(|e| e.2.is_some())
    }
}

/// Bounds on the file's length and on the space it occupies.
pub struct Bound {
    len: u64,
    used: u64,
}

fn used(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

impl Bound {
    fn new(path: &Path) -> Bound {
        Bound {
            len: file_len(path),
            used: used(path),
        }
    }
    /// Allows a write of `len` bytes into an image allocating in `unit`s with tables of
    /// `table` bytes.
    fn write(&mut self, len: u64, unit: u64, table: u64) {
        let u = unit.max(512);
        self.len += (len.div_ceil(u) + 2) * u + table + (64 << 10);
        self.used += 2 * len + 3 * u.min(UNIT_CAP) + table + (64 << 10);
    }
    fn check(&self, path: &Path, what: &str) {
        let (l, u) = (file_len(path), used(path));
        assert!(
            l <= self.len,
            "{what}: the file grew to {l} bytes (bound {})",
            self.len
        );
        assert!(
            u <= self.used,
            "{what}: the file occupies {u} bytes (bound {})",
            self.used
        );
    }
}

/// The state of one run.
pub struct Run<'a> {
    pub path: &'a Path,
    pub dir: &'a Path,
    pub format: Format,
    pub model: Model,
    pub bound: Bound,
    trace: bool,
    /// The image opened (with its backing file) before the program: one that did not,
    /// e.g. naming a backing file that is not there, need not open after it (the writes
    /// here pass no backing image; `convert -n` and `commit` open the image first).
    opened_before: bool,
}

fn policy() -> ExternalPolicy {
    ExternalPolicy::SameFolder
}

/// The table bytes one allocation may add (a QED L2 table; for qcow, two L2 tables a
/// write may straddle and their alignment), else 0.
fn table_bytes(up: &Updater) -> u64 {
    match up {
        Updater::Qed(q) => u64::from(q.header().table_size) * q.cluster_size(),
        Updater::Qcow(q) => 2 * (8u64 << q.header().l2_bits) + 2 * q.cluster_size(),
        _ => 0,
    }
}

impl<'a> Run<'a> {
    pub fn new(path: &'a Path, dir: &'a Path, format: Format) -> Run<'a> {
        let mut bound = Bound::new(path);
        if format == Format::Parallels {
            // The first write into an unclean Parallels image repairs it first, as
            // QEMU's read-write open does, and that repair may leave the file at QEMU's
            // end of data past its length (sparse, within twice the length plus 1 MiB:
            // `grow_limit` in parallels/update.rs).
            bound.len += bound.len + (1 << 20);
        }
        Run {
            path,
            dir,
            format,
            model: Model::default(),
            bound,
            trace: std::env::var_os("VIMG_FUZZ_TRACE").is_some(),
            opened_before: Image::open(
                path,
                &OpenOptions::with_format(Some(format)).policy(policy()),
            )
            .is_ok(),
        }
    }

    /// One write session: `pieces` of (offset, data) or (offset, zero length), then finish.
    fn write(&mut self, up: &mut Updater, pieces: &[(u64, Result<Vec<u8>, u64>)]) -> Option<()> {
        let table = table_bytes(up);
        let Ok(mut t) = up.data() else {
            return Some(());
        };
        let unit = t.unit();
        let mut done = Vec::new();
        let mut ok = true;
        for (off, p) in pieces {
            let (len, r) = match p {
                Ok(d) => (d.len() as u64, t.write_at(*off, d, None)),
                Err(n) => (*n, t.write_zeroes(*off, *n, None)),
            };
            self.bound.write(len, unit, table);
            if r.is_err() {
                ok = false;
                self.model.unknown(*off, len);
            } else {
                done.push((*off, p.clone()));
            }
        }
        if t.finish().is_err() {
            ok = false;
        }
        for (off, p) in done {
            match p {
                Ok(d) if ok => self.model.data(off, d),
                Err(n) if ok => self.model.data(off, vec![0; n as usize]),
                Ok(d) => self.model.unknown(off, d.len() as u64),
                Err(n) => self.model.unknown(off, n),
            }
        }
        Some(())
    }

    /// Runs program byte `op` (low nibble the operation, high nibble its parameter).
    pub fn op(&mut self, up: &mut Updater, op: u8, step: usize) -> Option<()> {
        let p = u64::from(op >> 4);
        let size = up.virtual_size().ok()?;
        let seed = step as u8 * 16 + 1;
        match op & 0x0f {
            0 | 1 => {
                // A write somewhere in the disk (p sixteenths in), of up to 40 KiB.
                let off = (size / 16 * p + (op & 1) as u64 * 1000).min(size);
                let len = (size - off).min((1 + p * 5000 + (op & 1) as u64 * 777) % MAX_WRITE);
                self.write(up, &[(off, Ok(pattern(len as usize, seed)))])
            }
            2 => {
                let off = (size / 16 * p).min(size);
                let len = (size - off).min(512 + p * 3000);
                self.write(up, &[(off, Err(len))])
            }
            3 => {
                // Across a unit boundary.
                let unit = up.data().map(|t| t.unit()).unwrap_or(512);
                let off = (unit.saturating_mul(p + 1)).saturating_sub(300).min(size);
                let len = (size - off).min(700);
                self.write(up, &[(off, Ok(pattern(len as usize, seed)))])
            }
            4 => {
                let new = (size + GROW * (p + 1)).min(MAX_SIZE.max(size));
                if up.resize(new, Prealloc::Off).is_ok() {
                    self.bound.len += new - size;
                }
                Some(())
            }
            5 => {
                let new = size.saturating_sub(512 * (p + 1));
                if up.resize(new, Prealloc::Off).is_ok() {
                    self.model.unknown(new, size - new);
                }
                Some(())
            }
            6 | 7 => {
                let mode = if op & 0x0f == 6 {
                    Repair::Leaks
                } else {
                    Repair::All
                };
                let before = file_len(self.path);
                // A repair copies at most every cluster of the file once; a Parallels
                // repair also leaves the file at QEMU's end of data, which may lie past
                // it (sparse, within twice the length plus 1 MiB: `grow_limit` in
                // parallels/update.rs), so the length may grow by 1 MiB more.
                self.bound.len += before + (1 << 20);
                self.bound.used += before;
                let _ = up.repair(mode);
                Some(())
            }
            8 => {
                let _ = up.set_backing(if p & 1 == 0 { None } else { Some(("b", "raw")) });
                Some(())
            }
            9 => self.convert_n(up, p, size, seed),
            10 => self.commit(up, p, size, seed),
            11 => {
                // Safe rebase onto no backing file (copies what `b` shows into the image).
                let unit = up.data().map(|t| t.unit()).unwrap_or(512);
                let table = table_bytes(up);
                self.bound.write(256 << 10, unit, table);
                let _ = inplace::rebase(self.path, self.format, policy(), None, &|_| {});
                self.reopen(up)
            }
            12 => {
                // Several pieces in one session, in different units, out of order.
                let unit = up.data().map(|t| t.unit()).unwrap_or(512).min(size.max(1));
                let mut pieces = Vec::new();
                for k in 0..(p % 4 + 2) {
                    let u = (p * 3 + k * 5) % 16;
                    let off = (size / 16 * u + k * 123).min(size);
                    let len = (size - off).min(unit / 2 + k * 100).min(MAX_WRITE);
                    let piece = if k % 3 == 2 {
                        Err(len)
                    } else {
                        Ok(pattern(len as usize, seed + k as u8))
                    };
                    pieces.push((off, piece));
                }
                self.write(up, &pieces)
            }
            _ => self.reopen(up),
        }
    }

    fn reopen(&mut self, up: &mut Updater) -> Option<()> {
        *up = updater::open(self.path, self.format, policy()).ok()?;
        Some(())
    }

    /// `convert -n` from a raw file of up to 160 KiB into the image.
    fn convert_n(&mut self, up: &mut Updater, p: u64, size: u64, seed: u8) -> Option<()> {
        let n = size.min(160 << 10) / 512 * 512;
        let src = self.dir.join("s.raw");
        let data = pattern(n as usize, seed ^ p as u8);
        std::fs::write(&src, &data).ok()?;
        let table = table_bytes(up);
        let unit = up.data().map(|t| t.unit()).unwrap_or(512);
        // The updater's file must not be held open across a writer of the same file.
        *up = Updater::Raw(vimg::formats::raw::update::RawUpdate::open(&src).ok()?);
        let img = Image::open(&src, &OpenOptions::with_format(Some(Format::Raw))).ok()?;
        let mut opts = ConvertOptions::new(self.format);
        opts.output_mode = OutputMode::InPlace;
        opts.copy.workers = 1;
        opts.target_is_zero = p & 1 == 1;
        opts.target_policy = policy();
        self.bound.write(n, unit, table * (n / unit.max(1) + 1));
        match vimg::convert(&img, self.path, &opts) {
            Ok(_) if !opts.target_is_zero => self.model.data(0, data),
            _ => self.model.unknown(0, n),
        }
        self.reopen(up)
    }

    /// `commit` of a fresh qcow2 top (512-byte clusters, whole clusters written) into the
    /// image, the top as large as the image or 64 KiB larger.
    fn commit(&mut self, up: &mut Updater, p: u64, size: u64, seed: u8) -> Option<()> {
        let top = self.dir.join("t.qcow2");
        let _ = std::fs::remove_file(&top);
        let tsize = size
            .saturating_add(if p & 1 == 1 { GROW } else { 0 })
            .min(MAX_SIZE.max(size))
            / 512
            * 512;
        let name = self.path.file_name()?.to_str()?;
        let mut o = CreateOptions::new();
        o.set("backing_file", name);
        o.set("backing_fmt", self.format.name());
        o.set("cluster_size", "512");
        vimg::create(&top, Format::Qcow2, Some(tsize), &o).ok()?;
        let off = (tsize / 16 * (p / 2) / 512 * 512).min(tsize);
        let len = (tsize - off).min(8192 + p * 1024) / 512 * 512;
        let data = pattern(len as usize, seed ^ 0x77);
        {
            let mut tu = updater::open(&top, Format::Qcow2, policy()).ok()?;
            let mut t = tu.data().ok()?;
            t.write_at(off, &data, None).ok()?;
            t.finish().ok()?;
        }
        let table = table_bytes(up);
        let unit = up.data().map(|t| t.unit()).unwrap_or(512);
        *up = Updater::Raw(vimg::formats::raw::update::RawUpdate::open(&top).ok()?);
        self.bound.write(len, unit, table * 2);
        if tsize > size {
            self.bound.len += tsize - size;
        }
        let opts = CommitOptions {
            base: None,
            drop: p & 2 == 2,
        };
        match inplace::commit(&top, Format::Qcow2, policy(), opts, &|_| {}) {
            Ok(()) => self.model.data(off, data),
            Err(_) => self.model.unknown(off, len),
        }
        self.reopen(up)
    }

    /// Runs the program, then checks the invariants (module documentation).
    pub fn program(&mut self, program: &[u8]) {
        if let Ok(mut up) = updater::open(self.path, self.format, policy()) {
            for (i, &op) in program.iter().enumerate() {
                let done = self.op(&mut up, op, i).is_none();
                if self.trace {
                    eprintln!(
                        "op {op:#04x}: file {} bytes, {} used",
                        file_len(self.path),
                        used(self.path)
                    );
                }
                self.bound
                    .check(self.path, &format!("after op {i} ({op:#04x})"));
                if done {
                    break;
                }
            }
        }
        self.verify();
        if file_len(self.path) <= READ_BACK {
            if let Ok(after) = std::fs::read(self.path) {
                vimg::fuzzing::open_at_and_read_all(&after, Some(self.path), Some(self.format));
            }
        }
    }

    /// Every byte the model knows reads back as written.
    fn verify(&self) {
        if !self.model.known() || !self.opened_before {
            return;
        }
        let opts = OpenOptions::with_format(Some(self.format)).policy(policy());
        let img = match Image::open(self.path, &opts) {
            Ok(i) => i,
            Err(e) => panic!("the image written does not open: {e}"),
        };
        let size = img.virtual_size();
        for (o, l, d) in &self.model.entries {
            if d.is_none() {
                continue;
            }
            let end = (o + l).min(size);
            if *o >= end {
                continue;
            }
            let mut buf = vec![0u8; (end - o) as usize];
            if let Err(e) = img.read_at(&mut buf, *o) {
                panic!("reading back {l} bytes at {o:#x}: {e}");
            }
            for (i, b) in buf.iter().enumerate() {
                let pos = o + i as u64;
                if let Some(want) = self.model.expected(pos) {
                    assert_eq!(
                        *b, want,
                        "guest byte {pos:#x} reads {b:#04x}, written {want:#04x}"
                    );
                }
            }
        }
    }
}

//! The copy engine: walks a source image's mapping and drives any writer. It knows no format.
//!
//! - Zero and unallocated ranges are never read and never written (a new target reads as
//!   zeros already).
//! - Data ranges are grown to the writer's unit, cut into chunks, read by worker threads,
//!   scanned for zero runs of at least `sparse_size` bytes (qemu-img's `-S`), encoded
//!   (compressed) in the workers when the writer encodes, and written.
//! - Memory is bounded: a fixed pool of chunk buffers is the only data memory, and a chunk
//!   waits for a free buffer before it is planned.
//! - Writers that need ascending order get it from one sink thread that puts finished chunks
//!   back in order.
//! - The output's bytes depend only on the input and the options, never on the thread count
//!   or timing: for the other writers, space is allocated in guest order (a turnstile
//!   passes jobs to [`ImageWriter::allocate`] by sequence number, after their parallel read,
//!   scan and encode), and only the data writes themselves run in any order.

mod mapped;
mod salvage;
mod sparse;
pub mod zero;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, ErrorKind, Result};
use crate::image::Image;
use crate::mapping::{Extent, FileId, MapKind};
use crate::writer::{EncodedUnit, ImageWriter};

pub use salvage::WarnFn;
use zero::Run;

/// Which ranges of the source the engine copies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CopyMode {
    /// Flatten the backing chain (`qemu-img convert` without `-B`).
    #[default]
    Flatten,
    /// Copy only what the top image stores; its unallocated ranges stay unallocated in the
    /// target, and its zero ranges are written as zeros so the target's backing file does
    /// not show through (`convert -B`).
    TopOnly,
}

/// Progress of a copy, in bytes of allocated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Data bytes done.
    pub done: u64,
    /// Data bytes in all.
    pub total: u64,
}

/// A progress callback: owned, so options carry no lifetime and can be sent to a thread.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// Settings for [`copy`].
#[derive(Clone)]
#[non_exhaustive]
pub struct CopyOptions {
    /// Zero runs shorter than this are written as data; 0 writes everything, zeros included
    /// (a fully allocated target). Default 4 KiB.
    pub sparse_size: u64,
    /// Worker threads. Default: available cores.
    pub workers: usize,
    /// Bytes per chunk (rounded up to the writer's unit). Default 2 MiB.
    pub chunk_size: u64,
    /// True when the target reads as zeros before the copy (a new image); false for
    /// `convert -n`, where zero ranges must be written explicitly. [`crate::convert()`] sets
    /// it from what it creates and [`crate::ConvertOptions::target_is_zero`].
    pub target_is_zero: bool,
    /// Which ranges to copy.
    pub mode: CopyMode,
    /// Called with `done: 0` before the copy, then as chunks complete, in guest order (one
    /// call at a time, from the thread that passes the chunk to the writer), and with
    /// `done == total` at the end.
    pub progress: Option<ProgressFn>,
    /// Checked between chunks; when set, the copy stops with [`ErrorKind::Cancelled`].
    pub cancel: Option<Arc<AtomicBool>>,
    /// Read uncompressed source data through short-lived memory mappings instead of into
    /// pool buffers (one copy of every data byte less; see `engine/mapped.rs`). Off by
    /// default in the library because it installs a process-wide `SIGBUS` handler (chained
    /// to any handler installed before it) that turns a fault in one of vimg's mappings (a
    /// source truncated by another process during the copy, a failing disk) into an I/O
    /// error. The `vimg` binary turns it on. Without it, or when a mapping cannot be made,
    /// data is read with `pread`.
    pub mapped_reads: bool,
    /// `convert --salvage`: source read errors become zeros and warnings passed here,
    /// in guest order (see `engine/salvage.rs`). `None`: a read error fails the copy.
    pub salvage: Option<WarnFn>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            sparse_size: 4096,
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            chunk_size: 2 << 20,
            target_is_zero: true,
            mode: CopyMode::Flatten,
            progress: None,
            cancel: None,
            mapped_reads: false,
            salvage: None,
        }
    }
}

/// What a copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Guest bytes read from the source (data ranges only).
    pub bytes_read: u64,
    /// Guest bytes handed to the writer as data.
    pub bytes_written: u64,
    /// Guest bytes found to be zero inside data ranges and skipped (or written as zeros).
    pub zero_bytes: u64,
}

/// A piece of work in guest order.
#[derive(Clone, Copy, Debug)]
enum Job {
    /// Read, scan and write `[start, start + len)`. `at`: where the planner's mapping put
    /// the whole range, when it is one data extent of a file.
    Data {
        seq: u64,
        start: u64,
        len: u64,
        at: Option<HostRange>,
    },
    /// Make `[start, start + len)` zero in the target.
    Zeroes { seq: u64, start: u64, len: u64 },
}

impl Job {
    fn seq(&self) -> u64 {
        match *self {
            Job::Data { seq, .. } | Job::Zeroes { seq, .. } => seq,
        }
    }
}

/// Where a data job's bytes are: `len` bytes at `offset` of file `file` of chain layer
/// `layer` (0 = the top image), as the planner mapped them. The prefetch and the mapped read
/// use it instead of asking the source's mapping again (for a raw or qcow2 source on a
/// sparse file, a `SEEK_DATA`/`SEEK_HOLE` pair per question).
#[derive(Clone, Copy, Debug)]
struct HostRange {
    layer: usize,
    file: FileId,
    offset: u64,
}

/// A finished job on its way to the ordered sink.
struct Done {
    job: Job,
    buf: Vec<u8>,
    runs: Vec<Run>,
    encoded: Vec<Vec<EncodedUnit>>,
}

struct Shared<'a> {
    src: &'a Image,
    /// `src`'s chain, top first ([`HostRange::layer`] indexes it).
    layers: Vec<&'a Image>,
    progress: Option<&'a (dyn Fn(Progress) + Send + Sync)>,
    /// Data bytes in all, for progress.
    total: AtomicU64,
    dst: &'a dyn ImageWriter,
    unit: u64,
    sparse: usize,
    zero_writes: bool,
    /// Data jobs may be read through a mapping of the source (unordered writers that do
    /// not encode, flattened copies).
    mapped_reads: bool,
    error: Mutex<Option<Error>>,
    failed: AtomicBool,
    /// The sequence number of the job whose turn it is to allocate (unordered writers).
    turn: Mutex<u64>,
    turn_cv: Condvar,
    done_bytes: AtomicU64,
    stats_read: AtomicU64,
    stats_written: AtomicU64,
    stats_zero: AtomicU64,
    salvage: Option<salvage::Salvage>,
}

impl Shared<'_> {
    fn fail(&self, e: Error) {
        if let Ok(mut slot) = self.error.lock() {
            if slot.is_none() {
                *slot = Some(e);
            }
        }
        self.failed.store(true, Ordering::SeqCst);
        // Wake the workers waiting for their turn so they see the failure.
        let _guard = self.turn.lock();
        self.turn_cv.notify_all();
    }

    /// Waits until job `seq` may allocate; `false` when the copy failed meanwhile.
    fn wait_turn(&self, seq: u64) -> bool {
        let Ok(mut t) = self.turn.lock() else {
            return false;
        };
        while *t != seq {
            if self.failed.load(Ordering::SeqCst) {
                return false;
            }
            t = match self.turn_cv.wait(t) {
                Ok(t) => t,
                Err(_) => return false,
            };
        }
        true
    }

    /// Passes the turn to the next job.
    fn end_turn(&self) {
        if let Ok(mut t) = self.turn.lock() {
            *t += 1;
            self.turn_cv.notify_all();
        }
    }
}

/// Copies `src` (through its chain, per `opts.mode`) into `dst`. Does not call
/// `dst.finish()`.
pub fn copy(src: &Image, dst: &dyn ImageWriter, opts: &CopyOptions) -> Result<CopyStats> {
    let caps = dst.caps();
    if !caps.unit.is_power_of_two() || caps.unit < 512 {
        return Err(Error::invalid_argument(format!(
            "writer unit {} is not a power of two >= 512",
            caps.unit
        )));
    }
    let unit = caps.unit;
    let chunk = opts.chunk_size.max(unit).div_ceil(unit) * unit;
    let mut workers = opts.workers.clamp(1, 64);
    // A source read as a stream serves reads only within a window behind the furthest
    // read; the jobs in flight (one pool buffer each) must fit in it.
    if let Some(window) = src
        .chain()
        .iter()
        .filter_map(|l| l.storage().sequential_window())
        .min()
    {
        let fit = ((window / chunk).saturating_sub(1) / 2).max(1) as usize;
        workers = workers.min(fit);
    }
    let size = src.virtual_size();
    let sparse = if opts.sparse_size == 0 {
        0
    } else {
        // qemu-img rounds -S to sectors; at least one unit is needed to skip anything.
        opts.sparse_size.max(512) as usize
    };
    let shared = Shared {
        src,
        layers: src.chain(),
        progress: opts.progress.as_deref(),
        total: AtomicU64::new(0),
        dst,
        unit,
        sparse,
        zero_writes: !opts.target_is_zero || opts.mode == CopyMode::TopOnly,
        mapped_reads: opts.mapped_reads
            && opts.salvage.is_none()
            && !caps.ordered
            && !caps.encodes
            && opts.mode == CopyMode::Flatten,
        error: Mutex::new(None),
        failed: AtomicBool::new(false),
        turn: Mutex::new(0),
        turn_cv: Condvar::new(),
        done_bytes: AtomicU64::new(0),
        stats_read: AtomicU64::new(0),
        stats_written: AtomicU64::new(0),
        stats_zero: AtomicU64::new(0),
        salvage: opts.salvage.clone().map(salvage::Salvage::new),
    };
    // Salvaging, qemu-img walks the source's status once before the copy, whatever the
    // progress display: its status warnings come out then, too.
    let total = if opts.progress.is_some() || shared.salvage.is_some() {
        let mut planner = Planner::new(&shared, opts, size, chunk);
        let mut total = 0;
        planner.run(|job| {
            if let Job::Data { len, .. } = job {
                total += len;
            }
            Ok(())
        })?;
        total
    } else {
        0
    };
    shared.total.store(total, Ordering::Relaxed);
    if let Some(s) = &shared.salvage {
        s.collect();
    }
    if let Some(p) = &opts.progress {
        p(Progress { done: 0, total });
    }

    // The buffer pool: its size bounds memory. For ordered writers it also bounds the jobs
    // in flight (the planner hands each job its buffer, in sequence order, so the sink can
    // always be fed). Unordered writers take a buffer only while a worker reads into it
    // (jobs served from a mapping of the source need none), and the jobs in flight are
    // counted by tickets instead, several per worker: the planner then runs far enough
    // ahead that a worker does not wait for it when it is slow to be scheduled on a busy
    // machine (with one job queued per buffer, the two workers of a raw->vdi copy slept
    // 75% of the run, waiting for a planner that waited for a CPU), and the source reads
    // it starts (`mapped::prefetch`) run that much ahead of the copy.
    let pool_size = workers * 2 + 1;
    let tickets = if caps.ordered {
        pool_size
    } else {
        (workers * TICKETS_PER_WORKER).max(pool_size)
    };
    let (free_tx, free_rx) = mpsc::sync_channel::<Vec<u8>>(pool_size);
    for _ in 0..pool_size {
        let _ = free_tx.send(Vec::new());
    }
    let (ticket_tx, ticket_rx) = mpsc::sync_channel::<()>(tickets);
    if !caps.ordered {
        for _ in 0..tickets {
            let _ = ticket_tx.send(());
        }
    }
    let pool = Pool {
        free_tx,
        free_rx: Mutex::new(free_rx),
        ticket_tx,
    };
    let (job_tx, job_rx) = mpsc::sync_channel::<(Job, Vec<u8>)>(tickets);
    let job_rx = Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::sync_channel::<Done>(pool_size);

    let plan_result = std::thread::scope(|scope| {
        for _ in 0..workers {
            let shared = &shared;
            let job_rx = &job_rx;
            let pool = &pool;
            let done_tx = caps.ordered.then(|| done_tx.clone());
            scope.spawn(move || worker(shared, job_rx, pool, done_tx));
        }
        drop(done_tx);
        if caps.ordered {
            let shared = &shared;
            let free_tx = pool.free_tx.clone();
            scope.spawn(move || sink(shared, done_rx, free_tx));
        } else {
            drop(done_rx);
        }

        let mut planner = Planner::new(&shared, opts, size, chunk);
        let stopped = || Error::msg(ErrorKind::Io, "copy workers stopped");
        let result = planner.run(|job| {
            if shared.mapped_reads {
                // Before waiting for a ticket or buffer: the read of this job's source
                // range is under way while the jobs ahead of it are processed.
                if let Job::Data {
                    len, at: Some(at), ..
                } = job
                {
                    mapped::prefetch(&shared, at, len);
                }
            }
            let buf = if caps.ordered {
                pool.take().ok_or_else(stopped)?
            } else {
                ticket_rx.recv().map_err(|_| stopped())?;
                Vec::new()
            };
            if shared.failed.load(Ordering::SeqCst) {
                return Err(Error::msg(ErrorKind::Io, "copy failed"));
            }
            job_tx.send((job, buf)).map_err(|_| stopped())
        });
        drop(job_tx);
        result
    });

    if let Some(s) = &shared.salvage {
        s.flush();
    }
    if let Some(e) = shared.error.lock().ok().and_then(|mut s| s.take()) {
        return Err(e);
    }
    plan_result?;
    if let Some(p) = &opts.progress {
        p(Progress { done: total, total });
    }
    Ok(CopyStats {
        bytes_read: shared.stats_read.load(Ordering::Relaxed),
        bytes_written: shared.stats_written.load(Ordering::Relaxed),
        zero_bytes: shared.stats_zero.load(Ordering::Relaxed),
    })
}

/// Walks the source mapping and turns it into jobs.
struct Planner<'s, 'a> {
    shared: &'s Shared<'a>,
    mode: CopyMode,
    write_everything: bool,
    size: u64,
    chunk: u64,
    unit: u64,
    cancel: Option<&'s AtomicBool>,
    seq: u64,
    /// The last two data extents mapped, newest first, with their chain layers: a job
    /// inside one of them gets its [`HostRange`] (the pending region can end with the tail
    /// of the one before the newest).
    last_data: [Option<(Extent, usize)>; 2],
}

impl<'s, 'a> Planner<'s, 'a> {
    fn new(shared: &'s Shared<'a>, opts: &'s CopyOptions, size: u64, chunk: u64) -> Self {
        Planner {
            shared,
            mode: opts.mode,
            write_everything: opts.sparse_size == 0,
            size,
            chunk,
            unit: shared.unit,
            cancel: opts.cancel.as_deref(),
            seq: 0,
            last_data: [None, None],
        }
    }

    /// The extent at `pos` and the chain layer it was found in.
    fn map(&self, pos: u64) -> Result<(Extent, usize)> {
        self.map_len(pos, self.size - pos)
    }

    /// The extent at `pos`, at most `max` bytes long, and its chain layer.
    fn map_len(&self, pos: u64, max: u64) -> Result<(Extent, usize)> {
        let src = self.shared.src;
        match self.mode {
            CopyMode::Flatten => src.map_flat(pos, max).map(|(e, _, depth)| (e, depth)),
            CopyMode::TopOnly => Ok((crate::image::checked_map(src, pos, max)?, 0)),
        }
    }

    /// Where `[start, start + len)` is, when it lies inside the last data extent mapped.
    fn host_range(&self, start: u64, len: u64) -> Option<HostRange> {
        let end = start.checked_add(len)?;
        let (e, layer) = self
            .last_data
            .iter()
            .flatten()
            .find(|(e, _)| e.start.get() <= start && end <= e.end())?;
        let MapKind::Data { file, offset } = e.kind else {
            return None;
        };
        Some(HostRange {
            layer: *layer,
            file,
            offset: offset.get().checked_add(start - e.start.get())?,
        })
    }

    fn run(&mut self, mut emit: impl FnMut(Job) -> Result<()>) -> Result<()> {
        self.seq = 0;
        let unit = self.unit;
        let size = self.size;
        // The data region being assembled, already grown to unit boundaries.
        let mut pending: Option<(u64, u64)> = None;
        let mut pos = 0u64;
        while pos < size {
            if let Some(c) = self.cancel {
                if c.load(Ordering::Relaxed) {
                    return Err(Error::msg(ErrorKind::Cancelled, "interrupted"));
                }
            }
            if self.shared.failed.load(Ordering::Relaxed) {
                return Err(Error::msg(ErrorKind::Io, "copy failed"));
            }
            // `unknown`: salvaging, a sector whose status could not be read; read as data.
            let (e, layer, unknown) = match &self.shared.salvage {
                None => {
                    let (e, layer) = self.map(pos)?;
                    (e, layer, false)
                }
                Some(s) => salvage::map(|p, l| self.map_len(p, l), pos, self.size - pos, s)?,
            };
            pos = e.end();
            let wanted = unknown || self.write_everything || e.kind.has_data();
            if wanted {
                let s = e.start.get() / unit * unit;
                let t = e.end().div_ceil(unit).saturating_mul(unit).min(size);
                pending = match pending {
                    Some((ps, pe)) if s <= pe => Some((ps, pe.max(t))),
                    Some(p) => {
                        self.flush_data(p, &mut emit)?;
                        Some((s, t))
                    }
                    None => Some((s, t)),
                };
                if !unknown {
                    self.last_data = [Some((e, layer)), self.last_data[0]];
                }
                // Emit whole chunks eagerly so the pending region stays small.
                while let Some((ps, pe)) = pending {
                    if pe - ps > self.chunk {
                        self.emit_data(ps, self.chunk, &mut emit)?;
                        pending = Some((ps + self.chunk, pe));
                    } else {
                        break;
                    }
                }
                continue;
            }
            // A zero or unallocated run: the part not swallowed by the pending region.
            let mut zs = e.start.get();
            if let Some((ps, pe)) = pending {
                if zs < pe {
                    zs = pe.min(e.end());
                }
                if e.end() > pe {
                    self.flush_data((ps, pe), &mut emit)?;
                    pending = None;
                }
            }
            let needs_zeroes = match e.kind {
                MapKind::Zero => self.shared.zero_writes,
                // Unallocated stays unallocated in top-only mode (the target's backing file
                // provides it), and reads as zero otherwise.
                _ => self.shared.zero_writes && self.mode == CopyMode::Flatten,
            };
            if needs_zeroes && zs < e.end() {
                let seq = self.next_seq();
                emit(Job::Zeroes {
                    seq,
                    start: zs,
                    len: e.end() - zs,
                })?;
            }
        }
        if let Some(p) = pending {
            self.flush_data(p, &mut emit)?;
        }
        Ok(())
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq - 1
    }

    fn emit_data(
        &mut self,
        start: u64,
        len: u64,
        emit: &mut impl FnMut(Job) -> Result<()>,
    ) -> Result<()> {
        let seq = self.next_seq();
        let at = self.host_range(start, len);
        emit(Job::Data {
            seq,
            start,
            len,
            at,
        })
    }

    fn flush_data(
        &mut self,
        (s, e): (u64, u64),
        emit: &mut impl FnMut(Job) -> Result<()>,
    ) -> Result<()> {
        let mut p = s;
        while p < e {
            let n = (e - p).min(self.chunk);
            self.emit_data(p, n, emit)?;
            p += n;
        }
        Ok(())
    }
}

/// Jobs in flight per worker for unordered writers (see [`copy`]).
const TICKETS_PER_WORKER: usize = 8;

/// The buffers of a copy, and the tickets of unordered writers' jobs.
struct Pool {
    free_tx: SyncSender<Vec<u8>>,
    free_rx: Mutex<Receiver<Vec<u8>>>,
    /// Given back when an unordered writer's job is done.
    ticket_tx: SyncSender<()>,
}

impl Pool {
    /// A free buffer (waits for one); `None` when the copy is being torn down.
    fn take(&self) -> Option<Vec<u8>> {
        self.free_rx.lock().ok()?.recv().ok()
    }

    fn put(&self, buf: Vec<u8>) {
        let _ = self.free_tx.send(buf);
    }
}

fn worker(
    shared: &Shared<'_>,
    jobs: &Mutex<Receiver<(Job, Vec<u8>)>>,
    pool: &Pool,
    ordered: Option<SyncSender<Done>>,
) {
    let mut runs = Vec::new();
    loop {
        let next = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((job, buf)) = next else { return };
        match &ordered {
            Some(tx) => ordered_job(shared, job, buf, pool, tx, &mut runs),
            None => {
                unordered_job(shared, job, pool, &mut runs);
                let _ = pool.ticket_tx.send(());
            }
        }
    }
}

/// Reads, scans and encodes a job of an ordered writer into `buf` (its own, handed out by
/// the planner) and passes it on to the sink.
fn ordered_job(
    shared: &Shared<'_>,
    job: Job,
    mut buf: Vec<u8>,
    pool: &Pool,
    tx: &SyncSender<Done>,
    runs: &mut Vec<Run>,
) {
    if shared.failed.load(Ordering::Relaxed) {
        pool.put(buf);
        return;
    }
    let mut encoded = Vec::new();
    if let Err(e) = process(shared, job, &mut buf, runs, &mut encoded) {
        shared.fail(e);
        pool.put(buf);
        return;
    }
    let done = Done {
        job,
        buf,
        runs: std::mem::take(runs),
        encoded,
    };
    if let Err(mpsc::SendError(d)) = tx.send(done) {
        pool.put(d.buf);
    }
}

/// Does a job of an unordered writer: from a mapping of the source where it can, else
/// read into a buffer taken from the pool for the job's duration (a worker holds at most
/// one, and the pool has more buffers than there are workers, so this never waits for a
/// buffer held by a job that waits for this one).
fn unordered_job(shared: &Shared<'_>, job: Job, pool: &Pool, runs: &mut Vec<Run>) {
    if shared.failed.load(Ordering::Relaxed) {
        return;
    }
    if let Some(r) = try_mapped(shared, job, runs) {
        if let Err(e) = r {
            shared.fail(e);
        }
        return;
    }
    let mut buf = match job {
        Job::Data { .. } => match pool.take() {
            Some(b) => b,
            None => {
                shared.fail(Error::msg(ErrorKind::Io, "copy buffers gone"));
                return;
            }
        },
        Job::Zeroes { .. } => Vec::new(),
    };
    let mut encoded = Vec::new();
    let r = process(shared, job, &mut buf, runs, &mut encoded)
        .and_then(|()| write_out(shared, job, &buf, runs, &encoded, true));
    if let Err(e) = r {
        shared.fail(e);
    }
    if matches!(job, Job::Data { .. }) {
        pool.put(buf);
    }
}

/// Processes a data job straight out of the source's page cache, when the job's range is one
/// data extent of a file (see [`mapped`]): the zero scan and the writes read the mapping, so
/// the data is copied once instead of twice. `None` when the job does not qualify; it is then
/// read into a pool buffer.
fn try_mapped(shared: &Shared<'_>, job: Job, runs: &mut Vec<Run>) -> Option<Result<()>> {
    let Job::Data {
        start,
        len,
        at: Some(at),
        ..
    } = job
    else {
        return None;
    };
    if !shared.mapped_reads {
        return None;
    }
    let layer = *shared.layers.get(at.layer)?;
    let storage = layer.reader().file(at.file)?;
    let offset = crate::mapping::HostOffset(at.offset);
    let end = offset.get().checked_add(len)?;
    if end > storage.len() {
        // Data past the end of the file reads as zeros through `read_at`; leave it to that.
        return None;
    }
    let m = mapped::Mapped::new(storage.raw_fd()?, offset.get(), usize::try_from(len).ok()?)?;
    let failed = || {
        Error::msg(
            ErrorKind::Io,
            format!(
                "source file '{}' could not be read at {:#x} (it shrank or failed while being copied)",
                storage.path().map(|p| p.display().to_string()).unwrap_or_default(),
                offset.get()
            ),
        )
        .with_path(layer.filename())
    };
    shared.stats_read.fetch_add(len, Ordering::Relaxed);
    split_runs(shared, start, m.data(), runs);
    if m.failed() {
        return Some(Err(failed()));
    }
    let r = write_out(shared, job, m.data(), runs, &[], true);
    if m.failed() {
        return Some(Err(failed()));
    }
    Some(r)
}

/// Splits a data job's bytes (`buf`, at image offset `start`) into the runs to write and the
/// zero runs to skip, as qemu-img's `-S` does (see [`sparse`] for units smaller than `-S`).
fn split_runs(shared: &Shared<'_>, start: u64, buf: &[u8], runs: &mut Vec<Run>) {
    let unit = shared.unit as usize;
    if shared.sparse > 0 && shared.dst.caps().encodes {
        // Compressed units are written whole: qemu-img ignores -S (other than 0) for them
        // and skips exactly the units that are all zero.
        zero::split_runs(buf, unit, 1, runs);
    } else if shared.sparse > unit && start.is_multiple_of(512) {
        sparse::split_runs_qemu(buf, start, unit, shared.sparse, runs);
    } else {
        zero::split_runs(buf, unit, shared.sparse, runs);
    }
}

/// Reads and scans a data job (and encodes it for writers that encode).
fn process(
    shared: &Shared<'_>,
    job: Job,
    buf: &mut Vec<u8>,
    runs: &mut Vec<Run>,
    encoded: &mut Vec<Vec<EncodedUnit>>,
) -> Result<()> {
    let Job::Data { start, len, .. } = job else {
        runs.clear();
        return Ok(());
    };
    let len = len as usize;
    if buf.len() < len {
        // One allocation per pool buffer, reused for the whole copy. It never shrinks, so
        // the zero fill happens once, not whenever a short job came before a long one.
        buf.reserve_exact(len - buf.len());
        buf.resize(len, 0);
    }
    match &shared.salvage {
        None => shared.src.read_at(&mut buf[..len], start)?,
        Some(s) => salvage::read(shared.src, &mut buf[..len], start, s)?,
    }
    shared.stats_read.fetch_add(len as u64, Ordering::Relaxed);
    split_runs(shared, start, &buf[..len], runs);
    if shared.dst.caps().encodes {
        encoded.clear();
        for r in runs.iter().filter(|r| !r.zero) {
            encoded.push(
                shared
                    .dst
                    .encode(start + r.start as u64, &buf[r.start..r.end])?,
            );
        }
    }
    Ok(())
}

/// Hands one processed job to the writer. With `in_turn` (unordered writers, called from
/// the workers), everything whose effect depends on order (allocation, zero writes, and the
/// data writes of a writer that cannot allocate ahead) happens in sequence order; the data
/// the writer allocated ahead is written after the turn passes on, in parallel with other
/// jobs.
fn write_out(
    shared: &Shared<'_>,
    job: Job,
    buf: &[u8],
    runs: &[Run],
    encoded: &[Vec<EncodedUnit>],
    in_turn: bool,
) -> Result<()> {
    if !in_turn {
        return write_ordered(shared, job, buf, runs, encoded, false).map(|_| ());
    }
    if !shared.wait_turn(job.seq()) {
        return Err(Error::msg(ErrorKind::Io, "copy failed"));
    }
    let r = write_ordered(shared, job, buf, runs, encoded, true);
    shared.end_turn();
    if let (Some(from), Job::Data { start, .. }) = (r?, job) {
        for d in runs.iter().filter(|d| !d.zero && d.start >= from) {
            shared
                .dst
                .write(start + d.start as u64, &buf[d.start..d.end], &[])?;
        }
    }
    Ok(())
}

/// The ordered part of [`write_out`]. With `allocate_ahead`, data runs the writer
/// allocated ahead are not written here; the result is the job-relative byte from which on
/// the data runs are still to be written (always one tail of the job).
fn write_ordered(
    shared: &Shared<'_>,
    job: Job,
    buf: &[u8],
    runs: &[Run],
    encoded: &[Vec<EncodedUnit>],
    allocate_ahead: bool,
) -> Result<Option<usize>> {
    match job {
        Job::Zeroes { start, len, .. } => {
            shared.dst.write_zeroes(start, len)?;
            Ok(None)
        }
        Job::Data { start, len, .. } => {
            let mut enc = encoded.iter();
            let mut deferred_from: Option<usize> = None;
            for r in runs {
                let off = start + r.start as u64;
                let n = (r.end - r.start) as u64;
                if r.zero {
                    shared.stats_zero.fetch_add(n, Ordering::Relaxed);
                    if shared.zero_writes {
                        shared.dst.write_zeroes(off, n)?;
                    }
                    continue;
                }
                shared.stats_written.fetch_add(n, Ordering::Relaxed);
                let e = enc.next().map(Vec::as_slice).unwrap_or(&[]);
                if allocate_ahead && e.is_empty() && shared.dst.allocate(off, n)? {
                    deferred_from.get_or_insert(r.start);
                    continue;
                }
                if let Some(from) = deferred_from.take() {
                    // This run must be written now: write the deferred ones before it too,
                    // so what is left stays one tail of the job.
                    for d in runs
                        .iter()
                        .filter(|d| !d.zero && d.start >= from && d.start < r.start)
                    {
                        shared
                            .dst
                            .write(start + d.start as u64, &buf[d.start..d.end], &[])?;
                    }
                }
                shared.dst.write(off, &buf[r.start..r.end], e)?;
            }
            let done = shared.done_bytes.fetch_add(len, Ordering::Relaxed) + len;
            if let Some(p) = shared.progress {
                p(Progress {
                    done,
                    total: shared.total.load(Ordering::Relaxed),
                });
            }
            Ok(deferred_from)
        }
    }
}

/// The ordered sink: writes finished jobs in sequence order.
fn sink(shared: &Shared<'_>, done: Receiver<Done>, free: SyncSender<Vec<u8>>) {
    let mut waiting: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    for d in done {
        waiting.insert(d.job.seq(), d);
        while let Some(d) = waiting.remove(&next) {
            if !shared.failed.load(Ordering::Relaxed) {
                if let Err(e) = write_out(shared, d.job, &d.buf, &d.runs, &d.encoded, false) {
                    shared.fail(e);
                }
            }
            let _ = free.send(d.buf);
            next += 1;
        }
    }
    // Jobs that never completed (a worker failed) free their buffers here.
    for (_, d) in waiting {
        let _ = free.send(d.buf);
    }
}

/// The flattened data of an image, for `measure`: counts units that hold data by walking
/// the mapping (no data is read).
pub struct ImageData<'a> {
    image: &'a Image,
}

impl<'a> ImageData<'a> {
    /// Describes `image` (through its backing chain).
    pub fn new(image: &'a Image) -> Self {
        ImageData { image }
    }
}

impl crate::formats::DataSummary for ImageData<'_> {
    fn data_units(&self, unit: u64) -> Result<u64> {
        let unit = unit.max(1);
        let size = self.image.virtual_size();
        let mut count = 0u64;
        // The last unit already counted (units are counted once even when several extents
        // with data fall into them).
        let mut last: Option<u64> = None;
        let mut pos = 0;
        while pos < size {
            let (e, _, _) = self.image.map_flat(pos, size - pos)?;
            if e.kind.has_data() {
                let first = e.start.get() / unit;
                let end = (e.end() - 1) / unit;
                let first = match last {
                    Some(l) if l >= first => l + 1,
                    _ => first,
                };
                if end >= first {
                    count += end - first + 1;
                }
                last = Some(end.max(last.unwrap_or(0)));
            }
            pos = e.end();
        }
        Ok(count)
    }

    fn virtual_size(&self) -> u64 {
        self.image.virtual_size()
    }

    fn persistent_bitmaps(&self) -> Option<Vec<(String, u64)>> {
        self.image.reader().persistent_bitmaps()
    }
}

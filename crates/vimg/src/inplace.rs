//! In-place operations over whole images that know no format: `rebase` in safe mode and
//! `commit`. They read through the read layer ([`Image`]) and write through the registry's
//! updaters ([`crate::formats::updater::open`]).
//!
//! Crash safety: both write guest data first and change a header last.
//! - `rebase`: every cluster copied into the image holds what the old backing chain gave
//!   it, so until the header names the new backing file (one sector, the last write) the
//!   guest sees exactly what it saw before; after it, what the new chain plus the copies
//!   give, which is the same.
//! - `commit`: the backing image first receives the data (each cluster old or new), then
//!   the top image's clusters are unmapped one L2 table at a time; a top cluster still
//!   mapped holds what the base now holds.

use std::path::Path;

use crate::engine::Progress;
use crate::error::{Error, ErrorKind, Result};
use crate::formats::updater;
use crate::formats::updater::UpdateOp;
use crate::formats::Format;
use crate::gate::ExternalPolicy;
use crate::image::{Image, OpenOptions};
use crate::mapping::{GuestOffset, MapKind};

/// Bytes compared or copied per step.
const STEP: u64 = 4 << 20;

/// qemu-img's I/O buffer (`IO_BUF_SIZE`): the chunk a safe rebase compares at a time.
const QEMU_CHUNK: u64 = 2 << 20;

/// Reads `buf.len()` guest bytes of `img` (zeros without an image or past its end).
fn read_or_zero(img: Option<&Image>, buf: &mut [u8], off: u64) -> Result<()> {
    buf.fill(0);
    let Some(img) = img else { return Ok(()) };
    let n = img.virtual_size().saturating_sub(off).min(buf.len() as u64) as usize;
    if n > 0 {
        img.read_at(&mut buf[..n], off)?;
    }
    Ok(())
}

/// The new backing file of a safe-mode rebase: the name stored in the header, its format
/// name, and the image opened by the caller (the user named it: trusted).
pub struct NewBacking<'a> {
    /// The name as the user gave it (stored as given).
    pub name: &'a str,
    /// Its format (stored in the header).
    pub format: Format,
    /// The opened image with its chain.
    pub image: &'a Image,
}

/// `rebase` without `-u`: copies into the image at `path` every cluster it does not hold
/// itself whose content differs between its old backing chain and `new` (`None`: no
/// backing file, which copies everything the old chain supplies), then points the header
/// at `new`. Returns the number of clusters copied.
pub fn rebase(
    path: &Path,
    format: Format,
    policy: ExternalPolicy,
    new: Option<NewBacking<'_>>,
    progress: &dyn Fn(Progress),
) -> Result<u64> {
    rebase_with(path, format, policy, new, false, progress)
}

/// [`rebase`], with `compress` (`rebase -c`): the clusters copied as data are written
/// compressed (qcow2 only; whole clusters, the last one of an unaligned disk zero-padded,
/// each stored uncompressed when compression does not shrink it), as qemu-img writes them
/// with `BDRV_REQ_WRITE_COMPRESSED`. Zero writes stay zero clusters. Images with internal
/// snapshots are refused before anything is written.
///
/// qcow2 images with extended L2 entries are compared and written per subcluster (per
/// cluster with `compress`), as qemu-img aligns its writes (qcow2/update/extl2_write.rs).
pub fn rebase_with(
    path: &Path,
    format: Format,
    policy: ExternalPolicy,
    new: Option<NewBacking<'_>>,
    compress: bool,
    progress: &dyn Fn(Progress),
) -> Result<u64> {
    updater::require(format, UpdateOp::Backing)?;
    if compress && format != Format::Qcow2 {
        return Err(Error::unsupported(format!(
            "vimg writes compressed clusters in place only into qcow2 images, not {}",
            format.name()
        )));
    }
    let img = Image::open(path, &OpenOptions::with_format(Some(format)).policy(policy))?;
    let size = img.virtual_size();
    // The clusters the image does not hold, found before anything changes.
    let mut holes: Vec<(u64, u64)> = Vec::new();
    let mut off = 0;
    while off < size {
        let e = img.reader().map(GuestOffset(off), size - off)?;
        if e.len == 0 || e.start.0 != off {
            return Err(Error::corrupt("the mapping returned an invalid extent"));
        }
        if e.kind == MapKind::Unallocated {
            match holes.last_mut() {
                Some(h) if h.1 == off => h.1 = e.end(),
                _ => holes.push((off, e.end())),
            }
        }
        off = e.end();
    }
    let old = img.backing();
    let new_img = new.as_ref().map(|n| n.image);
    let old_end = old.map_or(0, |i| i.virtual_size());
    // Zero clusters read as zeros whatever the backing file (qcow2 version 3); elsewhere a
    // zero write could leave clusters unallocated, which would read the new backing file.
    let zero_flag = format == Format::Qcow2 && qcow2_version(&img)? >= 3;
    let mut up = updater::open(path, format, policy)?;
    if compress && up.qcow2().is_some_and(|q| q.header().nb_snapshots > 0) {
        return Err(Error::unsupported(
            "vimg does not compress the clusters rebase copies into an image with internal snapshots",
        ));
    }
    let mut copied = 0u64;
    {
        let mut w = up.rebase_data()?;
        // qemu-img writes aligned to the subcluster size, or with -c to the cluster size.
        let cs = match &w {
            updater::DataTarget::Qcow2(d) if compress => d.cluster_size(),
            _ => w.unit(),
        };
        if compress {
            if let updater::DataTarget::Qcow2(d) = &w {
                refuse_partial_compress(d, &holes, cs, size)?;
            }
        }
        let step = STEP.max(cs) / cs * cs;
        progress(Progress {
            done: 0,
            total: size,
        });
        let mut a = vec![0u8; step as usize];
        let mut b = vec![0u8; step as usize];
        // Past the end of both backing files both sides read as zeros: nothing there can
        // differ, so the scan stops at the longer one (work bounded by the files, not by
        // the virtual size the header claims).
        let backing_end = old
            .map_or(0, |i| i.virtual_size())
            .max(new_img.map_or(0, |i| i.virtual_size()))
            .div_ceil(cs)
            .saturating_mul(cs);
        let mut done = 0;
        for &(start, end) in &holes {
            let end = end.min(backing_end);
            // The map of a cluster-granular format gives cluster-aligned holes; the last one
            // may end at an unaligned virtual size.
            let mut pos = start / cs * cs;
            while pos < end {
                let n = (end - pos).min(step);
                let whole = n.div_ceil(cs) * cs;
                let (a, b) = (&mut a[..whole as usize], &mut b[..whole as usize]);
                let valid = n as usize;
                read_or_zero(old, &mut a[..valid], pos)?;
                a[valid..].fill(0);
                read_or_zero(new_img, &mut b[..valid], pos)?;
                b[valid..].fill(0);
                let csz = cs as usize;
                // qemu-img compares in chunks of at most 2 MiB from the start of each hole;
                // in a chunk, once the old backing file has ended (a chunk starting past it,
                // or a run reaching it), what differs is written as a zero write, which
                // qcow2 v3 keeps as zero clusters (iotest 252); before that, as data.
                let mut i = 0usize;
                let mut eof = false;
                while i < whole as usize {
                    if i.is_multiple_of(QEMU_CHUNK as usize) {
                        eof = pos + i as u64 >= old_end;
                    }
                    let chunk_end = (i / QEMU_CHUNK as usize + 1) * QEMU_CHUNK as usize;
                    let chunk_end = chunk_end.min(whole as usize);
                    if a[i..i + csz] == b[i..i + csz] {
                        i += csz;
                        eof |= pos + i as u64 >= old_end;
                        continue;
                    }
                    let mut j = i + csz;
                    while j < chunk_end && a[j..j + csz] != b[j..j + csz] {
                        j += csz;
                    }
                    let at = pos + i as u64;
                    let len = ((j - i) as u64).min(size - at) as usize;
                    if eof && zero_flag {
                        w.write_zeroes(at, len as u64, old)?;
                    } else if compress {
                        // Whole clusters (the tail past the virtual size is zeros).
                        let updater::DataTarget::Qcow2(d) = &mut w else {
                            return Err(Error::unsupported("compressed writes need qcow2"));
                        };
                        d.write_compressed(at / cs, &a[i..j])?;
                    } else {
                        w.write_at(at, &a[i..i + len], old)?;
                    }
                    eof |= pos + j as u64 >= old_end;
                    copied += ((j - i) / csz) as u64;
                    i = j;
                }
                pos += n;
                done = pos;
                progress(Progress { done, total: size });
            }
        }
        w.finish()?;
        if done < size {
            progress(Progress {
                done: size,
                total: size,
            });
        }
    }
    let name_fmt = new.as_ref().map(|n| (n.name, n.format.name()));
    up.set_backing(name_fmt)?;
    Ok(copied)
}

/// `rebase -c` of a qcow2 image with extended L2 entries writes whole clusters: every
/// cluster a hole touches must be wholly unallocated (no host cluster, no subcluster
/// allocated or zero), or qemu-img fails (an assertion, or an I/O error for a host
/// cluster). Refused before anything is written.
fn refuse_partial_compress(
    d: &crate::formats::qcow2::DataWriter<'_>,
    holes: &[(u64, u64)],
    cs: u64,
    size: u64,
) -> Result<()> {
    if !d.extended() {
        return Ok(());
    }
    for &(start, end) in holes {
        let whole = start.is_multiple_of(cs) && (end.is_multiple_of(cs) || end == size);
        let mut c = start / cs;
        while whole && c * cs < end {
            if !d.ext_cluster_empty(c)? {
                break;
            }
            c += 1;
        }
        if !whole || c * cs < end {
            return Err(Error::unsupported(format!(
                "vimg does not compress the clusters rebase copies into an image with extended L2 entries where a cluster is partly allocated (guest offset {:#x})",
                start.max(c * cs)
            )));
        }
    }
    Ok(())
}

/// The version field of a qcow2 image's header.
fn qcow2_version(img: &Image) -> Result<u32> {
    let mut v = [0u8; 4];
    img.storage()
        .read_exact_at(&mut v, 4)
        .map_err(|e| Error::io("read the qcow2 header version", e))?;
    Ok(u32::from_be_bytes(v))
}

/// What `commit` was asked.
#[derive(Clone, Copy, Debug)]
pub struct CommitOptions<'a> {
    /// `-b`: the backing image to commit into (a name in the chain); the direct backing
    /// file when `None`. Implies `drop`.
    pub base: Option<&'a str>,
    /// `-d`: leave the top image as it is.
    pub drop: bool,
}

/// `commit`: writes what the top image (and the images between it and the base) hold into
/// the base image, growing the base when it is smaller; then, unless `drop` (or a base was
/// named), unmaps every cluster of the top image.
pub fn commit(
    path: &Path,
    format: Format,
    policy: ExternalPolicy,
    opts: CommitOptions<'_>,
    progress: &dyn Fn(Progress),
) -> Result<()> {
    let top = Image::open(path, &OpenOptions::with_format(Some(format)).policy(policy))?;
    let chain = top.chain();
    if chain.len() < 2 {
        return Err(Error::refusal(
            ErrorKind::InvalidArgument,
            "Image does not have a backing file",
        ));
    }
    let depth = match opts.base {
        None => 1,
        Some(b) => {
            // As qemu-img finds it (bdrv_find_backing_image): a relative name is taken
            // relative to the folder of the image whose backing file is examined, not to
            // the working folder; an absolute one as it is; both compared after resolving
            // links. Other names (`json:`) are compared as spelled.
            let canon = |p: &Path| std::fs::canonicalize(p).ok();
            let plain_name = !crate::source::cmdline::is_special(b);
            chain
                .iter()
                .enumerate()
                .skip(1)
                .find(|(i, l)| {
                    if !plain_name {
                        return l.filename() == b;
                    }
                    let want = if Path::new(b).is_absolute() {
                        Some(Path::new(b).to_path_buf())
                    } else {
                        chain[i - 1]
                            .path()
                            .map(|p| p.parent().unwrap_or(Path::new("")).join(b))
                    };
                    let want = want.as_deref().and_then(canon);
                    want.is_some() && l.path().and_then(canon) == want
                })
                .map(|(i, _)| i)
                .ok_or_else(|| {
                    Error::refusal(
                        ErrorKind::InvalidArgument,
                        format!(
                            "Did not find '{b}' in the backing chain of '{}'",
                            path.display()
                        ),
                    )
                })?
        }
    };
    let empty_top = !opts.drop && opts.base.is_none();
    let base = chain[depth];
    let base_path = base
        .path()
        .ok_or_else(|| Error::unsupported("the backing image has no path"))?;
    // Refuse before writing anything what cannot be done.
    updater::require(base.format(), UpdateOp::Data)?;
    let mut top_up = if empty_top {
        let mut u = updater::open(path, format, policy)?;
        // Checks now that the top can be emptied later.
        u.data()?;
        Some(u)
    } else {
        None
    };
    let size = top.virtual_size();
    // What to copy, found before anything changes (the readers' caches of the base would
    // not see the writes): runs held above the base, and whether they read as zeros.
    let base_size = base.virtual_size();
    if base_size < size && base.backing().is_some_and(|b| b.virtual_size() > base_size) {
        // Growing the base would let its own backing file show through the new area.
        return Err(Error::refusal(
            ErrorKind::Unsupported,
            format!(
                "the base image '{}' is smaller than '{}' and its own backing file is longer; vimg does not grow it over that backing file",
                base.filename(),
                path.display()
            ),
        ));
    }
    // One extent per step, as long as the layers' maps allow (an unallocated range with no
    // L2 table is one extent): the walk is bounded by the tables the files hold, not by
    // the virtual size the top's header claims.
    let mut copies: Vec<(u64, u64, bool)> = Vec::new();
    let mut off = 0;
    while off < size {
        let (e, _, d) = top.map_flat(off, size - off)?;
        // Unallocated above the base: a layer's backing file is shorter, so the top reads
        // zeros there; the base must too where it has content of its own.
        let cut_short = e.kind == MapKind::Unallocated && off < base_size;
        if d < depth && (e.kind != MapKind::Unallocated || cut_short) {
            let e = if cut_short {
                e.truncate(base_size - off)
            } else {
                e
            };
            let zero = matches!(e.kind, MapKind::Zero | MapKind::Unallocated);
            match copies.last_mut() {
                Some(c) if c.0 + c.1 == off && c.2 == zero => c.1 += e.len,
                _ => copies.push((off, e.len, zero)),
            }
        }
        off = e.end();
    }
    // The base was found through the gate (a name the image gives); it is reopened for
    // writing by the path the gate resolved, and must still be the file the gate opened.
    let mut bu = updater::open(base_path, base.format(), policy)?;
    if base.storage().identity() != Some(bu.identity()?) {
        return Err(Error::refusal(
            ErrorKind::UnsafeReference,
            format!(
                "the backing file '{}' changed while it was being opened; nothing was written",
                base.filename()
            ),
        ));
    }
    if bu.virtual_size()? < size {
        bu.resize(size, crate::formats::qcow2::Prealloc::Off)?;
    }
    let below = base.backing();
    let total: u64 = copies.iter().map(|c| c.1).sum();
    progress(Progress { done: 0, total });
    {
        let mut w = bu.data()?;
        let mut buf = Vec::new();
        let mut done = 0;
        for (start, len, zero) in copies {
            if zero {
                w.write_zeroes(start, len, below)?;
                done += len;
                progress(Progress { done, total });
                continue;
            }
            // Data goes through a buffer of at most STEP bytes.
            let end = start + len;
            let mut off = start;
            while off < end {
                let n = (end - off).min(STEP);
                buf.resize(n as usize, 0);
                top.read_at(&mut buf, off)?;
                w.write_at(off, &buf, below)?;
                off += n;
                done += n;
                progress(Progress { done, total });
            }
        }
        w.finish()?;
    }
    if total == 0 {
        progress(Progress { done: 0, total });
    }
    if let Some(u) = top_up.as_mut() {
        let emptied = u.data().and_then(|mut w| {
            w.make_empty(size)?;
            w.finish()
        });
        emptied.map_err(|e| match crate::blkdebug::os_error(&e) {
            Some(_) => Error::new(e.kind(), EmptyFailed(e)),
            None => e,
        })?;
    }
    Ok(())
}

/// An I/O error while `commit` empties the top image (qemu-img: "Failed to empty ...");
/// the base holds what was committed by then.
#[derive(Debug)]
pub struct EmptyFailed(pub Error);

impl std::fmt::Display for EmptyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "emptying the image: {}", self.0)
    }
}

impl std::error::Error for EmptyFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

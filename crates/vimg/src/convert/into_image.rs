//! `convert -n` into an existing image of a format whose updater writes guest data
//! ([`updater::caps`]`.data`; qcow2, and the formats that gain it), as qemu-img does it
//! (qemu-img.c, `img_convert` / `convert_co_write`):
//!
//! - the target is opened with the given format (`-O`), never probed; it must be at least as
//!   large as the source ("output file is smaller than input file"), and what lies past the
//!   source's end is left as it is;
//! - every range of the source is written: data as data, zero ranges as zero writes
//!   (whole clusters become zero clusters, parts of a cluster follow QEMU's rule, see
//!   [`DataTarget::zeroes_whole_unit`]), unless `--target-is-zero` says the target reads
//!   as zeros already; with `-B` (top-only) the ranges the source's top image does not
//!   hold are left untouched;
//! - compressed writes (`-c`) are refused: vimg does not compress into an existing image.
//!
//! The copy engine drives it through [`ImageWriter`] like any writer; this adapter turns
//! its calls, which come in guest order, into [`DataTarget`] calls, each of which leaves the
//! image consistent (the updater's crash-safe order), so a run that is killed leaves an
//! image that opens, with every cluster old or new.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::options::ConvertOptions;
use crate::engine::{self, CopyOptions, CopyStats};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::updater::{self, DataTarget, UpdateOp};
use crate::image::{Image, OpenOptions};
use crate::output::WriteCounter;
use crate::writer::{EncodedUnit, ImageWriter, WriterCaps};

/// Bytes of contiguous data gathered before they are written.
const GATHER: usize = 4 << 20;

/// Converts `src` into the existing image `dst` (of `opts.format`, whose updater writes
/// guest data) in place. `copy` is the engine's settings as the caller decided them
/// (zero writes, top-only).
pub(super) fn convert_into(
    src: &Image,
    dst: &Path,
    opts: &ConvertOptions,
    copy: &CopyOptions,
) -> Result<CopyStats> {
    let format = opts.format;
    updater::require(format, UpdateOp::Data)?;
    if opts.create.compress {
        return Err(Error::unsupported(format!(
            "vimg does not write compressed clusters into an existing {} image (-c with -n)",
            format.name()
        )));
    }
    if let Some(k) = opts
        .create
        .keys()
        .find(|k| !matches!(*k, "backing_file" | "backing_fmt"))
    {
        return Err(Error::refusal(
            ErrorKind::InvalidArgument,
            format!("-o has no effect when skipping image creation (option '{k}')"),
        ));
    }
    if opts.checksum.is_some() {
        return Err(Error::unsupported(
            "--checksum is not computed when writing into an existing image (-n)",
        ));
    }
    // The target as an image of the given format (qemu-img opens it with -O's driver): its
    // virtual size, and its backing chain, which supplies the rest of clusters written in
    // part.
    let mut open = OpenOptions::with_format(Some(format)).policy(opts.target_policy);
    open.key_secret = opts.target_key_secret.clone();
    let target = Image::open(dst, &open).map_err(|e| {
        Error::refusal(
            e.kind(),
            format!("Could not open '{}': {}", dst.display(), e.message()),
        )
    })?;
    if target.virtual_size() < src.virtual_size() {
        return Err(Error::refusal(
            ErrorKind::InvalidArgument,
            "output file is smaller than input file",
        ));
    }
    let mut up = updater::open_with_secret(
        dst,
        format,
        opts.target_policy,
        opts.target_key_secret.as_deref(),
    )?;
    if target.storage().identity() != Some(up.identity()?) {
        return Err(Error::refusal(
            ErrorKind::UnsafeReference,
            format!(
                "'{}' changed while it was being opened; nothing was written",
                dst.display()
            ),
        ));
    }
    let size = up.virtual_size()?;
    let data = up.data()?;
    super::settle_sources(src)?;
    let w = IntoImage {
        state: Mutex::new(State {
            unit: data.zero_unit().max(1),
            target: data,
            backing: target.backing(),
            size,
            pending: None,
        }),
        counter: opts.counter.clone(),
    };
    let stats = engine::copy(src, &w, copy)?;
    let st = w
        .state
        .into_inner()
        .map_err(|_| Error::msg(ErrorKind::Io, "a copy thread failed"))?;
    st.finish(w.counter.as_deref())?;
    Ok(stats)
}

/// The engine's writer over a [`DataTarget`].
struct IntoImage<'t, 'b> {
    state: Mutex<State<'t, 'b>>,
    counter: Option<Arc<WriteCounter>>,
}

struct State<'t, 'b> {
    target: DataTarget<'t>,
    /// The target's backing chain.
    backing: Option<&'b Image>,
    /// [`DataTarget::zero_unit`].
    unit: u64,
    /// The target's virtual size.
    size: u64,
    /// Contiguous bytes not written yet: `(offset, bytes)`.
    pending: Option<(u64, Vec<u8>)>,
}

impl State<'_, '_> {
    fn count(counter: Option<&WriteCounter>, off: u64, len: u64) {
        if let Some(c) = counter {
            c.bytes.fetch_add(len, Ordering::Relaxed);
            c.high.fetch_max(off + len, Ordering::Relaxed);
        }
    }

    /// Writes the gathered bytes.
    fn flush(&mut self, counter: Option<&WriteCounter>) -> Result<()> {
        if let Some((off, buf)) = self.pending.take() {
            self.target.write_at(off, &buf, self.backing)?;
            Self::count(counter, off, buf.len() as u64);
        }
        Ok(())
    }

    /// Gathers `data` at `off` (written in guest order, after what is gathered).
    fn data(&mut self, off: u64, data: &[u8], counter: Option<&WriteCounter>) -> Result<()> {
        match &mut self.pending {
            Some((s, buf)) if *s + buf.len() as u64 == off => buf.extend_from_slice(data),
            _ => {
                self.flush(counter)?;
                self.pending = Some((off, data.to_vec()));
            }
        }
        // Write what fills whole units, keep a unit written in part for what follows.
        if let Some((s, buf)) = &mut self.pending {
            if buf.len() >= GATHER {
                let end = *s + buf.len() as u64;
                let cut = (end / self.unit * self.unit).saturating_sub(*s) as usize;
                if cut > 0 {
                    let rest = buf.split_off(cut);
                    let (at, head) = (*s, std::mem::replace(buf, rest));
                    *s += cut as u64;
                    self.target.write_at(at, &head, self.backing)?;
                    Self::count(counter, at, head.len() as u64);
                }
            }
        }
        Ok(())
    }

    /// Makes `[off, off + len)` read as zeros, as QEMU's zero write does: whole units
    /// become zero units; a part of a unit makes the whole unit zero when it holds no data
    /// and the rest reads as zeros, else it is written as zero bytes.
    fn zeroes(&mut self, off: u64, len: u64, counter: Option<&WriteCounter>) -> Result<()> {
        let end = off + len;
        let u = self.unit;
        let mut pos = off;
        while pos < end {
            let ustart = pos / u * u;
            let uend = (ustart + u).min(self.size);
            let piece_end = end.min(ustart + u);
            let whole = pos == ustart && (piece_end == uend || piece_end >= self.size);
            if u == 1 || whole {
                // Whole units from here on; the last may end at the virtual size, and is
                // then passed whole so the target makes it a zero unit.
                let stop = if end >= self.size {
                    self.size.next_multiple_of(u)
                } else {
                    end / u * u
                };
                self.flush(counter)?;
                self.target.write_zeroes(pos, stop - pos, self.backing)?;
                Self::count(counter, pos, stop.min(self.size) - pos);
                pos = stop;
                continue;
            }
            let piece = piece_end - pos;
            let pending_here = self
                .pending
                .as_ref()
                .is_some_and(|(s, b)| *s + b.len() as u64 > ustart);
            if !pending_here && self.target.zeroes_whole_unit(pos, piece, self.backing)? {
                self.flush(counter)?;
                let stop = (ustart + u).min(self.size.next_multiple_of(u));
                self.target
                    .write_zeroes(ustart, stop - ustart, self.backing)?;
                Self::count(counter, ustart, uend - ustart);
            } else {
                self.data(pos, &vec![0u8; piece as usize], counter)?;
            }
            pos = piece_end;
        }
        Ok(())
    }

    fn finish(mut self, counter: Option<&WriteCounter>) -> Result<()> {
        self.flush(counter)?;
        self.target.finish()
    }
}

impl ImageWriter for IntoImage<'_, '_> {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            unit: 512,
            ordered: false,
            encodes: false,
        }
    }

    /// Nothing is placed ahead: every write happens in guest order (the engine calls
    /// `write` in turn), so the target's allocation follows the guest order as qemu-img's
    /// in-order writes do.
    fn allocate(&self, _offset: u64, _len: u64) -> Result<bool> {
        Ok(false)
    }

    fn write(&self, offset: u64, data: &[u8], _encoded: &[EncodedUnit]) -> Result<()> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| Error::msg(ErrorKind::Io, "a copy thread failed"))?;
        st.data(offset, data, self.counter.as_deref())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| Error::msg(ErrorKind::Io, "a copy thread failed"))?;
        st.zeroes(offset, len, self.counter.as_deref())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let st = self
            .state
            .into_inner()
            .map_err(|_| Error::msg(ErrorKind::Io, "a copy thread failed"))?;
        st.finish(self.counter.as_deref())
    }
}

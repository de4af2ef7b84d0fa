//! Content comparison of two images through their mappings (`vimg compare`): ranges that
//! are zero or unallocated on both sides are never read; a zero range on one side is checked
//! against the data on the other without reading the zeros.

use crate::engine::zero::is_zero;
use crate::error::Result;
use crate::image::Image;

/// qemu-img compares in 512-byte sectors and reports the first differing sector.
const SECTOR: u64 = 512;
/// Bytes read per step.
const STEP: u64 = 1 << 20;

/// The outcome of [`compare`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Comparison {
    /// Same content (over the common length; a longer image's tail is zero unless strict).
    Identical,
    /// The sizes differ and strict mode was asked for.
    SizeMismatch,
    /// The first sector (512-aligned guest offset) whose content differs.
    Mismatch(u64),
    /// Strict mode: the allocation status (present, zero, data, compressed, stored at an
    /// offset) differs from this offset on, as `qemu-img compare -s` reports it.
    StatusMismatch(u64),
}

/// A read that failed during [`compare`] (the source of the returned [`crate::Error`]):
/// qemu-img reports the offset of the chunk it was reading and the file's name.
#[derive(Debug)]
#[non_exhaustive]
pub struct ReadError {
    /// Guest offset of the chunk being read.
    pub offset: u64,
    /// The image's name, as the user gave it.
    pub filename: String,
    /// The errno's text (`Input/output error`), or the error's own text.
    pub reason: String,
    /// True when the failure came while checking the longer image's tail, after qemu-img
    /// would have printed its size-mismatch warning.
    pub size_warning: bool,
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Error while reading offset {} of {}: {}",
            self.offset, self.filename, self.reason
        )
    }
}

impl std::error::Error for ReadError {}

fn read_error(img: &Image, offset: u64, size_warning: bool, e: crate::Error) -> crate::Error {
    crate::Error::new(
        e.kind(),
        ReadError {
            offset,
            filename: img.filename().to_string(),
            reason: crate::blkdebug::error_text(&e),
            size_warning,
        },
    )
}

/// What [`compare`] reports besides the outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompareReport {
    /// The outcome.
    pub result: Comparison,
    /// True when the virtual sizes differ and the common part was compared equal (qemu-img
    /// then prints a warning before looking at the longer image's tail).
    pub size_warning: bool,
}

/// Compares `a` and `b` (each flattened through its backing chain). With `strict`, different
/// sizes are a mismatch; otherwise the longer image's tail must read as zeros. `progress`
/// gets (bytes done, bytes total) of guest space walked.
///
/// ```
/// use vimg::{Comparison, ConvertOptions, Format, Image, OpenOptions};
/// # let dir = tempfile::tempdir()?;
/// # let raw = dir.path().join("disk.raw");
/// # std::fs::write(&raw, vec![4u8; 1 << 20])?;
/// let a = Image::open(&raw, &OpenOptions::default())?;
/// let qcow2 = dir.path().join("disk.qcow2");
/// vimg::convert(&a, &qcow2, &ConvertOptions::new(Format::Qcow2))?;
/// let b = Image::open(&qcow2, &OpenOptions::default())?;
/// let report = vimg::compare(&a, &b, false, &mut |_, _| {})?;
/// assert_eq!(report.result, Comparison::Identical);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn compare(
    a: &Image,
    b: &Image,
    strict: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CompareReport> {
    let (sa, sb) = (a.virtual_size(), b.virtual_size());
    let size_differs = sa != sb;
    if size_differs && strict {
        return Ok(CompareReport {
            result: Comparison::SizeMismatch,
            size_warning: false,
        });
    }
    let common = sa.min(sb);
    let total = sa.max(sb);
    let mut bufa = Vec::new();
    let mut bufb = Vec::new();
    let mut pos = 0;
    while pos < common {
        let (ea, _, _) = a.map_flat(pos, common - pos)?;
        let (eb, _, _) = b.map_flat(pos, common - pos)?;
        if strict {
            let (sa, sb) = (status(a, pos, common)?, status(b, pos, common)?);
            if sa != sb {
                return Ok(CompareReport {
                    result: Comparison::StatusMismatch(pos),
                    size_warning: false,
                });
            }
        }
        let len = ea.len.min(eb.len).min(STEP);
        let (da, db) = (ea.kind.has_data(), eb.kind.has_data());
        let found =
            match (da, db) {
                (false, false) => None,
                (true, false) => first_nonzero(a, pos, len, &mut bufa)
                    .map_err(|e| read_error(a, pos, false, e))?,
                (false, true) => first_nonzero(b, pos, len, &mut bufb)
                    .map_err(|e| read_error(b, pos, false, e))?,
                (true, true) => first_difference(a, b, pos, len, &mut bufa, &mut bufb)?,
            };
        if let Some(off) = found {
            return Ok(CompareReport {
                result: Comparison::Mismatch(off / SECTOR * SECTOR),
                size_warning: false,
            });
        }
        pos += len;
        progress(pos, total);
    }
    let size_warning = size_differs;
    let longer = if sa > sb { a } else { b };
    while pos < total {
        let (e, _, _) = longer.map_flat(pos, total - pos)?;
        let len = e.len.min(STEP);
        if e.kind.has_data() {
            if let Some(off) = first_nonzero(longer, pos, len, &mut bufa)
                .map_err(|e| read_error(longer, pos, size_warning, e))?
            {
                return Ok(CompareReport {
                    result: Comparison::Mismatch(off / SECTOR * SECTOR),
                    size_warning,
                });
            }
        }
        pos += len;
        progress(pos, total);
    }
    Ok(CompareReport {
        result: Comparison::Identical,
        size_warning,
    })
}

/// The block status qemu compares in strict mode, from the map entry at `pos`.
fn status(img: &Image, pos: u64, end: u64) -> Result<(bool, bool, bool, bool, bool)> {
    let e = crate::map::entry_at(img, pos, end)?;
    Ok((e.present, e.zero, e.data, e.compressed, e.offset.is_some()))
}

fn first_nonzero(img: &Image, pos: u64, len: u64, buf: &mut Vec<u8>) -> Result<Option<u64>> {
    buf.resize(len as usize, 0);
    img.read_at(buf, pos)?;
    if is_zero(buf) {
        return Ok(None);
    }
    Ok(buf.iter().position(|&x| x != 0).map(|i| pos + i as u64))
}

fn first_difference(
    a: &Image,
    b: &Image,
    pos: u64,
    len: u64,
    ba: &mut Vec<u8>,
    bb: &mut Vec<u8>,
) -> Result<Option<u64>> {
    ba.resize(len as usize, 0);
    bb.resize(len as usize, 0);
    a.read_at(ba, pos)
        .map_err(|e| read_error(a, pos, false, e))?;
    b.read_at(bb, pos)
        .map_err(|e| read_error(b, pos, false, e))?;
    if ba == bb {
        return Ok(None);
    }
    Ok(ba
        .iter()
        .zip(bb.iter())
        .position(|(x, y)| x != y)
        .map(|i| pos + i as u64))
}

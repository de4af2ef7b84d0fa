//! Judging an image from the parts of a stream that were kept, for the streaming
//! `vimg.format_inspector` (oslo's `InspectWrapper` / `eat_chunk` API).
//!
//! A stream is read once, front to back, and only small regions of it are kept. The
//! library's own open-time validation (the same code `Image::open` runs on a file) is run
//! over a [`CapturedStorage`] holding just those regions. A read outside them does not
//! guess: the ranges it wanted are reported back, so the Python side can keep them as the
//! stream passes them and ask again. A verdict is given only when every read was served
//! from kept bytes, so it is the library's, never a second parser's.
//!
//! Parsers read back and forth (a qcow2 L1 table before its refcount table), but a
//! stream passes each byte once. So a missing read is answered with zeros, and the open
//! goes on to say what else it wants; every range asked for is reported at once, and the
//! stream can keep those still ahead of it. What the zeros made the parser conclude is
//! thrown away.

use std::io;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{json, Value};

use vimg::glance::ImageServiceInfo;
use vimg::storage::Storage;
use vimg::{Format, Image, OpenOptions};

/// The length a stream is assumed to have while its end has not been seen: large enough
/// that no header's claim about the file is judged against a length that is only "what
/// was read so far", small enough that nothing the library sizes by the file's length
/// can grow unreasonably. The real length is given once the stream ends, and the image
/// judged again.
pub const UNKNOWN_LENGTH: u64 = 64 << 30;

/// At most this many missing ranges are reported by one open.
const MAX_MISSING: usize = 64;

/// The captured regions of a stream: `(offset, bytes)`, sorted, not overlapping.
#[derive(Debug)]
struct CapturedStorage {
    pieces: Vec<(u64, Vec<u8>)>,
    len: u64,
    /// The ranges reads wanted and no piece held, in the order asked.
    missing: Mutex<Vec<(u64, u64)>>,
}

impl CapturedStorage {
    fn new(mut pieces: Vec<(u64, Vec<u8>)>, len: u64) -> CapturedStorage {
        pieces.sort_by_key(|p| p.0);
        CapturedStorage {
            pieces,
            len,
            missing: Mutex::new(Vec::new()),
        }
    }

    /// The piece holding byte `offset`, as (piece start, bytes).
    fn piece_at(&self, offset: u64) -> Option<(u64, &[u8])> {
        self.pieces.iter().rev().find_map(|(start, data)| {
            let end = start.checked_add(data.len() as u64)?;
            (*start <= offset && offset < end).then_some((*start, data.as_slice()))
        })
    }

    fn note_missing(&self, offset: u64, len: u64) {
        if let Ok(mut m) = self.missing.lock() {
            // Bounded: a parser led astray by zeros could ask for many ranges.
            if m.len() < MAX_MISSING && !m.contains(&(offset, len)) {
                m.push((offset, len));
            }
        }
    }
}

impl Storage for CapturedStorage {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.len - offset);
        match self.piece_at(offset) {
            Some((start, data)) => {
                // Within a piece: `offset - start` < data.len(), so it fits a usize.
                let from = (offset - start) as usize;
                let n = (data.len() - from).min(want as usize);
                buf[..n].copy_from_slice(&data[from..from + n]);
                Ok(n)
            }
            None => {
                // Up to the next kept piece: zeros, and the range noted.
                let next = self
                    .pieces
                    .iter()
                    .map(|p| p.0)
                    .find(|&s| s > offset)
                    .map_or(want, |s| (s - offset).min(want));
                self.note_missing(offset, next);
                // `next` <= `want` <= buf.len().
                buf[..next as usize].fill(0);
                Ok(next as usize)
            }
        }
    }
}

/// What [`judge`] found.
#[derive(Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Verdict {
    /// The library opened the image from the captured regions.
    Ok {
        format: String,
        disk_format: &'static str,
        virtual_size: u64,
        /// Every file the image names: (field, name as stored).
        references: Vec<(String, String)>,
    },
    /// The library read these `(offset, length)` ranges, which were not kept.
    Need { ranges: Vec<(u64, u64)> },
    /// The library refused the image.
    Invalid { kind: &'static str, message: String },
}

/// Opens the captured regions of a stream as `format` (probing when `None`) with the
/// library, nothing it names followed. `length` is the stream's length when its end was
/// seen, else [`UNKNOWN_LENGTH`] is assumed.
pub fn judge(format: Option<Format>, pieces: Vec<(u64, Vec<u8>)>, length: Option<u64>) -> Verdict {
    let storage = Arc::new(CapturedStorage::new(
        pieces,
        length.unwrap_or(UNKNOWN_LENGTH),
    ));
    let opts = OpenOptions::with_format(format).open_backing(false);
    let shared: Arc<dyn Storage> = storage.clone();
    let opened = Image::open_storage(shared, None, &opts).map(|image| {
        let svc = ImageServiceInfo::of(&image, None);
        Verdict::Ok {
            format: image.format().name().to_string(),
            disk_format: svc.disk_format,
            virtual_size: image.virtual_size(),
            references: image
                .reader()
                .external_refs()
                .into_iter()
                .map(|r| (r.field, r.name))
                .collect(),
        }
    });
    let missing = storage
        .missing
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    // A verdict stands only if every read was served from kept bytes.
    match opened {
        _ if !missing.is_empty() => Verdict::Need { ranges: missing },
        Ok(v) => v,
        Err(e) => Verdict::Invalid {
            kind: e.kind().as_str(),
            message: e.to_string(),
        },
    }
}

/// [`judge`]'s verdict as JSON, for the Python side.
pub fn judge_value(
    format: Option<Format>,
    pieces: Vec<(u64, Vec<u8>)>,
    length: Option<u64>,
) -> Value {
    serde_json::to_value(judge(format, pieces, length))
        .unwrap_or_else(|e| json!({"status": "invalid", "kind": "io", "message": e.to_string()}))
}

/// The formats whose signature `head` (the first bytes of a stream) carries, by the
/// library's probes, in probe order; empty for raw. A probe that looks at the end of the
/// file sees the end of `head`.
pub fn probe_head(head: &[u8]) -> Vec<&'static str> {
    let storage = vimg::storage::MemStorage::new(head.to_vec());
    vimg::formats::registry::probe_all(head, &storage)
        .into_iter()
        .map(|f| f.name())
        .collect()
}

/// ISO 9660's primary volume descriptor is looked for here (system area: 16 sectors of
/// 2048 bytes), by [`vimg::glance::is_iso9660`].
pub const ISO_DESCRIPTOR_AT: u64 = 16 * 2048;

/// True when `descriptor` (the 2048-byte sector at [`ISO_DESCRIPTOR_AT`]) starts an
/// ISO 9660 volume descriptor, by the library's test.
pub fn is_iso9660(descriptor: &[u8]) -> bool {
    let mut at = vec![0u8; ISO_DESCRIPTOR_AT as usize];
    at.extend_from_slice(descriptor);
    vimg::glance::is_iso9660(&vimg::storage::MemStorage::new(at))
}

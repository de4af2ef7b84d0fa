//! Compressed containers around an image: xz, gzip and zstd, recognised by their magic bytes
//! (never by the file name) and decoded on the fly.
//!
//! The decoded bytes reach the image readers as a [`Storage`] of one of two kinds:
//!
//! - [`StreamStorage`]: no temporary file. It serves reads in ascending order from a window
//!   of the most recently decoded bytes (plus the first 64 KiB, kept for probing) and fails
//!   clearly on a read behind the window. Raw images are streamed this way, because the copy
//!   engine reads a raw image front to back.
//! - [`SpoolStorage`]: the decoded bytes go into a sparse, already unlinked temporary file in
//!   `$TMPDIR` (zero runs of 4 KiB and more are left as holes) as far as the readers ask,
//!   so formats that need random access (qcow2 inside xz) work, and `info` decodes only the
//!   header it reads when the decoded size is known in advance.
//!
//! The decoded size must be known before an image can be opened. It comes from the xz index
//! (read from the end of a seekable file), from zstd frame headers, from the caller
//! ([`crate::source::SourceOptions::stream_size`]), or else from decoding the whole stream once.
//!
//! Memory is bounded: the stream window is [`STREAM_WINDOW`] bytes; the xz decoder may use
//! up to [`XZ_MEMLIMIT_THREADING`] across its threads (it uses fewer threads beyond that) and
//! never more than [`XZ_MEMLIMIT_STOP`]; zstd frames whose window exceeds 128 MiB are
//! refused (zstd's default limit); gzip needs 32 KiB.
//!
//! Errors name the container, the compressed offset the decoder had reached and the decoded
//! offset: "xz container 'disk.raw.xz': corrupt data near compressed offset 0x1f400
//! (decoded offset 0x3200000): ...".

mod encode;
mod size;
mod spool;
mod stream;

use std::fmt;
use std::io::{self, BufRead, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{ErrorKind, FormatError};
use crate::storage::Storage;

pub use encode::{CompressedSink, OutputCompression};
pub use size::{xz_decoded_size, zstd_decoded_size, zstd_size_from_head};
pub use spool::{SpoolLimits, SpoolStorage};
pub use stream::{OuterFile, StreamStorage};

/// Bytes of the most recently decoded data a [`StreamStorage`] keeps, so that reads which
/// arrive slightly out of order (parallel copy workers) are still served.
pub const STREAM_WINDOW: u64 = 64 << 20;

/// Memory the multi-threaded xz decoder may use before it falls back to fewer threads.
pub const XZ_MEMLIMIT_THREADING: u64 = 256 << 20;

/// Memory the xz decoder may never exceed: a stream that needs more (a dictionary larger
/// than any `xz -9` uses) is refused.
pub const XZ_MEMLIMIT_STOP: u64 = 512 << 20;

/// Bytes of the decoded stream read up front to probe the inner format.
pub const HEAD_BYTES: usize = 64 * 1024;

/// A compression container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Compression {
    /// xz (LZMA2), `.xz`.
    Xz,
    /// gzip (deflate), `.gz`.
    Gzip,
    /// Zstandard, `.zst`.
    Zstd,
}

impl Compression {
    /// The name used in messages, JSON and `-o compress=`: `xz`, `gzip`, `zstd`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Xz => "xz",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// xz stream header magic: 0xFD "7zXZ" 0x00.
const XZ_MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0x00];
/// gzip member magic (ID1 ID2) and CM = 8 (deflate), the only method defined.
const GZIP_MAGIC: [u8; 3] = [0x1f, 0x8b, 0x08];
/// zstd frame magic 0xFD2FB528, little-endian.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// bzip2: "BZh" + block size digit + the block magic (pi) — recognised only to refuse it.
const BZIP2_BLOCK_MAGIC: [u8; 6] = [0x31, 0x41, 0x59, 0x26, 0x53, 0x59];

/// Recognises a compression container from the first bytes of a source. The checks go past
/// the magic where the format allows (xz stream flags and their CRC, gzip reserved flag bits,
/// zstd's reserved descriptor bit), so a raw disk is not mistaken for a container by chance.
pub fn detect(head: &[u8]) -> Option<Compression> {
    if head.len() >= 12 && head[..6] == XZ_MAGIC {
        let flags = &head[6..8];
        let crc = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if flags[0] == 0 && flags[1] & 0xf0 == 0 && crc32fast::hash(flags) == crc {
            return Some(Compression::Xz);
        }
    }
    // FLG bits 5..7 are reserved and must be zero (RFC 1952, 2.3.1).
    if head.len() >= 10 && head[..3] == GZIP_MAGIC && head[3] & 0xe0 == 0 {
        return Some(Compression::Gzip);
    }
    if head.len() >= 5 && head[..4] == ZSTD_MAGIC && head[4] & 0x08 == 0 {
        return Some(Compression::Zstd);
    }
    // Skippable frames (pzstd writes one first): magic 0x184D2A5?.
    if head.len() >= 8 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18] {
        return Some(Compression::Zstd);
    }
    None
}

/// True when `head` starts like a bzip2 stream (which vimg does not decode).
pub fn is_bzip2(head: &[u8]) -> bool {
    head.len() >= 10
        && head.starts_with(b"BZh")
        && (b'1'..=b'9').contains(&head[3])
        && head[4..10] == BZIP2_BLOCK_MAGIC
}

/// What `info` says about a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ContainerInfo {
    /// The compression.
    pub compression: Compression,
    /// Bytes of the compressed file, when it is a file (not a pipe).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed_size: Option<u64>,
    /// Bytes of the decoded stream.
    pub decoded_size: u64,
    /// How the decoded bytes are served: `stream` (in order, no temporary file) or
    /// `temporary-file` (a sparse, unlinked file in the temporary folder).
    pub access: Access,
}

/// How a container's decoded bytes reach the readers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Decoded in order as the reads come, no temporary file.
    Stream,
    /// Decoded into a sparse temporary file as far as the reads need.
    TemporaryFile,
}

/// Why decoding failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The decoder rejected the data.
    #[error("{compression} container '{name}': corrupt data near compressed offset {compressed:#x} (decoded offset {decoded:#x}): {detail}")]
    Corrupt {
        /// The compression.
        compression: Compression,
        /// The container's name.
        name: String,
        /// How far the decoder had consumed the compressed bytes.
        compressed: u64,
        /// How many bytes it had produced.
        decoded: u64,
        /// What the decoder said.
        detail: String,
    },
    /// The compressed stream ended before its end marker.
    #[error("{compression} container '{name}' is truncated: the compressed data ends at offset {compressed:#x} (decoded offset {decoded:#x}) before the stream's end")]
    Truncated {
        /// The compression.
        compression: Compression,
        /// The container's name.
        name: String,
        /// Bytes of compressed input there were.
        compressed: u64,
        /// Bytes decoded before the end.
        decoded: u64,
    },
    /// The decoded stream is shorter or longer than its declared size.
    #[error("{what} '{name}' decodes to {got} bytes, but {expected} were expected ({why})")]
    SizeMismatch {
        /// "xz container", "stdin stream", ...
        what: String,
        /// The container's name.
        name: String,
        /// Bytes decoded (a lower bound when longer).
        got: String,
        /// Declared size.
        expected: u64,
        /// Where the declared size came from.
        why: String,
    },
    /// A container inside a container.
    #[error("{outer} container '{name}' holds a {inner} container: nested compression is not supported; decompress the outer layer first")]
    Nested {
        /// The outer compression.
        outer: Compression,
        /// The inner compression.
        inner: Compression,
        /// The container's name.
        name: String,
    },
    /// Data after the end of the last stream that is not another stream.
    #[error("{compression} container '{name}': unexpected data after the end of the stream at compressed offset {offset:#x}")]
    Trailing {
        /// The compression.
        compression: Compression,
        /// The container's name.
        name: String,
        /// Where the extra data starts.
        offset: u64,
    },
    /// The metadata used to learn the decoded size (xz index, zstd frame headers) is bad.
    #[error("{compression} container '{name}': {what} at offset {offset:#x} is invalid: {detail}")]
    BadMetadata {
        /// The compression.
        compression: Compression,
        /// The container's name.
        name: String,
        /// The structure.
        what: &'static str,
        /// Where it is.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// A read behind the window of a stream.
    #[error("'{name}' is read as a stream, in order; a read at decoded offset {offset:#x} is behind what is still kept ({kept:#x}): this image needs random access")]
    NotSequential {
        /// The source's name.
        name: String,
        /// The offset asked for.
        offset: u64,
        /// First offset still available.
        kept: u64,
    },
}

impl FormatError for ContainerError {
    fn kind(&self) -> ErrorKind {
        match self {
            ContainerError::Nested { .. } => ErrorKind::Unsupported,
            ContainerError::NotSequential { .. } => ErrorKind::Unsupported,
            _ => ErrorKind::Corrupt,
        }
    }
}
crate::impl_from_format_error!(ContainerError);

impl ContainerError {
    /// As an `io::Error`, to travel through [`Storage::read_at`]; the message is kept.
    pub fn into_io(self) -> io::Error {
        let kind = match self {
            ContainerError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            ContainerError::NotSequential { .. } => io::ErrorKind::Unsupported,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}

/// A `Read` over a seekable [`Storage`], from `pos` on.
pub struct StorageReader {
    storage: Arc<dyn Storage>,
    pos: u64,
}

impl StorageReader {
    /// Reads `storage` from its start.
    pub fn new(storage: Arc<dyn Storage>) -> StorageReader {
        StorageReader { storage, pos: 0 }
    }
}

impl Read for StorageReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.storage.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A buffered reader that counts the bytes its consumer has consumed, so decode errors can
/// say how far into the compressed data they happened.
struct CountingReader {
    inner: Box<dyn Read + Send>,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    consumed: Arc<AtomicU64>,
}

impl CountingReader {
    fn new(inner: Box<dyn Read + Send>, consumed: Arc<AtomicU64>) -> CountingReader {
        CountingReader {
            inner,
            buf: vec![0u8; 256 * 1024].into_boxed_slice(),
            pos: 0,
            filled: 0,
            consumed,
        }
    }
}

impl Read for CountingReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for CountingReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.filled {
            loop {
                match self.inner.read(&mut self.buf) {
                    Ok(n) => {
                        self.pos = 0;
                        self.filled = n;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(&self.buf[self.pos..self.filled])
    }

    fn consume(&mut self, amt: usize) {
        let amt = amt.min(self.filled - self.pos);
        self.pos += amt;
        self.consumed.fetch_add(amt as u64, Ordering::Relaxed);
    }
}

/// Reads concatenated xz streams (with stream padding between them), each with liblzma's
/// multi-threaded decoder, which decodes the blocks of a multi-block stream in parallel.
#[cfg(feature = "xz")]
struct XzReader {
    dec: Option<liblzma::bufread::XzDecoder<CountingReader>>,
    threads: u32,
    name: String,
    consumed: Arc<AtomicU64>,
}

#[cfg(feature = "xz")]
fn xz_stream(threads: u32) -> io::Result<liblzma::stream::Stream> {
    liblzma::stream::MtStreamBuilder::new()
        .threads(threads.max(1))
        .memlimit_threading(XZ_MEMLIMIT_THREADING)
        .memlimit_stop(XZ_MEMLIMIT_STOP)
        .decoder()
        .map_err(|e| io::Error::other(format!("cannot start the xz decoder: {e}")))
}

#[cfg(feature = "xz")]
impl Read for XzReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let Some(dec) = &mut self.dec else {
                return Ok(0);
            };
            let n = dec.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            // One stream ended. What follows must be stream padding (zeros, a multiple of
            // four bytes) and then nothing or another stream.
            let Some(dec) = self.dec.take() else {
                return Ok(0);
            };
            let mut r = dec.into_inner();
            let mut zeros = 0u64;
            let next_is_stream = loop {
                let avail = r.fill_buf()?;
                if avail.is_empty() {
                    break false;
                }
                let z = avail.iter().take_while(|b| **b == 0).count();
                if z == avail.len() {
                    zeros += z as u64;
                    r.consume(z);
                    continue;
                }
                zeros += z as u64;
                r.consume(z);
                let rest = r.fill_buf()?;
                break rest.len() >= XZ_MAGIC.len() && rest[..XZ_MAGIC.len()] == XZ_MAGIC;
            };
            let at = self.consumed.load(Ordering::Relaxed);
            let avail_empty = r.fill_buf()?.is_empty();
            if zeros & 3 != 0 || (!next_is_stream && !avail_empty) {
                return Err(ContainerError::Trailing {
                    compression: Compression::Xz,
                    name: self.name.clone(),
                    offset: at,
                }
                .into_io());
            }
            if !next_is_stream {
                return Ok(0);
            }
            self.dec = Some(liblzma::bufread::XzDecoder::new_stream(
                r,
                xz_stream(self.threads)?,
            ));
        }
    }
}

/// The error for a container whose codec was left out of the build (cargo features `xz`,
/// `zstd`).
pub(crate) fn not_built(c: Compression) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "{} containers are not supported: vimg was built without the `{}` cargo feature",
            c.name(),
            c.name()
        ),
    )
}

/// A decoder of one container (or none, for a plain stream) with error messages that
/// name the container and the offsets.
pub struct Decoder {
    inner: Box<dyn Read + Send>,
    compression: Option<Compression>,
    name: String,
    consumed: Arc<AtomicU64>,
    pos: u64,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("compression", &self.compression)
            .field("name", &self.name)
            .field("pos", &self.pos)
            .finish()
    }
}

impl Decoder {
    /// Decodes `input` as `compression` (`None`: passes the bytes through). `name` is used
    /// in messages; `threads` bounds the xz decoder's threads.
    pub fn new(
        compression: Option<Compression>,
        input: Box<dyn Read + Send>,
        name: &str,
        threads: u32,
    ) -> io::Result<Decoder> {
        #[cfg(not(feature = "xz"))]
        let _ = threads;
        let consumed = Arc::new(AtomicU64::new(0));
        let counting = CountingReader::new(input, consumed.clone());
        let inner: Box<dyn Read + Send> = match compression {
            None => Box::new(counting),
            #[cfg(feature = "xz")]
            Some(Compression::Xz) => Box::new(XzReader {
                dec: Some(liblzma::bufread::XzDecoder::new_stream(
                    counting,
                    xz_stream(threads)?,
                )),
                threads,
                name: name.to_string(),
                consumed: consumed.clone(),
            }),
            Some(Compression::Gzip) => Box::new(flate2::bufread::MultiGzDecoder::new(counting)),
            #[cfg(feature = "zstd")]
            Some(Compression::Zstd) => {
                Box::new(zstd::stream::read::Decoder::with_buffer(counting)?)
            }
            #[allow(unreachable_patterns)]
            Some(c) => return Err(not_built(c)),
        };
        Ok(Decoder {
            inner,
            compression,
            name: name.to_string(),
            consumed,
            pos: 0,
        })
    }

    /// Decoded bytes produced so far.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// The compression (`None` for a plain stream).
    pub fn compression(&self) -> Option<Compression> {
        self.compression
    }

    /// The name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// "xz container" or "stream", for messages.
    pub fn what(&self) -> String {
        match self.compression {
            Some(c) => format!("{c} container"),
            None => "stream".to_string(),
        }
    }

    /// Reads decoded bytes; `Ok(0)` only at the end of the decoded stream. Decoder errors
    /// come back with the container's name and the offsets.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    self.pos += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.wrap(e)),
            }
        }
    }

    /// Fills `buf` completely unless the stream ends; returns the bytes read.
    pub fn read_full(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read(&mut buf[done..])?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    fn wrap(&self, e: io::Error) -> io::Error {
        // Our own errors already say everything.
        if e.get_ref()
            .is_some_and(|inner| inner.is::<ContainerError>())
        {
            return e;
        }
        let compressed = self.consumed.load(Ordering::Relaxed);
        let Some(compression) = self.compression else {
            return io::Error::new(
                e.kind(),
                format!("read stream '{}' at offset {compressed:#x}: {e}", self.name),
            );
        };
        let truncated = e.kind() == io::ErrorKind::UnexpectedEof
            || e.to_string().contains("incomplete frame")
            || e.to_string().contains("premature eof");
        if truncated {
            ContainerError::Truncated {
                compression,
                name: self.name.clone(),
                compressed,
                decoded: self.pos,
            }
            .into_io()
        } else {
            ContainerError::Corrupt {
                compression,
                name: self.name.clone(),
                compressed,
                decoded: self.pos,
                detail: e.to_string(),
            }
            .into_io()
        }
    }

    /// Checks that the stream has nothing after `pos` (used once the declared size has been
    /// decoded). `why` says where the declared size came from.
    pub fn expect_end(&mut self, why: &str) -> io::Result<()> {
        let mut b = [0u8; 4096];
        let n = self.read(&mut b)?;
        if n > 0 {
            let got = self.pos;
            return Err(ContainerError::SizeMismatch {
                what: self.what(),
                name: self.name.clone(),
                got: format!("at least {got}"),
                expected: got - n as u64,
                why: why.to_string(),
            }
            .into_io());
        }
        Ok(())
    }

    /// The error for a stream that ended at `pos` before `expected` bytes.
    pub fn short(&self, expected: u64, why: &str) -> io::Error {
        ContainerError::SizeMismatch {
            what: self.what(),
            name: self.name.clone(),
            got: self.pos.to_string(),
            expected,
            why: why.to_string(),
        }
        .into_io()
    }

    /// Reads and discards everything; returns the decoded size.
    pub fn count_to_end(self) -> io::Result<u64> {
        Ok(self.count_within(None)?.unwrap_or(u64::MAX))
    }

    /// Reads and discards up to the end, or until more than `budget` bytes were decoded
    /// (then `None`: the size is larger than the budget, and work stays bounded by it).
    pub fn count_within(mut self, budget: Option<u64>) -> io::Result<Option<u64>> {
        let mut buf = vec![0u8; 1 << 20];
        while self.read(&mut buf)? > 0 {
            if budget.is_some_and(|b| self.pos > b) {
                return Ok(None);
            }
        }
        Ok(Some(self.pos))
    }
}

#[cfg(test)]
mod tests;

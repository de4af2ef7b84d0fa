//! The decoders: one `Read` of decoded bytes over a compressed stream.

use std::fmt;
use std::io::{self, BufRead, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::error::ContainerError;
use super::kind::Compression;
#[cfg(feature = "xz")]
use super::kind::XZ_MAGIC;
use crate::storage::Storage;

/// Memory the multi-threaded xz decoder may use before it falls back to fewer threads.
pub const XZ_MEMLIMIT_THREADING: u64 = 256 << 20;

/// Memory the xz decoder may never exceed: a stream that needs more (a dictionary larger
/// than any `xz -9` uses) is refused.
pub const XZ_MEMLIMIT_STOP: u64 = 512 << 20;

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

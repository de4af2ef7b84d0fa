//! Compressed raw output (`-O raw -o compress=xz|gzip|zstd`): the guest bytes go through an
//! encoder, strictly in order (gaps become zeros), into one output file — as cloud image
//! publishers ship `disk.raw.xz`. xz and zstd encode on several threads (liblzma's
//! multi-threaded encoder, zstd's worker threads); gzip on one.

use std::io::{self, Write};
use std::sync::Mutex;

use super::kind::Compression;
use crate::error::{Error, ErrorKind, Result};
use crate::output::OutFile;

/// A compression for output, with its level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputCompression {
    /// The codec.
    pub compression: Compression,
    /// The level (xz 0-9, gzip 1-9, zstd 1-19); `None` for the codec's default (xz 6, gzip 6,
    /// zstd 3).
    pub level: Option<u32>,
}

impl OutputCompression {
    /// Parses `-o compress=` (`xz`, `gz`/`gzip`, `zst`/`zstd`) and `compression_level`.
    pub fn parse(name: &str, level: Option<u64>) -> Result<OutputCompression> {
        let compression = match name {
            "xz" => Compression::Xz,
            "gz" | "gzip" => Compression::Gzip,
            "zst" | "zstd" => Compression::Zstd,
            other => {
                return Err(Error::invalid_argument(format!(
                    "Invalid compress value '{other}' (allowed: xz, gz, zst)"
                )))
            }
        };
        let range: std::ops::RangeInclusive<u32> = match compression {
            Compression::Xz => 0..=9,
            Compression::Gzip => 1..=9,
            Compression::Zstd => 1..=19,
        };
        let level = match level {
            None => None,
            Some(l) if l <= u64::from(*range.end()) && l >= u64::from(*range.start()) => {
                Some(l as u32)
            }
            Some(l) => {
                return Err(Error::invalid_argument(format!(
                    "compression_level {l} is out of range for {compression} ({}-{})",
                    range.start(),
                    range.end()
                )))
            }
        };
        Ok(OutputCompression { compression, level })
    }
}

/// Sequential writes into an [`OutFile`] from its start.
struct OutWriter {
    file: OutFile,
    pos: u64,
}

impl Write for OutWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file
            .write_all_at(buf, self.pos)
            .map_err(io::Error::other)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Encoder {
    #[cfg(feature = "xz")]
    Xz(liblzma::write::XzEncoder<OutWriter>),
    Gzip(flate2::write::GzEncoder<OutWriter>),
    #[cfg(feature = "zstd")]
    Zstd(zstd::stream::write::Encoder<'static, OutWriter>),
}

impl Encoder {
    fn writer(&mut self) -> &mut dyn Write {
        match self {
            #[cfg(feature = "xz")]
            Encoder::Xz(e) => e,
            Encoder::Gzip(e) => e,
            #[cfg(feature = "zstd")]
            Encoder::Zstd(e) => e,
        }
    }

    fn finish(self) -> io::Result<OutWriter> {
        match self {
            #[cfg(feature = "xz")]
            Encoder::Xz(e) => e.finish(),
            Encoder::Gzip(e) => e.finish(),
            #[cfg(feature = "zstd")]
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

struct State {
    enc: Option<Encoder>,
    /// Guest bytes encoded so far.
    pos: u64,
}

/// A compressed stream of guest bytes written in ascending order.
pub struct CompressedSink {
    state: Mutex<State>,
    name: String,
}

static ZEROS: [u8; 65536] = [0u8; 65536];

impl CompressedSink {
    /// Starts a compressed stream of `size` guest bytes into `file` on up to `threads`
    /// threads.
    pub fn new(
        file: OutFile,
        c: OutputCompression,
        size: u64,
        threads: u32,
    ) -> Result<CompressedSink> {
        let name = file.name().to_string();
        let w = OutWriter { file, pos: 0 };
        let threads = threads.max(1);
        // Only the optional codecs (cargo features) use these.
        #[cfg(not(all(feature = "xz", feature = "zstd")))]
        let _ = (size, threads);
        let enc = match c.compression {
            #[cfg(feature = "xz")]
            Compression::Xz => {
                let stream = liblzma::stream::MtStreamBuilder::new()
                    .threads(threads)
                    .preset(c.level.unwrap_or(6))
                    .check(liblzma::stream::Check::Crc64)
                    .encoder()
                    .map_err(|e| Error::invalid_argument(format!("xz encoder: {e}")))?;
                Encoder::Xz(liblzma::write::XzEncoder::new_stream(w, stream))
            }
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                w,
                flate2::Compression::new(c.level.unwrap_or(6)),
            )),
            #[cfg(feature = "zstd")]
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(w, c.level.unwrap_or(3) as i32)
                    .map_err(|e| Error::io("start the zstd encoder", e))?;
                // The content size in the frame header lets a reader stream the image from
                // a pipe without decoding it first.
                let setup = e
                    .include_checksum(true)
                    .and_then(|_| e.include_contentsize(true))
                    .and_then(|_| e.set_pledged_src_size(Some(size)))
                    .and_then(|_| {
                        if threads > 1 {
                            e.multithread(threads)
                        } else {
                            Ok(())
                        }
                    });
                setup.map_err(|e| Error::io("configure the zstd encoder", e))?;
                Encoder::Zstd(e)
            }
            #[allow(unreachable_patterns)]
            other => return Err(Error::new(ErrorKind::Unsupported, super::not_built(other))),
        };
        Ok(CompressedSink {
            state: Mutex::new(State {
                enc: Some(enc),
                pos: 0,
            }),
            name,
        })
    }

    fn err(&self, what: &str, e: io::Error) -> Error {
        Error::io(format_args!("{what} '{}'", self.name), e)
    }

    fn fill_zeros(&self, st: &mut State, to: u64) -> Result<()> {
        let Some(enc) = st.enc.as_mut() else {
            return Err(Error::invalid_argument(
                "compressed output already finished",
            ));
        };
        while st.pos < to {
            let n = (to - st.pos).min(ZEROS.len() as u64) as usize;
            enc.writer()
                .write_all(&ZEROS[..n])
                .map_err(|e| self.err("compress into", e))?;
            st.pos += n as u64;
        }
        Ok(())
    }

    /// Encodes `data` at guest `offset`, which must not be behind what was already written;
    /// the gap before it is encoded as zeros.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| Error::invalid_argument("compressed output lock poisoned"))?;
        if offset < st.pos {
            return Err(Error::unsupported(format!(
                "compressed output is written in order; a write at {offset:#x} is behind {:#x}",
                st.pos
            )));
        }
        self.fill_zeros(&mut st, offset)?;
        let enc = st
            .enc
            .as_mut()
            .ok_or_else(|| Error::invalid_argument("compressed output already finished"))?;
        enc.writer()
            .write_all(data)
            .map_err(|e| self.err("compress into", e))?;
        st.pos += data.len() as u64;
        Ok(())
    }

    /// Encodes zeros up to `size` and ends the compressed stream.
    pub fn finish(&self, size: u64) -> Result<()> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| Error::invalid_argument("compressed output lock poisoned"))?;
        self.fill_zeros(&mut st, size)?;
        let enc = st
            .enc
            .take()
            .ok_or_else(|| Error::invalid_argument("compressed output already finished"))?;
        let w = enc.finish().map_err(|e| self.err("finish", e))?;
        // A regular file may already be longer (nothing else writes it, but be exact).
        w.file.set_len(w.pos)?;
        Ok(())
    }
}

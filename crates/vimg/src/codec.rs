//! Compression codecs in one place: raw deflate with a 4 KiB window (qcow2 zlib clusters),
//! zlib streams (VMDK grains) and zstd (qcow2 zstd clusters).
//!
//! Decoding is strict: a unit must decode to exactly its size, no more and no less.
//! Encoders keep one context per thread and reset it per unit.
//!
//! Deflate and zlib units are decoded with libdeflate: a unit is decoded whole into a buffer
//! of its known size, which is the case libdeflate is built for, and it does so about twice
//! as fast as a streaming inflater (criterion `decompress_64KiB`, text-like qcow2 cluster:
//! zlib-rs 120 us, libdeflate 55 us). Encoding stays with zlib
//! (flate2 + zlib-rs), because qcow2 needs a 4 KiB window, which libdeflate does not offer.

use std::cell::RefCell;

use flate2::{Compress, Compression, FlushCompress, Status};

/// How a compressed unit is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Raw deflate (RFC 1951), as qcow2 stores zlib-type compressed clusters.
    Deflate,
    /// zlib stream (RFC 1950), as VMDK stores compressed grains.
    Zlib,
    /// A zstd frame (or several), as qcow2 stores zstd-type compressed clusters.
    Zstd,
    /// A bzip2 stream, as dmg stores UDBZ chunks.
    Bzip2,
}

/// Why a compressed unit could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The stream is malformed.
    #[error("{codec:?} data is corrupt: {detail}")]
    Corrupt {
        /// The codec in use.
        codec: Codec,
        /// What the decoder said.
        detail: String,
    },
    /// The stream decoded to fewer bytes than one unit.
    #[error("{codec:?} data decodes to {got} bytes, expected {expected}")]
    Short {
        /// The codec in use.
        codec: Codec,
        /// Bytes produced.
        got: usize,
        /// Bytes expected (one unit).
        expected: usize,
    },
    /// The codec's cargo feature is not built in.
    #[error("{codec:?} data cannot be decoded: vimg was built without its cargo feature")]
    NotBuilt {
        /// The codec in use.
        codec: Codec,
    },
    /// The stream decodes to more than one unit.
    #[error("{codec:?} data decodes to more than {expected} bytes")]
    Long {
        /// The codec in use.
        codec: Codec,
        /// Bytes expected (one unit).
        expected: usize,
    },
}

#[cfg(feature = "libdeflate")]
thread_local! {
    static INFLATE: RefCell<Option<libdeflater::Decompressor>> = const { RefCell::new(None) };
}
#[cfg(feature = "zstd")]
thread_local! {
    static ZSTD_DCTX: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
}

/// Decodes one unit: `input` (which may carry trailing padding) must decode to exactly
/// `out.len()` bytes.
pub fn decompress(codec: Codec, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    match codec {
        #[cfg(feature = "libdeflate")]
        Codec::Deflate | Codec::Zlib => INFLATE.with(|d| {
            let mut d = d.borrow_mut();
            let d = d.get_or_insert_with(libdeflater::Decompressor::new);
            inflate(d, codec, input, out)
        }),
        #[cfg(not(feature = "libdeflate"))]
        Codec::Deflate | Codec::Zlib => inflate_flate2(codec, input, out),
        #[cfg(feature = "zstd")]
        Codec::Zstd => ZSTD_DCTX.with(|d| {
            let mut d = d.borrow_mut();
            let dctx = d.get_or_insert_with(zstd::zstd_safe::DCtx::create);
            unzstd(dctx, input, out)
        }),
        #[cfg(not(feature = "zstd"))]
        Codec::Zstd => Err(CodecError::NotBuilt { codec }),
        Codec::Bzip2 => unbzip2(input, out),
    }
}

/// Decodes one bzip2 stream (a dmg UDBZ chunk), as QEMU's dmg-bz2 does: the stream must
/// end, and fill `out` exactly. Bytes after the stream's end are ignored.
fn unbzip2(input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    use bzip2::{Decompress, Status};
    let codec = Codec::Bzip2;
    let mut d = Decompress::new(false);
    loop {
        let (i, o) = (d.total_in() as usize, d.total_out() as usize);
        let len = out.len();
        let r = d.decompress(&input[i.min(input.len())..], &mut out[o.min(len)..]);
        let (ni, no) = (d.total_in() as usize, d.total_out() as usize);
        match r {
            Ok(Status::StreamEnd) if no == out.len() => return Ok(()),
            Ok(Status::StreamEnd) => {
                return Err(CodecError::Short {
                    codec,
                    got: no,
                    expected: out.len(),
                })
            }
            Ok(_) if no == out.len() => {
                // Full, but the stream goes on: is there more output?
                let mut one = [0u8; 1];
                return match d.decompress(&input[ni.min(input.len())..], &mut one) {
                    Ok(Status::StreamEnd) if d.total_out() as usize == out.len() => Ok(()),
                    Ok(_) if d.total_out() as usize > out.len() => Err(CodecError::Long {
                        codec,
                        expected: out.len(),
                    }),
                    _ => Err(CodecError::Corrupt {
                        codec,
                        detail: "the stream does not end".into(),
                    }),
                };
            }
            Ok(_) if ni == i && no == o => {
                return Err(CodecError::Corrupt {
                    codec,
                    detail: "the stream ends early".into(),
                })
            }
            Ok(_) => {}
            Err(e) => {
                return Err(CodecError::Corrupt {
                    codec,
                    detail: e.to_string(),
                })
            }
        }
    }
}

/// [`inflate`] without libdeflate: flate2 decodes the unit in one call into `out`; the
/// stream must end exactly when `out` is full.
#[cfg(not(feature = "libdeflate"))]
fn inflate_flate2(codec: Codec, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    let mut d = flate2::Decompress::new(codec == Codec::Zlib);
    let r = d.decompress(input, out, flate2::FlushDecompress::Finish);
    let got = d.total_out() as usize;
    match r {
        Ok(Status::StreamEnd) if got == out.len() => Ok(()),
        Ok(_) if got == out.len() => Err(CodecError::Long {
            codec,
            expected: out.len(),
        }),
        Ok(_) => Err(CodecError::Short {
            codec,
            got,
            expected: out.len(),
        }),
        Err(e) => Err(CodecError::Corrupt {
            codec,
            detail: e.to_string(),
        }),
    }
}

#[cfg(feature = "libdeflate")]
/// Decodes one whole deflate or zlib unit. libdeflate stops at the end of the stream, so
/// padding after it is ignored; the output must fill `out` exactly.
fn inflate(
    d: &mut libdeflater::Decompressor,
    codec: Codec,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    use libdeflater::DecompressionError as E;
    let r = if codec == Codec::Zlib {
        d.zlib_decompress(input, out)
    } else {
        d.deflate_decompress(input, out)
    };
    match r {
        Ok(got) if got == out.len() => Ok(()),
        Ok(got) => Err(CodecError::Short {
            codec,
            got,
            expected: out.len(),
        }),
        Err(E::InsufficientSpace) => Err(CodecError::Long {
            codec,
            expected: out.len(),
        }),
        Err(E::BadData) => Err(CodecError::Corrupt {
            codec,
            detail: "invalid data (or the stream ends early)".into(),
        }),
    }
}

#[cfg(feature = "zstd")]
fn unzstd(
    dctx: &mut zstd::zstd_safe::DCtx<'static>,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    use zstd::zstd_safe::{InBuffer, OutBuffer, ResetDirective};
    let codec = Codec::Zstd;
    let corrupt = |code: usize| CodecError::Corrupt {
        codec,
        detail: zstd::zstd_safe::get_error_name(code).to_string(),
    };
    dctx.reset(ResetDirective::SessionOnly).map_err(corrupt)?;
    let expected = out.len();
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    // qcow2 pads compressed clusters to a sector, so stop as soon as one unit is out.
    // `hint` is zstd's answer: 0 once a frame is completely decoded and flushed.
    let mut hint = usize::MAX;
    while outb.pos() < expected {
        let before = (inb.pos, outb.pos());
        hint = dctx
            .decompress_stream(&mut outb, &mut inb)
            .map_err(corrupt)?;
        if (inb.pos, outb.pos()) == before {
            break;
        }
    }
    let got = outb.pos();
    if got < expected {
        return Err(CodecError::Short {
            codec,
            got,
            expected,
        });
    }
    if hint == 0 {
        // The frame ended with the unit. What follows may be the next unit's frame (qcow2
        // packs compressed clusters back to back) or padding; it is not ours to decode.
        return Ok(());
    }
    // The frame goes on: one more byte of output means it holds more than one unit.
    let mut extra = [0u8; 1];
    let mut eb = OutBuffer::around(&mut extra[..]);
    match dctx.decompress_stream(&mut eb, &mut inb) {
        Ok(_) if eb.pos() > 0 => Err(CodecError::Long { codec, expected }),
        Ok(0) => Ok(()),
        // As qemu: a frame that does not end after one unit is an error.
        Ok(_) => Err(CodecError::Corrupt {
            codec,
            detail: "the frame does not end after one unit".into(),
        }),
        Err(code) => Err(corrupt(code)),
    }
}

thread_local! {
    static DEFLATE: RefCell<Option<(u32, u8, bool, Compress)>> = const { RefCell::new(None) };
}

/// Compresses `input` as raw deflate (`zlib_header == false`) or zlib stream with a window of
/// `2^window_bits` bytes at `level` (0..=9). Returns `None` when the result would not be
/// smaller than `max_out` bytes.
pub fn deflate(
    input: &[u8],
    level: u32,
    window_bits: u8,
    zlib_header: bool,
    max_out: usize,
) -> Option<Vec<u8>> {
    DEFLATE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let reuse = matches!(&*cell, Some((l, w, z, _)) if *l == level && *w == window_bits && *z == zlib_header);
        if !reuse {
            *cell = Some((
                level,
                window_bits,
                zlib_header,
                Compress::new_with_window_bits(Compression::new(level), zlib_header, window_bits),
            ));
        }
        let (_, _, _, c) = cell.as_mut()?;
        c.reset();
        let mut out = Vec::with_capacity(max_out);
        match c.compress_vec(input, &mut out, FlushCompress::Finish) {
            Ok(Status::StreamEnd) if out.len() < max_out => Some(out),
            Ok(Status::StreamEnd) => None,
            _ => {
                // The stream stopped with output still pending. zlib-rs 0.6 does not clear
                // that state on reset() and panics in the next stored block, so start over
                // with a fresh compressor next time.
                *cell = None;
                None
            }
        }
    })
}

#[cfg(feature = "libdeflate")]
thread_local! {
    static LIBDEFLATE: RefCell<Option<(i32, libdeflater::Compressor)>> = const { RefCell::new(None) };
}

/// Compresses `input` as one zlib stream (32 KiB window) with libdeflate at `level`
/// (1..=12), which compresses a whole buffer faster and smaller than zlib at a like level.
/// Returns `None` when the result would not be smaller than `max_out` bytes or the level is
/// out of range. Without the `libdeflate` feature, zlib (flate2) compresses at the level
/// capped to 9: the same format, other bytes.
pub fn zlib_compress(input: &[u8], level: i32, max_out: usize) -> Option<Vec<u8>> {
    #[cfg(not(feature = "libdeflate"))]
    return deflate(input, level.clamp(1, 9) as u32, 15, true, max_out);
    #[cfg(feature = "libdeflate")]
    LIBDEFLATE.with(|cell| {
        let mut cell = cell.borrow_mut();
        if !matches!(&*cell, Some((l, _)) if *l == level) {
            let lvl = libdeflater::CompressionLvl::new(level).ok()?;
            *cell = Some((level, libdeflater::Compressor::new(lvl)));
        }
        let (_, c) = cell.as_mut()?;
        let mut out = vec![0u8; c.zlib_compress_bound(input.len()).min(max_out)];
        let n = c.zlib_compress(input, &mut out).ok()?;
        if n >= max_out {
            return None;
        }
        out.truncate(n);
        Some(out)
    })
}

#[cfg(feature = "zstd")]
thread_local! {
    static ZSTD_CCTX: RefCell<Option<(i32, zstd::zstd_safe::CCtx<'static>)>> = const { RefCell::new(None) };
}

/// Compresses `input` as one zstd frame at `level`. Returns `None` when the result would
/// not be smaller than `max_out` bytes. Without the `zstd` feature, callers refuse zstd
/// output before they get here (`None` would store the unit uncompressed).
pub fn zstd_compress(input: &[u8], level: i32, max_out: usize) -> Option<Vec<u8>> {
    #[cfg(not(feature = "zstd"))]
    return {
        let _ = (input, level, max_out);
        None
    };
    #[cfg(feature = "zstd")]
    ZSTD_CCTX.with(|cell| {
        let mut cell = cell.borrow_mut();
        if !matches!(&*cell, Some((l, _)) if *l == level) {
            let mut cctx = zstd::zstd_safe::CCtx::create();
            cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level))
                .ok()?;
            *cell = Some((level, cctx));
        }
        let (_, cctx) = cell.as_mut()?;
        let mut out: Vec<u8> = Vec::with_capacity(zstd::zstd_safe::compress_bound(input.len()));
        cctx.reset(zstd::zstd_safe::ResetDirective::SessionOnly)
            .ok()?;
        cctx.compress2(&mut out, input).ok()?;
        (out.len() < max_out).then_some(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8 ^ (i / 4096) as u8).collect()
    }

    #[test]
    fn deflate_round_trip_with_small_window() {
        let data = sample(65536);
        let c = deflate(&data, 6, 12, false, data.len()).unwrap();
        let mut out = vec![0u8; data.len()];
        // Trailing padding after the stream is allowed.
        let mut padded = c.clone();
        padded.extend_from_slice(&[0u8; 100]);
        decompress(Codec::Deflate, &padded, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zlib_and_zstd_round_trip() {
        let data = sample(65536);
        let c = deflate(&data, 6, 15, true, data.len()).unwrap();
        let mut out = vec![0u8; data.len()];
        decompress(Codec::Zlib, &c, &mut out).unwrap();
        assert_eq!(out, data);
        let z = zstd_compress(&data, 3, data.len()).unwrap();
        let mut padded = z.clone();
        padded.extend_from_slice(&[0u8; 300]);
        let mut out = vec![0u8; data.len()];
        decompress(Codec::Zstd, &padded, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let data = sample(8192);
        for codec in [Codec::Deflate, Codec::Zlib, Codec::Zstd] {
            let c = match codec {
                Codec::Deflate => deflate(&data, 6, 12, false, data.len()).unwrap(),
                Codec::Zlib => deflate(&data, 6, 15, true, data.len()).unwrap(),
                Codec::Zstd => zstd_compress(&data, 3, data.len()).unwrap(),
                // Covered by bzip2_exact_units.
                Codec::Bzip2 => continue,
            };
            let mut small = vec![0u8; 4096];
            assert!(
                matches!(
                    decompress(codec, &c, &mut small),
                    Err(CodecError::Long { .. })
                ),
                "{codec:?} long"
            );
            let mut big = vec![0u8; 16384];
            assert!(
                matches!(
                    decompress(codec, &c, &mut big),
                    Err(CodecError::Short { .. })
                ),
                "{codec:?} short"
            );
            let mut out = vec![0u8; 8192];
            assert!(decompress(codec, &c[..c.len() / 2], &mut out).is_err());
            assert!(decompress(codec, &[0xffu8; 64], &mut out).is_err());
        }
    }

    #[test]
    fn compressor_survives_streams_that_did_not_fit() {
        // Incompressible 4 KiB units with a 4 KiB window: reusing the compressor after an
        // unfinished stream made zlib-rs 0.6 panic after about 16 units.
        let mut x = 0x9e3779b9u32;
        for _ in 0..64 {
            let noise: Vec<u8> = (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            assert!(deflate(&noise, 6, 12, false, noise.len()).is_none());
        }
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog 0123456789 "
            .iter()
            .cycle()
            .take(4096)
            .copied()
            .collect();
        let c = deflate(&text, 6, 12, false, text.len()).unwrap();
        let mut out = vec![0u8; text.len()];
        decompress(Codec::Deflate, &c, &mut out).unwrap();
        assert_eq!(out, text);
    }

    #[test]
    fn zstd_frames_packed_back_to_back() {
        // qcow2 packs compressed clusters without gaps: the input of one unit runs into the
        // next unit's frame, which must not count as more output.
        let a = sample(8192);
        let b: Vec<u8> = a.iter().map(|x| x ^ 0x5a).collect();
        let mut packed = zstd_compress(&a, 3, a.len()).unwrap();
        packed.extend_from_slice(&zstd_compress(&b, 3, b.len()).unwrap());
        let mut out = vec![0u8; 8192];
        decompress(Codec::Zstd, &packed, &mut out).unwrap();
        assert_eq!(out, a);
    }

    #[test]
    fn incompressible_is_none() {
        let mut x = 0x12345678u32;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert!(deflate(&data, 6, 12, false, data.len()).is_none());
        assert!(zstd_compress(&data, 3, data.len()).is_none());
    }

    #[test]
    fn bzip2_exact_units() {
        use std::io::Write;
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        e.write_all(&data).unwrap();
        let c = e.finish().unwrap();
        let mut out = vec![0u8; 4096];
        decompress(Codec::Bzip2, &c, &mut out).unwrap();
        assert_eq!(out, data);
        // Trailing padding is ignored.
        let mut padded = c.clone();
        padded.extend_from_slice(&[0; 100]);
        decompress(Codec::Bzip2, &padded, &mut out).unwrap();
        let mut small = vec![0u8; 4095];
        assert!(matches!(
            decompress(Codec::Bzip2, &c, &mut small),
            Err(CodecError::Long { .. })
        ));
        let mut big = vec![0u8; 4097];
        assert!(matches!(
            decompress(Codec::Bzip2, &c, &mut big),
            Err(CodecError::Short { .. })
        ));
        assert!(decompress(Codec::Bzip2, &c[..c.len() / 2], &mut out).is_err());
        assert!(decompress(Codec::Bzip2, &[1; 100], &mut out).is_err());
    }
}

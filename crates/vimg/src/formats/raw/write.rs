//! The raw writer: data written in place, zero ranges left as holes, the file length set to
//! the virtual size. `preallocation=falloc` reserves every block, `full` writes zeros.

use crate::container::{CompressedSink, OutputCompression};
use crate::error::{Error, Result};
use crate::options::CreateOptions;
use crate::output::{OutFile, Output, OutputMode};
use crate::writer::{EncodedUnit, ImageWriter, WriterCaps};

/// Writes a raw image.
pub struct RawWriter {
    file: OutFile,
    size: u64,
    /// `compress=`: the image goes through this encoder, in order.
    compressed: Option<CompressedSink>,
}

/// The block QEMU's file protocol writes at the start of every new file (its
/// `allocate_first_block`: 4 KiB on the page size here).
const FIRST_BLOCK: u64 = 4096;

/// Preallocation modes of raw images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prealloc {
    Off,
    Falloc,
    Full,
}

impl RawWriter {
    /// Creates the main file of `out` as a raw image of `size` bytes.
    pub fn create(out: &Output, size: u64, opts: &CreateOptions) -> Result<RawWriter> {
        // qemu's file protocol: "metadata" is a mode it knows but refuses.
        crate::formats::check_file_preallocation(opts)?;
        let prealloc = match super::CAPABILITIES.choice("preallocation", opts)? {
            "falloc" => Prealloc::Falloc,
            "full" => Prealloc::Full,
            _ => Prealloc::Off,
        };
        if let Some(name) = opts.get_str("compress") {
            let c = OutputCompression::parse(name, opts.get_number("compression_level")?)?;
            if prealloc != Prealloc::Off {
                return Err(Error::invalid_argument(
                    "preallocation cannot be combined with compress",
                ));
            }
            if out.mode() == OutputMode::InPlace {
                return Err(Error::unsupported(
                    "a compressed raw image cannot be written in place (-n)",
                ));
            }
            let file = out.create_main()?;
            let threads = std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1);
            let sink = CompressedSink::new(file.clone(), c, size, threads)?;
            return Ok(RawWriter {
                file,
                size,
                compressed: Some(sink),
            });
        }
        if opts.has("compression_level") {
            return Err(Error::invalid_argument(
                "compression_level needs compress=xz|gz|zst",
            ));
        }
        let file = out.create_main()?;
        if out.mode() == OutputMode::InPlace {
            let len = file.len()?;
            if len < size {
                return Err(Error::invalid_argument(format!(
                    "Target '{}' is smaller ({len} bytes) than the source ({size} bytes)",
                    file.name()
                )));
            }
        } else {
            // QEMU's file protocol makes a new file a whole number of 512-byte sectors.
            let padded = if file.is_stream() || file.is_device() {
                size
            } else {
                size.div_ceil(512).saturating_mul(512)
            };
            file.set_len(padded)?;
            match prealloc {
                // As QEMU's file protocol leaves every new file: its first block written
                // (zeros), so `map` shows it as data (iotest 253). A device is not a new
                // file: qemu-img's create writes nothing to it, and neither does vimg.
                Prealloc::Off if !file.is_stream() && !file.is_device() && size > 0 => {
                    file.write_all_at(&vec![0u8; size.min(FIRST_BLOCK) as usize], 0)?;
                }
                Prealloc::Off => {}
                Prealloc::Falloc => {
                    if size > 0 {
                        file.allocate(0, size)?;
                    }
                }
                Prealloc::Full => {
                    let zeros = vec![0u8; 1 << 20];
                    let mut pos = 0;
                    while pos < size {
                        let n = (size - pos).min(zeros.len() as u64) as usize;
                        file.write_all_at(&zeros[..n], pos)?;
                        pos += n as u64;
                    }
                }
            }
        }
        Ok(RawWriter {
            file,
            size,
            compressed: None,
        })
    }
}

impl ImageWriter for RawWriter {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            unit: 512,
            // A hashed file written in order is hashed as it is written, on its own thread,
            // instead of being read again once finished.
            ordered: self.file.is_stream() || self.compressed.is_some() || self.file.is_hashed(),
            encodes: false,
        }
    }

    /// Every byte has its fixed place: nothing to allocate, writes may run in any order.
    fn allocate(&self, _offset: u64, _len: u64) -> Result<bool> {
        Ok(true)
    }

    fn write(&self, offset: u64, data: &[u8], _encoded: &[EncodedUnit]) -> Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| Error::invalid_argument("write past the end of the raw image"))?;
        let _ = end;
        if let Some(c) = &self.compressed {
            return c.write_at(offset, data);
        }
        self.file.write_all_at(data, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if self.file.is_stream() || self.compressed.is_some() {
            // A stream reads as zero where nothing was written.
            return Ok(());
        }
        self.file.zero_range(offset, len)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        if let Some(c) = &self.compressed {
            c.finish(self.size)?;
        }
        Ok(())
    }
}

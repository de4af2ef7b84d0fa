//! The raw writer: data written in place, zero ranges left as holes, the file length set to
//! the virtual size. `preallocation=falloc` reserves every block, `full` writes zeros.

use crate::error::{Error, Result};
use crate::options::CreateOptions;
use crate::output::{OutFile, Output, OutputMode};
use crate::writer::{EncodedUnit, ImageWriter, WriterCaps};

/// Writes a raw image.
pub struct RawWriter {
    file: OutFile,
    size: u64,
}

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
        let prealloc = match opts.get_str("preallocation").unwrap_or("off") {
            "off" => Prealloc::Off,
            "falloc" => Prealloc::Falloc,
            "full" => Prealloc::Full,
            other => {
                return Err(Error::invalid_argument(format!(
                    "Invalid preallocation mode: '{other}'"
                )))
            }
        };
        if opts.compress {
            return Err(Error::invalid_argument(
                "Compression not supported for this file format",
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
            file.set_len(size)?;
            match prealloc {
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
        Ok(RawWriter { file, size })
    }
}

impl ImageWriter for RawWriter {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            unit: 512,
            ordered: self.file.is_stream(),
            encodes: false,
        }
    }

    fn write(&self, offset: u64, data: &[u8], _encoded: &[EncodedUnit]) -> Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| Error::invalid_argument("write past the end of the raw image"))?;
        let _ = end;
        self.file.write_all_at(data, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if self.file.is_stream() {
            // A stream reads as zero where nothing was written.
            return Ok(());
        }
        self.file.zero_range(offset, len)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

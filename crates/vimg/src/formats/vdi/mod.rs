//! vdi: not implemented yet (placeholder until its reader and writer land).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::{Format, OpenContext};
use crate::mapping::ImageReader;
use crate::options::OptionSpec;
use crate::output::Output;
use crate::storage::Storage;
use crate::writer::ImageWriter;
use crate::CreateOptions;

/// The vdi driver.
pub struct Driver;

impl crate::formats::Driver for Driver {
    fn format(&self) -> Format {
        Format::Vdi
    }

    fn probe(&self, head: &[u8], _storage: &dyn Storage) -> bool {
        head.len() >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe]
    }

    fn open(&self, _storage: Arc<dyn Storage>, _ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        Err(Error::unsupported("vdi images are not supported yet"))
    }

    fn create_options(&self) -> &'static [OptionSpec] {
        &[]
    }

    fn create(
        &self,
        _out: &Output,
        _size: u64,
        _opts: &CreateOptions,
    ) -> Result<Box<dyn ImageWriter>> {
        Err(Error::unsupported("vdi images are not supported yet"))
    }
}

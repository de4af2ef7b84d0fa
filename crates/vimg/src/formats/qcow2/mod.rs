//! qcow2: not implemented yet (placeholder until its reader and writer land).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::{Format, OpenContext};
use crate::mapping::ImageReader;
use crate::options::OptionSpec;
use crate::output::Output;
use crate::storage::Storage;
use crate::writer::ImageWriter;
use crate::CreateOptions;

/// The qcow2 driver.
pub struct Driver;

impl crate::formats::Driver for Driver {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn probe(&self, head: &[u8], _storage: &dyn Storage) -> bool {
        head.starts_with(b"QFI\xfb")
    }

    fn open(&self, _storage: Arc<dyn Storage>, _ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        Err(Error::unsupported("qcow2 images are not supported yet"))
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
        Err(Error::unsupported("qcow2 images are not supported yet"))
    }
}

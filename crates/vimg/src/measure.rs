//! `vimg measure`: the bytes a new image needs, for an empty image of a given size or for
//! the content of an existing image. Each format computes its own figures
//! ([`crate::formats::Driver::measure`]; qcow2, raw and luks, as in qemu-img, and vhd and
//! vhdx); this module only gathers the inputs.

use crate::convert::check_create_options;
use crate::engine::ImageData;
use crate::error::{Error, Result};
use crate::formats::{registry, Format, Measure};
use crate::image::Image;
use crate::options::CreateOptions;

/// Measures a new `format` image with `opts`, either for `size` bytes of nothing or for the
/// content of `source` (flattened).
///
/// ```
/// use vimg::{CreateOptions, Format};
/// let m = vimg::measure(Format::Qcow2, &CreateOptions::new(), Some(1 << 30), None)?;
/// // An empty qcow2 needs its header and tables; a full one needs the whole gigabyte too.
/// assert!(m.required < 1 << 20);
/// assert!(m.fully_allocated > 1 << 30);
/// # Ok::<(), vimg::Error>(())
/// ```
pub fn measure(
    format: Format,
    opts: &CreateOptions,
    size: Option<u64>,
    source: Option<&Image>,
) -> Result<Measure> {
    let driver = registry::driver(format);
    // A format with no create options is one vimg only reads (luks creates without
    // declaring the capability).
    if driver.create_options().is_empty() {
        return Err(Error::unsupported(format!(
            "Format driver '{}' does not support image creation",
            format.name()
        )));
    }
    check_create_options(format, opts)?;
    match (size, source) {
        (Some(size), None) => driver.measure(size, opts, None),
        (None, Some(img)) => {
            let data = ImageData::new(img);
            let size = opts.get_size("size")?.unwrap_or(img.virtual_size());
            driver.measure(size, opts, Some(&data))
        }
        _ => Err(Error::invalid_argument(
            "Either --size N or one filename must be specified.",
        )),
    }
}

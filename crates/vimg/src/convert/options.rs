//! [`ConvertOptions`]: what [`convert`](super::convert) is asked to do (its own file, so
//! that the convert submodules read the settings without depending on the engine-driving
//! code in `convert.rs`).

use std::sync::Arc;

use crate::checksum::HashAlg;
use crate::engine::CopyOptions;
use crate::formats::Format;
use crate::gate::ExternalPolicy;
use crate::options::CreateOptions;
use crate::output::{OutputMode, WriteCounter};

/// Settings for [`convert`](super::convert): [`ConvertOptions::new`] gives qemu-img's defaults for a
/// format; set the fields that differ.
///
/// ```
/// use std::sync::Arc;
/// use vimg::{ConvertOptions, Format, HashAlg};
/// let mut opts = ConvertOptions::new(Format::Vmdk);
/// opts.create.parse_into("subformat=streamOptimized")?; // qemu-img's -o
/// opts.checksum = Some(HashAlg::Sha256);
/// opts.copy.workers = 2;
/// opts.copy.progress = Some(Arc::new(|p: vimg::Progress| eprintln!("{}/{}", p.done, p.total)));
/// # Ok::<(), vimg::Error>(())
/// ```
#[non_exhaustive]
pub struct ConvertOptions {
    /// The target format.
    pub format: Format,
    /// `-o` options (and `-c`).
    pub create: CreateOptions,
    /// Engine settings.
    pub copy: CopyOptions,
    /// Atomic (default), in place (`-n`) or stdout.
    pub output_mode: OutputMode,
    /// A checksum of the output file's bytes to compute (see [`ConvertReport::checksum`](super::ConvertReport::checksum)).
    pub checksum: Option<HashAlg>,
    /// Make the output durable before it is renamed into place (default `true`); `false` is
    /// qemu-img's `-t unsafe` (see [`Output::with_sync`](crate::output::Output::with_sync)).
    pub sync: bool,
    /// The existing destination already reads as zeros (qemu-img's `--target-is-zero`):
    /// zero ranges of the image are then not written to a destination written in place (a
    /// block device, `-n`). A new file always starts zero. Default `false`.
    pub target_is_zero: bool,
    /// Open a block device destination with `O_DIRECT` (`-t none`/`directsync`).
    pub direct: bool,
    /// Counts what reaches a destination written in place, so the caller can say how far
    /// a failed or interrupted run got.
    pub counter: Option<Arc<WriteCounter>>,
    /// How files named inside an existing target (`-n`: its backing chain) pass the gate.
    /// Default: [`ExternalPolicy::default`].
    pub target_policy: ExternalPolicy,
    /// Copy the source's persistent bitmaps into the output (qemu-img's `--bitmaps`; see
    /// [`bitmaps`](super::bitmaps)). Default `false`.
    pub bitmaps: bool,
    /// With [`ConvertOptions::bitmaps`]: skip inconsistent bitmaps with a warning instead of
    /// refusing (`--skip-broken-bitmaps`). Default `false`.
    pub skip_broken_bitmaps: bool,
    /// The secret id (`encrypt.key-secret`) of an existing encrypted target written in
    /// place (`-n`; qemu-img's `--target-image-opts ...,encrypt.key-secret=ID`). Default
    /// `None`.
    pub target_key_secret: Option<String>,
}

impl ConvertOptions {
    /// Defaults for converting to `format`.
    pub fn new(format: Format) -> Self {
        ConvertOptions {
            format,
            create: CreateOptions::new(),
            copy: CopyOptions::default(),
            output_mode: OutputMode::Atomic,
            checksum: None,
            sync: true,
            target_is_zero: false,
            direct: false,
            counter: None,
            target_policy: ExternalPolicy::default(),
            bitmaps: false,
            skip_broken_bitmaps: false,
            target_key_secret: None,
        }
    }
}

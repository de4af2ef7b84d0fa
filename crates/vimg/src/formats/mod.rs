//! The formats: one folder each, all answering the same [`Driver`] trait.
//!
//! A driver probes content, opens a reader ([`crate::mapping::ImageReader`]) and creates a
//! writer ([`crate::writer::ImageWriter`]). Nothing outside `formats/` knows any on-disk
//! layout.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::gate::{self, ExternalPolicy};
use crate::mapping::ImageReader;
use crate::options::{CreateOptions, OptionSpec};
use crate::output::{Output, OutputMode};
use crate::storage::{FileStorage, Storage};
use crate::writer::ImageWriter;

pub(crate) mod block_table;
pub mod bochs;
pub mod cloop;
pub mod cluster_crypt;
pub(crate) mod cluster_tables;
pub mod dmg;
mod format;
pub(crate) mod inplace_file;
pub mod luks;
pub mod parallels;
pub mod qcow;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod registry;
pub mod unread;
pub mod updater;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use format::Format;

/// What a reader needs to open the files an image names.
#[derive(Clone, Debug)]
pub struct OpenContext {
    /// The image's own path (`None` for in-memory or piped input).
    pub path: Option<PathBuf>,
    /// The external-file policy.
    pub policy: ExternalPolicy,
    /// The `key-secret` (luks) or `encrypt.key-secret` (qcow2) the user's image options
    /// name: the id of a [`crate::secret`].
    pub key_secret: Option<String>,
    /// Open for metadata only (qemu's `BDRV_O_NO_IO`, as `info` opens): an encrypted image
    /// opens without its secret and refuses reads.
    pub metadata_only: bool,
    /// Set by the LUKS wrapper: the qcow2 reader may open a LUKS-encrypted image (the
    /// wrapper decrypts its data clusters).
    pub(crate) qcow2_luks: bool,
    /// Set by the legacy AES wrapper (formats/qcow2/aes.rs): the qcow2 reader may open an
    /// AES-encrypted image.
    pub(crate) legacy_aes: bool,
    /// The name of the quorum node the image stands on ([`crate::quorum`]), which has no
    /// folder: relative names inside the image cannot be resolved.
    pub(crate) quorum_node: Option<String>,
    /// Set by `check -r all` (formats/qcow2/check_snapshots.rs): the qcow2 reader takes
    /// snapshot table entries with more extra data than QEMU's limit (it reads only the
    /// first 1024 bytes of it, as the repair keeps them) instead of refusing the image.
    pub(crate) qcow2_snapshot_repair: bool,
}

impl OpenContext {
    /// A context for an image at `path`.
    pub fn new(path: Option<&Path>, policy: ExternalPolicy) -> OpenContext {
        OpenContext {
            path: path.map(Path::to_path_buf),
            policy,
            key_secret: None,
            metadata_only: false,
            qcow2_luks: false,
            legacy_aes: false,
            quorum_node: None,
            qcow2_snapshot_repair: false,
        }
    }

    /// Resolves `name` (found in `field`) through the gate and opens it read-only.
    pub fn open_external(&self, field: &str, name: &str) -> Result<Arc<dyn Storage>> {
        if self.quorum_node.is_some() && crate::quorum::dirname::needs_dirname(name) {
            return Err(Error::invalid(crate::quorum::dirname::NO_DIRNAME));
        }
        self.refuse_backslash_dotdot(field, name)?;
        let (path, file) = gate::open(self.path.as_deref(), field, name, self.policy)?;
        let s = FileStorage::from_file(file, &path).map_err(|e| {
            Error::io(
                format_args!(
                    "stat '{}' named by {field}",
                    crate::escape::escape_control(name)
                ),
                e,
            )
        })?;
        Ok(Arc::new(s))
    }

    /// Resolves `name` through the gate without opening it.
    pub fn resolve(&self, field: &str, name: &str) -> Result<PathBuf> {
        self.refuse_backslash_dotdot(field, name)?;
        gate::resolve(self.path.as_deref(), field, name, self.policy)
    }

    /// A name that climbs with `..` between backslashes (`sub/..\..\x`, Windows
    /// separators) is refused by name, not looked up as a file literally called `..\..\x`
    /// (which would fail as "No such file" and hide what the image tried). Trusted images
    /// (`--allow-external`) keep the lookup.
    fn refuse_backslash_dotdot(&self, field: &str, name: &str) -> Result<()> {
        if self.policy == ExternalPolicy::Allow || !name.contains('\\') {
            return Ok(());
        }
        if name.split(['/', '\\']).any(|c| c == "..") {
            return Err(Error::msg(
                crate::error::ErrorKind::UnsafeReference,
                format!(
                    "{field} names '{}', which leaves the image's folder through '..' written with backslashes (Windows separators); refused",
                    crate::escape::escape_control(name)
                ),
            ));
        }
        Ok(())
    }
}

/// Opens an image the user named for a new image (its backing file), probing its format as
/// the library opens any image, without its own backing chain. The library hands drivers one
/// through [`CreateOptions::open_named`], so a driver that must read its parent (vmdk: the
/// parent's CID) names no other driver.
pub type OpenNamed = fn(&Path) -> Result<Box<dyn ImageReader>>;

/// Whether a driver does something a command line can ask of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Support {
    /// It does.
    Yes,
    /// Refused as qemu-img refuses it, in qemu-img's words.
    No,
    /// qemu-img's driver does it, vimg's does not: refused with this reason.
    NotInVimg(&'static str),
}

/// An option as qemu-img create prints it on its `Formatting ...` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Printed {
    /// The option's name.
    pub name: &'static str,
    /// What qemu-img prints when the option is not given (`None`: nothing).
    pub default: Option<&'static str>,
}

/// A [`Printed`] (for drivers' `const` tables).
pub const fn printed(name: &'static str, default: Option<&'static str>) -> Printed {
    Printed { name, default }
}

/// The `file` protocol's options in qemu-img's print order: what a format without options
/// of its own prints (raw).
pub const PROTOCOL_PRINTED: &[Printed] = &[
    printed("size", None),
    printed("nocow", None),
    printed("preallocation", None),
    printed("extent_size_hint", None),
];

/// The `file` protocol's `preallocation`, for formats whose driver qemu-img leaves it to:
/// accepted in its values, and the image comes out as without it (QEMU's vmdk and vdi
/// drivers create and truncate the file themselves, so nothing stays preallocated).
pub const FILE_PREALLOCATION: Choice = Choice {
    option: "preallocation",
    values: &["off", "falloc", "full"],
    default: "off",
    refusal: ChoiceRefusal::InvalidValue,
};

/// Checks `-o preallocation` against [`FILE_PREALLOCATION`] with qemu-img's words: a mode
/// QEMU knows but the file protocol refuses (`metadata`) is "Unsupported", anything else
/// outside the choices an invalid value.
pub fn check_file_preallocation(opts: &CreateOptions) -> Result<()> {
    if let Some(v @ "metadata") = opts.get_str(FILE_PREALLOCATION.option) {
        return Err(Error::invalid_argument(format!(
            "Unsupported preallocation mode: {v}"
        )));
    }
    FILE_PREALLOCATION.value(opts).map(|_| ())
}

/// How qemu-img's driver words a value outside a [`Choice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChoiceRefusal {
    /// `Parameter 'NAME' does not accept value 'VALUE'` (a QAPI enum; NAME as qemu spells
    /// it, which may differ from the `-o` key).
    DoesNotAccept(&'static str),
    /// `invalid parameter value: VALUE`.
    InvalidValue,
}

/// A create option that takes one of a fixed set of values (subformats, preallocation
/// modes...), declared by the driver: the driver reads it through
/// [`Capabilities::choice`], and callers list the choices from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The `-o` key.
    pub option: &'static str,
    /// The values accepted, as qemu-img spells them.
    pub values: &'static [&'static str],
    /// The value used when the option is not given.
    pub default: &'static str,
    /// How a value outside `values` is refused.
    pub refusal: ChoiceRefusal,
}

impl Choice {
    /// The value `opts` gives (or the default), refused in qemu-img's words when it is not
    /// one of the choices.
    pub fn value<'a>(&self, opts: &'a CreateOptions) -> Result<&'a str> {
        let v = opts.get_str(self.option).unwrap_or(self.default);
        if self.values.contains(&v) {
            return Ok(v);
        }
        Err(Error::invalid_argument(match self.refusal {
            ChoiceRefusal::DoesNotAccept(name) => {
                format!("Parameter '{name}' does not accept value '{v}'")
            }
            ChoiceRefusal::InvalidValue => format!("invalid parameter value: {v}"),
        }))
    }
}

/// Whether a driver writes its images in one forward pass, so they can go to a pipe,
/// stdout or a FIFO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Streaming {
    /// Always.
    Yes,
    /// Never: the reason (the format's tables precede its data, or the header is last).
    No(&'static str),
    /// Only when `option` takes one of `values`; otherwise refused with `otherwise`.
    When {
        /// The `-o` key.
        option: &'static str,
        /// The values that make the image streamable.
        values: &'static [&'static str],
        /// The reason given for any other value.
        otherwise: &'static str,
    },
}

impl Streaming {
    /// Refuses, with the declared reason, an image `opts` describes that cannot be written
    /// in one forward pass.
    pub fn check(&self, opts: &CreateOptions) -> Result<()> {
        match *self {
            Streaming::Yes => Ok(()),
            Streaming::No(why) => Err(Error::unsupported(why)),
            Streaming::When {
                option,
                values,
                otherwise,
            } => match opts.get_str(option) {
                Some(v) if values.contains(&v) => Ok(()),
                _ => Err(Error::unsupported(otherwise)),
            },
        }
    }
}

/// What a driver can do, declared once ([`Driver::capabilities`]). The library checks a
/// request against it before it calls the driver ([`Capabilities::check`]); a command line
/// asks it instead of keeping tables of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// The driver writes new images (`create`, `convert -O`).
    pub create: bool,
    /// Compressed output (`convert -c`).
    pub compressed: Support,
    /// Writing into an existing image (`convert -n`).
    pub in_place: Support,
    /// The format records a backing file (`-b`, `-B`, `-o backing_file=`).
    pub backing_file: bool,
    /// Persistent bitmaps (`convert --bitmaps`).
    pub bitmaps: bool,
    /// The create options in the order qemu-img prints them on its `Formatting ...` line
    /// (its driver's option list, measured on qemu-img 10.0.2), with the defaults it prints;
    /// options given and not listed follow in name order.
    pub printed: &'static [Printed],
    /// The create options that take one of a fixed set of values.
    pub choices: &'static [Choice],
    /// Whether the image can be written in one forward pass (stdout, a pipe, a FIFO).
    pub streaming: Streaming,
}

impl Capabilities {
    /// A format vimg reads and never writes.
    pub const READ_ONLY: Capabilities = Capabilities {
        create: false,
        compressed: Support::No,
        in_place: Support::No,
        backing_file: false,
        bitmaps: false,
        printed: PROTOCOL_PRINTED,
        choices: &[],
        streaming: Streaming::No("this format is not written by vimg"),
    };

    /// Refuses what `opts` (`-c`) and `mode` (`-n`) ask of a format that cannot do it,
    /// before anything is created: qemu-img's plain refusal where qemu-img refuses too
    /// ([`Error::refusal`]), else vimg's reason. A format that writes nothing is left to
    /// [`Driver::create`]'s own refusal.
    pub fn check(&self, format: Format, opts: &CreateOptions, mode: OutputMode) -> Result<()> {
        if !self.create {
            return Ok(());
        }
        let refuse = |s: Support, plain: &str| match s {
            Support::Yes => Ok(()),
            Support::No => Err(Error::refusal(ErrorKind::InvalidArgument, plain)),
            Support::NotInVimg(why) => Err(Error::unsupported(why)),
        };
        if opts.compress {
            refuse(
                self.compressed,
                "Compression not supported for this file format",
            )?;
        }
        if mode == OutputMode::InPlace {
            refuse(
                self.in_place,
                &format!(
                    "writing into an existing {} image (convert -n) is not supported",
                    format.name()
                ),
            )?;
        }
        if mode == OutputMode::Stdout {
            self.check_stream(opts)?;
        }
        Ok(())
    }

    /// The value `opts` gives the declared choice `option` (or its default), refused in
    /// qemu-img's words when it is not one of the choices: how a driver reads such an option,
    /// so the declaration is the one list of what it accepts.
    pub fn choice<'a>(&self, option: &str, opts: &'a CreateOptions) -> Result<&'a str> {
        match self.choices.iter().find(|c| c.option == option) {
            Some(c) => c.value(opts),
            None => Err(Error::invalid_argument(format!(
                "'{option}' is not an option with declared choices"
            ))),
        }
    }

    /// Refuses an image `opts` describes that this format cannot write in one forward pass
    /// (stdout, checked before create). A FIFO or character device is left to the writer,
    /// which refuses after opening it, so a reader waiting on a FIFO sees its end instead of
    /// waiting forever. A format that writes nothing is left to [`Driver::create`]'s own
    /// refusal.
    pub fn check_stream(&self, opts: &CreateOptions) -> Result<()> {
        if !self.create {
            return Ok(());
        }
        self.streaming.check(opts)
    }
}

/// One format's entry points.
pub trait Driver: Sync {
    /// The format.
    fn format(&self) -> Format;

    /// True if `head` (the first bytes of the source, up to 64 KiB) and, where the format
    /// keeps its signature at the end, `storage` look like this format.
    fn probe(&self, head: &[u8], storage: &dyn Storage) -> bool;

    /// Opens a reader over `storage`.
    fn open(&self, storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn ImageReader>>;

    /// The options `create` accepts (besides `size`, which every format takes). The
    /// default: none (a format vimg only reads).
    fn create_options(&self) -> &'static [OptionSpec] {
        &[]
    }

    /// What the driver can do. The default: a format vimg only reads.
    fn capabilities(&self) -> Capabilities {
        Capabilities::READ_ONLY
    }

    /// Creates a writer for an image of `size` bytes in `out`. Options have been checked
    /// against [`Driver::create_options`]. In [`crate::OutputMode::InPlace`] (`convert -n`)
    /// a writer either opens the existing image or refuses with an "unsupported" error.
    /// A read-only format keeps the default: qemu-img's refusal.
    fn create(
        &self,
        out: &Output,
        size: u64,
        opts: &CreateOptions,
    ) -> Result<Box<dyn ImageWriter>> {
        let _ = (out, size, opts);
        Err(Error::unsupported(format!(
            "Format driver '{}' does not support image creation",
            self.format().name()
        )))
    }

    /// `measure`: the bytes a new image of `size` bytes with `opts` needs. `data` describes
    /// the source's allocated data (`None` for `measure --size`, an empty image).
    fn measure(
        &self,
        size: u64,
        opts: &CreateOptions,
        data: Option<&dyn DataSummary>,
    ) -> Result<Measure> {
        let _ = (size, opts, data);
        Err(Error::unsupported(format!(
            "Block driver '{}' does not support size measurement",
            self.format().name()
        )))
    }
}

/// What `measure` needs to know about a source image's data.
pub trait DataSummary {
    /// How many `unit`-aligned units of the (flattened) source hold data, i.e. contain a
    /// byte that is neither unallocated nor explicitly zero. `unit` is a power of two.
    fn data_units(&self, unit: u64) -> Result<u64>;

    /// The source's virtual size.
    fn virtual_size(&self) -> u64;

    /// The top image's persistent bitmaps (`ImageReader::persistent_bitmaps`).
    fn persistent_bitmaps(&self) -> Option<Vec<(String, u64)>> {
        None
    }
}

/// The answer of `measure`, with qemu-img's JSON keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Measure {
    /// Bytes needed for the source's data plus metadata.
    pub required: u64,
    /// Bytes needed if every cluster were allocated.
    pub fully_allocated: u64,
    /// qcow2 only: bytes for persistent bitmaps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<u64>,
}

#[cfg(test)]
mod inplace_fuzz_tests;

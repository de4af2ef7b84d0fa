//! The formats: one folder each, all answering the same [`Driver`] trait.
//!
//! A driver probes content, opens a reader ([`crate::mapping::ImageReader`]) and creates a
//! writer ([`crate::writer::ImageWriter`]). Nothing outside `formats/` knows any on-disk
//! layout.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::gate::{self, ExternalPolicy};
use crate::mapping::ImageReader;
use crate::options::{CreateOptions, OptionSpec};
use crate::output::Output;
use crate::storage::{FileStorage, Storage};
use crate::writer::ImageWriter;

pub mod bochs;
pub mod cloop;
pub mod dmg;
pub mod luks;
pub mod parallels;
pub mod qcow;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod unread;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

/// An image format, named as qemu-img names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Plain bytes.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware virtual disk.
    Vmdk,
    /// Microsoft VHD (qemu-img calls it `vpc`).
    Vpc,
    /// Microsoft VHDX.
    Vhdx,
    /// VirtualBox disk image.
    Vdi,
    /// Parallels / Virtuozzo expanding image (the image service's `ploop`).
    Parallels,
    /// QEMU enhanced disk.
    Qed,
    /// QEMU copy-on-write version 1.
    Qcow,
    /// LUKS encrypted volume.
    Luks,
    /// Apple disk image (UDIF).
    Dmg,
    /// Bochs growing image.
    Bochs,
    /// cloop compressed loop image.
    Cloop,
}

impl Format {
    /// Every format, in probe order.
    pub const ALL: [Format; 13] = [
        Format::Qcow2,
        Format::Vmdk,
        Format::Vhdx,
        Format::Vpc,
        Format::Vdi,
        Format::Parallels,
        Format::Qed,
        Format::Qcow,
        Format::Luks,
        Format::Bochs,
        Format::Cloop,
        Format::Dmg,
        Format::Raw,
    ];

    /// qemu-img's name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vpc => "vpc",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
            Format::Parallels => "parallels",
            Format::Qed => "qed",
            Format::Qcow => "qcow",
            Format::Luks => "luks",
            Format::Dmg => "dmg",
            Format::Bochs => "bochs",
            Format::Cloop => "cloop",
        }
    }

    /// Parses a format name; `vhd` is accepted for `vpc`.
    pub fn from_name(name: &str) -> Option<Format> {
        Some(match name {
            "raw" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vmdk" => Format::Vmdk,
            "vpc" | "vhd" => Format::Vpc,
            "vhdx" => Format::Vhdx,
            "vdi" => Format::Vdi,
            "parallels" => Format::Parallels,
            "qed" => Format::Qed,
            "qcow" => Format::Qcow,
            "luks" => Format::Luks,
            "dmg" => Format::Dmg,
            "bochs" => Format::Bochs,
            "cloop" => Format::Cloop,
            _ => return None,
        })
    }

    /// True when qemu-img info shows a `dirty-flag` for this format (QEMU's driver answers
    /// `bdrv_get_info`); parallels, bochs, cloop and dmg do not.
    pub fn reports_dirty_flag(self) -> bool {
        !matches!(
            self,
            Format::Parallels | Format::Bochs | Format::Cloop | Format::Dmg
        )
    }

    /// The driver for this format.
    pub fn driver(self) -> &'static dyn Driver {
        match self {
            Format::Raw => &raw::Driver,
            Format::Qcow2 => &qcow2::Driver,
            Format::Vmdk => &vmdk::Driver,
            Format::Vpc => &vhd::Driver,
            Format::Vhdx => &vhdx::Driver,
            Format::Vdi => &vdi::Driver,
            Format::Parallels => &parallels::Driver,
            Format::Qed => &qed::Driver,
            Format::Qcow => &qcow::Driver,
            Format::Luks => &luks::Driver,
            Format::Dmg => &dmg::Driver,
            Format::Bochs => &bochs::Driver,
            Format::Cloop => &cloop::Driver,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = Error;

    fn from_str(s: &str) -> Result<Format> {
        Format::from_name(s)
            .ok_or_else(|| Error::invalid_argument(format!("Unknown file format '{s}'")))
    }
}

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
        }
    }

    /// Resolves `name` (found in `field`) through the gate and opens it read-only.
    pub fn open_external(&self, field: &str, name: &str) -> Result<Arc<dyn Storage>> {
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

/// One format's entry points.
pub trait Driver: Sync {
    /// The format.
    fn format(&self) -> Format;

    /// True if `head` (the first bytes of the source, up to 64 KiB) and, where the format
    /// keeps its signature at the end, `storage` look like this format.
    fn probe(&self, head: &[u8], storage: &dyn Storage) -> bool;

    /// Opens a reader over `storage`.
    fn open(&self, storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn ImageReader>>;

    /// The options `create` accepts (besides `size`, which every format takes).
    fn create_options(&self) -> &'static [OptionSpec];

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

/// The formats whose probe matches, in probe order. Raw never probes; an empty list means
/// raw.
pub fn probe_all(head: &[u8], storage: &dyn Storage) -> Vec<Format> {
    Format::ALL
        .iter()
        .copied()
        .filter(|f| *f != Format::Raw && f.driver().probe(head, storage))
        .collect()
}

/// Every option `format` accepts, `size` included.
pub fn all_options(format: Format) -> Vec<OptionSpec> {
    let own = format.driver().create_options();
    let mut v = Vec::with_capacity(own.len() + 1);
    // A format may word `size` its own way (vhdx: "max of 64TB").
    if !own.iter().any(|o| o.name == "size") {
        v.push(crate::options::SIZE_OPTION);
    }
    v.extend_from_slice(own);
    // The protocol's hints, accepted under every format as qemu-img accepts them.
    for p in &crate::options::PROTOCOL_OPTIONS[..2] {
        if !v.iter().any(|o| o.name == p.name) {
            v.push(*p);
        }
    }
    v
}

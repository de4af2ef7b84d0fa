//! [`Format`]: an image format as a name (qemu-img's), nothing more. Which driver answers
//! for it is the registry's business ([`super::registry`]).

use std::fmt;

use serde::Serialize;

use crate::error::{Error, Result};

/// An image format, named as qemu-img names it.
///
/// ```
/// use vimg::Format;
/// let f: Format = "vpc".parse()?;
/// assert_eq!((f, f.name()), (Format::Vpc, "vpc"));
/// assert_eq!(Format::from_name("qcow2"), Some(Format::Qcow2));
/// # Ok::<(), vimg::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
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

    /// True for a format whose bytes are the guest's bytes (raw): a stream of it reads in
    /// order, its size is the file's, and a device written with it needs no zeroing first.
    pub fn is_plain(self) -> bool {
        self == Format::Raw
    }

    /// How OpenStack Glance knows this format: `Ok(its disk_format)`, or `Err(why)` it takes
    /// no image of it.
    pub fn glance_disk_format(self) -> std::result::Result<&'static str, &'static str> {
        match self {
            Format::Raw => Ok("raw"),
            Format::Qcow2 => Ok("qcow2"),
            Format::Vmdk => Ok("vmdk"),
            Format::Vpc => Ok("vhd"),
            Format::Vhdx => Ok("vhdx"),
            Format::Vdi => Ok("vdi"),
            Format::Parallels => Ok("ploop"),
            Format::Qed => Err("OpenStack's format inspector refuses every QED image (QEMU would follow a backing file or feature named inside it), and Glance has no 'qed' disk format"),
            Format::Qcow | Format::Luks | Format::Dmg | Format::Bochs | Format::Cloop => {
                Err("Glance has no disk format for it; convert it to raw or qcow2 first")
            }
        }
    }

    /// True when qemu-img info shows a `dirty-flag` for this format (QEMU's driver answers
    /// `bdrv_get_info`); parallels, bochs, cloop and dmg do not.
    pub fn reports_dirty_flag(self) -> bool {
        !matches!(
            self,
            Format::Parallels | Format::Bochs | Format::Cloop | Format::Dmg
        )
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

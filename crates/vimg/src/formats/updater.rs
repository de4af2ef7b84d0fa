//! The one entry for changing an existing image in place ([`open`]):
//! an [`Updater`] per format that vimg changes in place, which declares what it can do
//! ([`UpdateCaps`]) so that callers (the in-place subcommands, [`crate::inplace`]) never
//! match formats themselves, and refusals are worded once, here.

use std::path::Path;

use super::qcow2::{DataWriter, Qcow2Update};
use super::raw::update::RawUpdate;
use super::Format;
use crate::error::{Error, ErrorKind, Result};
use crate::gate::ExternalPolicy;
use crate::image::Image;

/// What an [`Updater`] can change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpdateCaps {
    /// `check -r`.
    pub repair: bool,
    /// `resize`.
    pub resize: bool,
    /// `amend -o`.
    pub amend: bool,
    /// The backing file reference (`rebase`).
    pub backing: bool,
    /// Guest data (`commit` into it, `rebase` copying into it).
    pub data: bool,
}

/// An in-place operation, for [`require`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateOp {
    /// `check -r`.
    Repair,
    /// `resize`.
    Resize,
    /// `amend -o`.
    Amend,
    /// The backing file reference.
    Backing,
    /// Guest data.
    Data,
}

impl UpdateCaps {
    /// True when `op` is among these capabilities.
    pub fn allows(&self, op: UpdateOp) -> bool {
        match op {
            UpdateOp::Repair => self.repair,
            UpdateOp::Resize => self.resize,
            UpdateOp::Amend => self.amend,
            UpdateOp::Backing => self.backing,
            UpdateOp::Data => self.data,
        }
    }
}

/// Refuses `op` on `format` when its updater cannot do it, in one wording (qemu-img's
/// where qemu-img refuses too).
pub fn require(format: Format, op: UpdateOp) -> Result<()> {
    if caps(format).allows(op) {
        return Ok(());
    }
    let able: Vec<&str> = Format::ALL
        .iter()
        .filter(|f| caps(**f).allows(op))
        .map(|f| f.name())
        .collect();
    let only = able.join(" and ");
    let name = format.name();
    let msg = match op {
        UpdateOp::Repair => format!("vimg repairs {only} images only, not {name}"),
        UpdateOp::Resize => format!("vimg cannot resize {name} images (only {only})"),
        UpdateOp::Amend => format!("Format driver '{name}' does not support option amendment"),
        // qemu-img's words for formats that cannot have a backing file.
        UpdateOp::Backing if format == Format::Raw => "Operation not supported".to_string(),
        UpdateOp::Backing => {
            format!("vimg changes the backing file of {only} images only, not {name}")
        }
        UpdateOp::Data => format!("vimg writes guest data into {only} images only, not {name}"),
    };
    Err(Error::refusal(ErrorKind::Unsupported, msg))
}

/// An image open for changing in place.
#[derive(Debug)]
#[non_exhaustive]
pub enum Updater {
    /// qcow2 ([`Qcow2Update`]).
    Qcow2(Box<Qcow2Update>),
    /// raw ([`RawUpdate`]).
    Raw(RawUpdate),
}

/// Opens `path` (of `format`, already known) for changing in place; files the image names
/// go through the gate under `policy`. Formats vimg does not change in place are refused
/// here, in one wording.
pub fn open(path: &Path, format: Format, policy: ExternalPolicy) -> Result<Updater> {
    match format {
        Format::Qcow2 => Ok(Updater::Qcow2(Box::new(Qcow2Update::open(path, policy)?))),
        Format::Raw => Ok(Updater::Raw(RawUpdate::open(path)?)),
        f => Err(Error::refusal(
            ErrorKind::Unsupported,
            format!("vimg does not change {} images in place", f.name()),
        )),
    }
}

/// The capabilities of `format`'s updater (none for formats without one).
pub fn caps(format: Format) -> UpdateCaps {
    match format {
        Format::Qcow2 => UpdateCaps {
            repair: true,
            resize: true,
            amend: true,
            backing: true,
            data: true,
        },
        Format::Raw => UpdateCaps {
            repair: false,
            resize: true,
            amend: false,
            backing: false,
            data: true,
        },
        _ => UpdateCaps {
            repair: false,
            resize: false,
            amend: false,
            backing: false,
            data: false,
        },
    }
}

impl Updater {
    /// The format.
    pub fn format(&self) -> Format {
        match self {
            Updater::Qcow2(_) => Format::Qcow2,
            Updater::Raw(_) => Format::Raw,
        }
    }

    /// What this updater can change.
    pub fn caps(&self) -> UpdateCaps {
        caps(self.format())
    }

    /// The qcow2 updater, for qcow2-only operations (`check -r`, `amend`).
    pub fn qcow2(&mut self) -> Option<&mut Qcow2Update> {
        match self {
            Updater::Qcow2(q) => Some(q),
            Updater::Raw(_) => None,
        }
    }

    /// The (device, inode) of the file open for writing.
    pub fn identity(&self) -> Result<(u64, u64)> {
        match self {
            Updater::Qcow2(q) => q.identity(),
            Updater::Raw(r) => r.identity(),
        }
    }

    /// The virtual size.
    pub fn virtual_size(&self) -> Result<u64> {
        match self {
            Updater::Qcow2(q) => Ok(q.header().size),
            Updater::Raw(r) => r.virtual_size(),
        }
    }

    /// Grows or shrinks the virtual size.
    pub fn resize(&mut self, size: u64, prealloc: super::qcow2::Prealloc) -> Result<()> {
        match self {
            Updater::Qcow2(q) => q.resize(size, prealloc),
            Updater::Raw(r) => {
                let p = r.path().to_path_buf();
                super::raw::update::resize(&p, size, prealloc)
            }
        }
    }

    /// `amend -o` (qcow2's options).
    pub fn amend(&mut self, a: super::qcow2::Amend) -> Result<()> {
        match self {
            Updater::Qcow2(q) => q.amend(a),
            _ => require(self.format(), UpdateOp::Amend),
        }
    }

    /// `check -r`.
    pub fn repair(&mut self, mode: super::qcow2::Repair) -> Result<super::qcow2::RepairReport> {
        match self {
            Updater::Qcow2(q) => q.repair(mode),
            _ => Err(require(self.format(), UpdateOp::Repair)
                .err()
                .unwrap_or_else(|| Error::unsupported("repair"))),
        }
    }

    /// Points the image at another backing file (`Some((name, format))`, stored as given)
    /// or at none, changing nothing else. qemu-img's refusal for formats without one.
    pub fn set_backing(&mut self, backing: Option<(&str, &str)>) -> Result<()> {
        match self {
            Updater::Qcow2(q) => q.set_backing(backing),
            Updater::Raw(_) => require(Format::Raw, UpdateOp::Backing),
        }
    }

    /// Opens the image for guest-data writes.
    pub fn data(&mut self) -> Result<DataTarget<'_>> {
        match self {
            Updater::Qcow2(q) => Ok(DataTarget::Qcow2(q.data_writer()?)),
            Updater::Raw(r) => Ok(DataTarget::Raw(r)),
        }
    }
}

/// Guest-data writes into an [`Updater`]'s image.
#[derive(Debug)]
pub enum DataTarget<'a> {
    /// qcow2: cluster allocation in QEMU's order.
    Qcow2(DataWriter<'a>),
    /// raw: in place.
    Raw(&'a mut RawUpdate),
}

impl DataTarget<'_> {
    /// Writes `data` at guest offset `off`; `backing` (the image's backing chain) supplies
    /// the rest of partly written clusters.
    pub fn write_at(&mut self, off: u64, data: &[u8], backing: Option<&Image>) -> Result<()> {
        match self {
            DataTarget::Qcow2(w) => w.write_at(off, data, backing),
            DataTarget::Raw(r) => r.write_at(off, data),
        }
    }

    /// Makes `[off, off + len)` read as zeros: zero clusters where whole qcow2 clusters
    /// are covered, written zeros elsewhere.
    pub fn write_zeroes(&mut self, off: u64, len: u64, backing: Option<&Image>) -> Result<()> {
        let end = off + len;
        let mut pos = off;
        if let DataTarget::Qcow2(w) = self {
            let cs = w.cluster_size();
            let first = off.div_ceil(cs);
            let last = end / cs;
            if last > first {
                let head = first * cs - off;
                write_zero_bytes(self, off, head, backing)?;
                if let DataTarget::Qcow2(w) = self {
                    w.zero_clusters(first, last - first)?;
                }
                pos = last * cs;
            }
        }
        write_zero_bytes(self, pos, end - pos, backing)
    }

    /// Flushes.
    pub fn finish(self) -> Result<()> {
        match self {
            DataTarget::Qcow2(w) => w.finish(),
            DataTarget::Raw(r) => r.sync(),
        }
    }
}

fn write_zero_bytes(
    t: &mut DataTarget<'_>,
    off: u64,
    len: u64,
    backing: Option<&Image>,
) -> Result<()> {
    const STEP: u64 = 1 << 20;
    let zeros = vec![0u8; STEP.min(len) as usize];
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(STEP);
        t.write_at(pos, &zeros[..n as usize], backing)?;
        pos += n;
    }
    Ok(())
}

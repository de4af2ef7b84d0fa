//! The one entry for changing an existing image in place ([`open`]):
//! an [`Updater`] per format that vimg changes in place, which declares what it can do
//! ([`UpdateCaps`]) so that callers (the in-place subcommands, [`crate::inplace`]) never
//! match formats themselves, and refusals are worded once, here.

use std::path::Path;

use super::luks::update::LuksUpdate;
use super::parallels::update::ParallelsUpdate;
use super::qcow::update::QcowUpdate;
use super::qcow2::{BitmapOp, DataWriter, Qcow2Update, SNAPSHOT_NOT_FOUND};
use super::qed::update::{QedDataWriter, QedUpdate};
use super::raw::update::RawUpdate;
use super::vdi::update::VdiUpdate;
use super::vhd::update::VhdUpdate;
use super::vhdx::update::VhdxUpdate;
use super::vmdk::update::VmdkUpdate;
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
    /// Internal snapshots (`snapshot -c/-a/-d`).
    pub snapshots: bool,
    /// Persistent dirty bitmaps (`bitmap`).
    pub bitmaps: bool,
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
    /// `snapshot -c`.
    SnapshotCreate,
    /// `snapshot -a`.
    SnapshotApply,
    /// `snapshot -d`.
    SnapshotDelete,
    /// `bitmap` (persistent dirty bitmaps).
    Bitmap,
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
            UpdateOp::SnapshotCreate | UpdateOp::SnapshotApply | UpdateOp::SnapshotDelete => {
                self.snapshots
            }
            UpdateOp::Bitmap => self.bitmaps,
        }
    }
}

/// The formats whose updater can do `op`, in [`Format::ALL`]'s order.
pub fn able(op: UpdateOp) -> Vec<Format> {
    Format::ALL
        .iter()
        .copied()
        .filter(|f| caps(*f).allows(op))
        .collect()
}

/// Refuses `op` on `format` when its updater cannot do it, in one wording (qemu-img's
/// where qemu-img refuses too). For snapshots and bitmaps the message is qemu-img's reason
/// alone; the caller puts it after qemu-img's context ("Could not create snapshot 'x': ").
pub fn require(format: Format, op: UpdateOp) -> Result<()> {
    if caps(format).allows(op) {
        return Ok(());
    }
    let able: Vec<&str> = able(op).iter().map(|f| f.name()).collect();
    let only = able.join(" and ");
    let name = format.name();
    let msg = match op {
        UpdateOp::Repair => format!("vimg repairs {only} images only, not {name}"),
        // qemu-img's words for the drivers without truncate that vimg writes into.
        UpdateOp::Resize
            if matches!(
                format,
                Format::Vdi | Format::Vpc | Format::Parallels | Format::Vhdx | Format::Qcow
            ) =>
        {
            "Image format driver does not support resize".to_string()
        }
        UpdateOp::Resize => format!("vimg cannot resize {name} images (only {only})"),
        UpdateOp::Amend => format!("Format driver '{name}' does not support option amendment"),
        // qemu-img's words for formats that cannot have a backing file.
        UpdateOp::Backing if format == Format::Raw => "Operation not supported".to_string(),
        UpdateOp::Backing
            if matches!(
                format,
                Format::Vdi | Format::Vpc | Format::Parallels | Format::Vhdx
            ) =>
        {
            "Operation not supported".to_string()
        }
        // qemu-img's words: QEMU's vmdk driver cannot change the backing file.
        UpdateOp::Backing if format == Format::Vmdk => "Operation not supported".to_string(),
        // QEMU's qcow driver has no change_backing_file either.
        UpdateOp::Backing if format == Format::Qcow => "Operation not supported".to_string(),
        UpdateOp::Backing => {
            format!("vimg changes the backing file of {only} images only, not {name}")
        }
        UpdateOp::Data => format!("vimg writes guest data into {only} images only, not {name}"),
        // qemu-img's reasons for formats without internal snapshots or bitmaps.
        UpdateOp::SnapshotCreate | UpdateOp::Bitmap => "Operation not supported".to_string(),
        UpdateOp::SnapshotApply => "Block driver does not support snapshots".to_string(),
        UpdateOp::SnapshotDelete => SNAPSHOT_NOT_FOUND.to_string(),
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
    /// vdi ([`VdiUpdate`]): guest data.
    Vdi(VdiUpdate),
    /// vpc ([`VhdUpdate`]): guest data.
    Vpc(VhdUpdate),
    /// parallels ([`ParallelsUpdate`]): guest data and `check -r`.
    Parallels(ParallelsUpdate),
    /// qed ([`QedUpdate`]).
    Qed(Box<QedUpdate>),
    /// vmdk ([`VmdkUpdate`]): guest data.
    Vmdk(Box<VmdkUpdate>),
    /// vhdx ([`VhdxUpdate`]): guest data, BAT through the log, `check -r` (log replay).
    Vhdx(Box<VhdxUpdate>),
    /// qcow version 1 ([`QcowUpdate`]): guest data, emptied after `commit`.
    Qcow(Box<QcowUpdate>),
    /// luks ([`LuksUpdate`]): guest data, encrypted with the volume key.
    Luks(Box<LuksUpdate>),
}

/// Opens `path` (of `format`, already known) for changing in place; files the image names
/// go through the gate under `policy`. Formats vimg does not change in place are refused
/// here, in one wording.
pub fn open(path: &Path, format: Format, policy: ExternalPolicy) -> Result<Updater> {
    // blkdebug rules bound to the file are honoured by the qcow2 updater alone.
    if format != Format::Qcow2 && crate::blkdebug::writes::bound_to(path) {
        return Err(Error::refusal(
            ErrorKind::Unsupported,
            format!(
                "vimg writes through blkdebug rules only into qcow2 images, not {}",
                format.name()
            ),
        ));
    }
    match format {
        Format::Qcow2 => Ok(Updater::Qcow2(Box::new(Qcow2Update::open(path, policy)?))),
        Format::Raw => Ok(Updater::Raw(RawUpdate::open(path)?)),
        Format::Vdi => Ok(Updater::Vdi(VdiUpdate::open(path)?)),
        Format::Vpc => Ok(Updater::Vpc(VhdUpdate::open(path)?)),
        Format::Parallels => Ok(Updater::Parallels(ParallelsUpdate::open(path)?)),
        Format::Qed => Ok(Updater::Qed(Box::new(QedUpdate::open(path)?))),
        Format::Vmdk => Ok(Updater::Vmdk(Box::new(VmdkUpdate::open(path, policy)?))),
        Format::Vhdx => Ok(Updater::Vhdx(Box::new(VhdxUpdate::open(path, policy)?))),
        // An AES-encrypted image is refused here without its key, in qemu-img's words.
        Format::Qcow => Ok(Updater::Qcow(Box::new(QcowUpdate::open(path, None)?))),
        // A LUKS volume is refused here without its key, in qemu-img's words.
        Format::Luks => Ok(Updater::Luks(Box::new(LuksUpdate::open(path, None)?))),
        f => Err(Error::refusal(
            ErrorKind::Unsupported,
            format!("vimg does not change {} images in place", f.name()),
        )),
    }
}

/// [`open`] for an image whose key is the secret `key_secret` (`encrypt.key-secret`):
/// an AES-encrypted qcow (version 1) image is written through it; other formats open as
/// with [`open`] (and refuse encrypted images there).
pub fn open_with_secret(
    path: &Path,
    format: Format,
    policy: ExternalPolicy,
    key_secret: Option<&str>,
) -> Result<Updater> {
    match format {
        Format::Qcow => Ok(Updater::Qcow(Box::new(QcowUpdate::open(path, key_secret)?))),
        Format::Luks => Ok(Updater::Luks(Box::new(LuksUpdate::open(path, key_secret)?))),
        f => open(path, f, policy),
    }
}

/// [`open`] for `check -r`: where a format can repair tables its reader refuses (qed, as
/// QEMU's qed-check.c clears invalid offsets), the image opens for that alone.
pub fn open_for_repair(path: &Path, format: Format, policy: ExternalPolicy) -> Result<Updater> {
    match format {
        Format::Qed => Ok(Updater::Qed(Box::new(QedUpdate::open_for_repair(path)?))),
        f => open(path, f, policy),
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
            snapshots: true,
            bitmaps: true,
        },
        Format::Raw => UpdateCaps {
            repair: false,
            resize: true,
            amend: false,
            backing: false,
            data: true,
            snapshots: false,
            bitmaps: false,
        },
        // QEMU's vdi and vpc drivers write guest data and nothing else in place: no
        // truncate, no check with fix (vdi refuses it), no backing file.
        Format::Vdi | Format::Vpc => UpdateCaps {
            repair: false,
            resize: false,
            amend: false,
            backing: false,
            data: true,
            snapshots: false,
            bitmaps: false,
        },
        // parallels: check with fix too; no truncate through qemu-img resize, no
        // change_backing_file.
        Format::Parallels => UpdateCaps {
            repair: true,
            resize: false,
            amend: false,
            backing: false,
            data: true,
            snapshots: false,
            bitmaps: false,
        },
        // QEMU's qed driver: truncate (grow only), change_backing_file, check with fix,
        // writes; no amend, snapshots or bitmaps.
        Format::Qed => UpdateCaps {
            repair: true,
            resize: true,
            amend: false,
            backing: true,
            data: true,
            snapshots: false,
            bitmaps: false,
        },
        // QEMU's vmdk driver: writes (and a check without fix); no truncate, no
        // change_backing_file, no amend.
        Format::Vmdk => UpdateCaps {
            repair: false,
            resize: false,
            amend: false,
            backing: false,
            data: true,
            snapshots: false,
            bitmaps: false,
        },
        // QEMU's vhdx driver: writes and check (the log replayed on a read-write open); no
        // truncate, no backing file.
        Format::Vhdx => UpdateCaps {
            repair: true,
            resize: false,
            amend: false,
            backing: false,
            data: true,
            snapshots: false,
            bitmaps: false,
        },
        // QEMU's qcow driver: writes and make_empty; no truncate, no change_backing_file,
        // no check, no amend.
        Format::Qcow => UpdateCaps {
            repair: false,
            resize: false,
            amend: false,
            backing: false,
            data: true,
            snapshots: false,
            bitmaps: false,
        },
        // QEMU's crypto driver writes guest data (every sector encrypted; no holes). Its
        // resize and keyslot amend go through vimg's own LUKS paths (luks/update.rs,
        // luks/amend.rs), not this updater's.
        Format::Luks => UpdateCaps {
            repair: false,
            resize: false,
            amend: false,
            backing: false,
            data: true,
            snapshots: false,
            bitmaps: false,
        },
        _ => UpdateCaps {
            repair: false,
            resize: false,
            amend: false,
            backing: false,
            data: false,
            snapshots: false,
            bitmaps: false,
        },
    }
}

impl Updater {
    /// The format.
    pub fn format(&self) -> Format {
        match self {
            Updater::Qcow2(_) => Format::Qcow2,
            Updater::Raw(_) => Format::Raw,
            Updater::Vdi(_) => Format::Vdi,
            Updater::Vpc(_) => Format::Vpc,
            Updater::Parallels(_) => Format::Parallels,
            Updater::Qed(_) => Format::Qed,
            Updater::Vmdk(_) => Format::Vmdk,
            Updater::Vhdx(_) => Format::Vhdx,
            Updater::Qcow(_) => Format::Qcow,
            Updater::Luks(_) => Format::Luks,
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
            Updater::Raw(_) | Updater::Qed(_) => None,
            Updater::Vmdk(_) => None,
            Updater::Vdi(_) | Updater::Vpc(_) | Updater::Parallels(_) => None,
            Updater::Vhdx(_) => None,
            Updater::Qcow(_) => None,
            Updater::Luks(_) => None,
        }
    }

    /// The (device, inode) of the file open for writing.
    pub fn identity(&self) -> Result<(u64, u64)> {
        match self {
            Updater::Qcow2(q) => q.identity(),
            Updater::Raw(r) => r.identity(),
            Updater::Vdi(v) => v.identity(),
            Updater::Vpc(v) => v.identity(),
            Updater::Parallels(p) => p.identity(),
            Updater::Qed(q) => q.identity(),
            Updater::Vmdk(v) => v.identity(),
            Updater::Vhdx(v) => v.identity(),
            Updater::Qcow(q) => q.identity(),
            Updater::Luks(l) => l.identity(),
        }
    }

    /// The virtual size.
    pub fn virtual_size(&self) -> Result<u64> {
        match self {
            Updater::Qcow2(q) => Ok(q.header().size),
            Updater::Raw(r) => r.virtual_size(),
            Updater::Vdi(v) => Ok(v.virtual_size()),
            Updater::Vpc(v) => Ok(v.virtual_size()),
            Updater::Parallels(p) => Ok(p.virtual_size()),
            Updater::Qed(q) => Ok(q.header().image_size),
            Updater::Vmdk(v) => Ok(v.virtual_size()),
            Updater::Vhdx(v) => Ok(v.virtual_size()),
            Updater::Qcow(q) => Ok(q.virtual_size()),
            Updater::Luks(l) => Ok(l.virtual_size()),
        }
    }

    /// Grows to `size` with `prealloc`; `head` is the guest content of the cluster the
    /// current size ends in, up to that size (qcow2 copies it when it moves that cluster).
    pub fn resize_preallocated(
        &mut self,
        size: u64,
        prealloc: super::qcow2::Prealloc,
        head: Option<&[u8]>,
    ) -> Result<()> {
        match self {
            Updater::Qcow2(q) => q.resize_preallocated(size, prealloc, head),
            _ => self.resize(size, prealloc),
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
            Updater::Vdi(_) | Updater::Vpc(_) | Updater::Parallels(_) => {
                require(self.format(), UpdateOp::Resize)
            }
            Updater::Qed(q) => q.resize(size, prealloc),
            Updater::Vmdk(_) => require(self.format(), UpdateOp::Resize),
            Updater::Vhdx(_) => require(self.format(), UpdateOp::Resize),
            Updater::Qcow(_) => require(self.format(), UpdateOp::Resize),
            Updater::Luks(_) => require(self.format(), UpdateOp::Resize),
        }
    }

    /// Grows the virtual size so that the new area reads as zeros even where a longer
    /// backing file would show through (qemu-img's resize over a longer backing file).
    pub fn resize_zeroing(&mut self, size: u64) -> Result<()> {
        match self {
            Updater::Qcow2(q) => q.resize_zeroing(size),
            _ => Err(Error::unsupported(format!(
                "vimg does not zero the new area of a {} image over a longer backing file",
                self.format().name()
            ))),
        }
    }

    /// [`Updater::resize_zeroing`], with the guest content of the cluster the old size ends
    /// in (up to the old size) when it ends inside one (qcow2: see
    /// `Qcow2Update::resize_zeroing_with`).
    pub fn resize_zeroing_with(&mut self, size: u64, head: Option<&[u8]>) -> Result<()> {
        match self {
            Updater::Qcow2(q) => q.resize_zeroing_with(size, head),
            _ => self.resize_zeroing(size),
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
            Updater::Parallels(p) => p.repair(mode),
            Updater::Qed(q) => q.repair(),
            Updater::Vhdx(v) => v.repair(),
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
            Updater::Vdi(_) | Updater::Vpc(_) | Updater::Parallels(_) => {
                require(self.format(), UpdateOp::Backing)
            }
            Updater::Qed(q) => q.set_backing(backing),
            Updater::Vmdk(_) => require(self.format(), UpdateOp::Backing),
            Updater::Vhdx(_) => require(self.format(), UpdateOp::Backing),
            Updater::Qcow(_) => require(self.format(), UpdateOp::Backing),
            Updater::Luks(_) => require(self.format(), UpdateOp::Backing),
        }
    }

    /// Creates internal snapshot `name`, dated `date_sec`.`date_nsec` (Unix time).
    pub fn snapshot_create(&mut self, name: &str, date_sec: u32, date_nsec: u32) -> Result<()> {
        match self {
            Updater::Qcow2(q) => q.snapshot_create(name, date_sec, date_nsec),
            _ => require(self.format(), UpdateOp::SnapshotCreate),
        }
    }

    /// Reverts the image to internal snapshot `id_or_name`.
    pub fn snapshot_apply(&mut self, id_or_name: &str) -> Result<()> {
        match self {
            Updater::Qcow2(q) => q.snapshot_apply(id_or_name),
            _ => require(self.format(), UpdateOp::SnapshotApply),
        }
    }

    /// Deletes internal snapshot `name`.
    pub fn snapshot_delete(&mut self, name: &str) -> Result<()> {
        match self {
            Updater::Qcow2(q) => q.snapshot_delete(name),
            _ => require(self.format(), UpdateOp::SnapshotDelete),
        }
    }

    /// Applies `op` to persistent bitmap `name`.
    pub fn bitmap(&mut self, name: &str, op: &BitmapOp) -> Result<()> {
        match self {
            Updater::Qcow2(q) => q.bitmap(name, op),
            _ => require(self.format(), UpdateOp::Bitmap),
        }
    }

    /// [`Self::data`] for safe `rebase`, whose writes fill only what the image does not
    /// hold: qcow2 images with extended L2 entries are written in subclusters
    /// (`qcow2/update/extl2_write.rs`).
    pub fn rebase_data(&mut self) -> Result<DataTarget<'_>> {
        match self {
            Updater::Qcow2(q) => Ok(DataTarget::Qcow2(q.subcluster_writer()?)),
            _ => self.data(),
        }
    }

    /// Opens the image for guest-data writes.
    pub fn data(&mut self) -> Result<DataTarget<'_>> {
        match self {
            Updater::Qcow2(q) => Ok(DataTarget::Qcow2(q.data_writer()?)),
            Updater::Raw(r) => Ok(DataTarget::Raw(r)),
            Updater::Vdi(v) => {
                v.check_writable()?;
                Ok(DataTarget::Vdi(v))
            }
            Updater::Vpc(v) => Ok(DataTarget::Vpc(v)),
            Updater::Parallels(p) => {
                p.prepare_writes()?;
                Ok(DataTarget::Parallels(p))
            }
            Updater::Qed(q) => Ok(DataTarget::Qed(q.data_writer()?)),
            Updater::Vmdk(v) => Ok(DataTarget::Vmdk(v)),
            Updater::Vhdx(v) => {
                v.check_writable()?;
                Ok(DataTarget::Vhdx(v))
            }
            Updater::Qcow(q) => Ok(DataTarget::Qcow(q)),
            Updater::Luks(l) => Ok(DataTarget::Luks(l)),
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
    /// vdi: blocks appended, header and block map at finish.
    Vdi(&'a mut VdiUpdate),
    /// vpc: blocks appended behind a moved footer, BAT at finish.
    Vpc(&'a mut VhdUpdate),
    /// parallels: clusters appended under the in-use flag, BAT at finish.
    Parallels(&'a mut ParallelsUpdate),
    /// qed: allocation at the end of the file in QEMU's order.
    Qed(QedDataWriter<'a>),
    /// vmdk: grains appended, grain table entries after their data.
    Vmdk(&'a mut VmdkUpdate),
    /// vhdx: blocks appended, BAT entries through the log in batches and at finish.
    Vhdx(&'a mut VhdxUpdate),
    /// qcow version 1: clusters and L2 tables appended, entries after their data.
    Qcow(&'a mut QcowUpdate),
    /// luks: sectors encrypted in place (zeros too: a LUKS volume has no holes).
    Luks(&'a mut LuksUpdate),
}

impl DataTarget<'_> {
    /// Writes `data` at guest offset `off`; `backing` (the image's backing chain) supplies
    /// the rest of partly written clusters.
    pub fn write_at(&mut self, off: u64, data: &[u8], backing: Option<&Image>) -> Result<()> {
        match self {
            DataTarget::Qcow2(w) => w.write_at(off, data, backing),
            DataTarget::Raw(r) => r.write_at(off, data),
            DataTarget::Vdi(v) => v.write_at(off, data, backing),
            DataTarget::Vpc(v) => v.write_at(off, data, backing),
            DataTarget::Parallels(p) => p.write_at(off, data, backing),
            DataTarget::Qed(w) => w.write_at(off, data, backing),
            DataTarget::Vmdk(v) => v.write_at(off, data, backing),
            DataTarget::Vhdx(v) => v.write_at(off, data, backing),
            DataTarget::Qcow(q) => q.write_at(off, data, backing),
            DataTarget::Luks(l) => l.write_guest(off, data),
        }
    }

    /// Makes `[off, off + len)` read as zeros: zero clusters where whole qcow2 clusters
    /// are covered, written zeros elsewhere.
    pub fn write_zeroes(&mut self, off: u64, len: u64, backing: Option<&Image>) -> Result<()> {
        // Block-table formats without a backing file: unallocated blocks read as zeros.
        match self {
            DataTarget::Qcow2(w) if w.extended() => return w.zero_subclusters(off, len),
            DataTarget::Vdi(v) if backing.is_none() => return v.write_zeroes(off, len),
            DataTarget::Vpc(v) if backing.is_none() => return v.write_zeroes(off, len),
            DataTarget::Parallels(p) if backing.is_none() => return p.write_zeroes(off, len),
            DataTarget::Vmdk(v) => return v.write_zeroes(off, len, backing),
            DataTarget::Vhdx(v) if backing.is_none() => return v.write_zeroes(off, len),
            DataTarget::Qcow(q) => return q.write_zeroes(off, len, backing),
            _ => {}
        }
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
        if let DataTarget::Qed(w) = self {
            let cs = w.cluster_size();
            let first = pos.div_ceil(cs);
            let last = end / cs;
            if last > first {
                let head = first * cs - pos;
                write_zero_bytes(self, pos, head, backing)?;
                if let DataTarget::Qed(w) = self {
                    w.zero_clusters(first, last - first)?;
                }
                pos = last * cs;
            }
        }
        write_zero_bytes(self, pos, end - pos, backing)
    }

    /// The unit the format allocates in (cluster, block; 512 for raw): what safe `rebase`
    /// compares and copies whole.
    pub fn unit(&self) -> u64 {
        match self {
            DataTarget::Qcow2(d) => d.write_unit(),
            DataTarget::Raw(_) => 512,
            DataTarget::Vdi(v) => v.block_size(),
            DataTarget::Vpc(v) => v.block_size(),
            DataTarget::Parallels(p) => p.cluster_size(),
            DataTarget::Qed(d) => d.cluster_size(),
            DataTarget::Vmdk(v) => v.unit(),
            DataTarget::Vhdx(v) => v.block_size(),
            DataTarget::Qcow(q) => q.cluster_size(),
            DataTarget::Luks(_) => 512,
        }
    }

    /// Empties the image after `commit` (every guest cluster unallocated, the file cut
    /// after its last used cluster) where QEMU's driver can (`bdrv_make_empty`: qcow2, qcow);
    /// other formats keep their data, as qemu-img leaves them.
    pub fn make_empty(&mut self, size: u64) -> Result<()> {
        if let DataTarget::Qcow2(d) = self {
            // QEMU's make_completely_empty where the image allows it (update/make_empty.rs).
            if !d.make_completely_empty()? {
                d.unmap_mapped(size)?;
                d.trim_end()?;
            }
        }
        // QEMU's qcow driver has bdrv_make_empty too.
        if let DataTarget::Qcow(q) = self {
            q.make_empty()?;
        }
        Ok(())
    }

    /// The granularity of [`DataTarget::zeroes_whole_unit`]: the cluster size of formats
    /// that can make a whole cluster read as zeros without writing data, 1 for the others
    /// (their [`DataTarget::write_zeroes`] decides alone).
    pub fn zero_unit(&self) -> u64 {
        match self {
            DataTarget::Qcow2(w) => w.cluster_size(),
            _ => 1,
        }
    }

    /// QEMU's rule for a zero write `[off, off + len)` that covers only part of one
    /// [`DataTarget::zero_unit`] (block/qcow2.c, `qcow2_co_pwrite_zeroes`): `true` when the
    /// whole unit is to be made zero (it holds no data of its own, and the rest of it
    /// already reads as zeros by the metadata alone: a zero cluster, or unallocated over a
    /// backing chain that has nothing there); `false` when the zeros are to be written as
    /// data. Always `false` for formats without such units.
    pub fn zeroes_whole_unit(&self, off: u64, len: u64, backing: Option<&Image>) -> Result<bool> {
        let DataTarget::Qcow2(w) = self else {
            return Ok(false);
        };
        use super::qcow2::header::{OFLAG_COMPRESSED, OFLAG_ZERO};
        let cs = w.cluster_size();
        let c = off / cs;
        let e = w.entry(c)?;
        if e != 0 {
            return Ok(e & OFLAG_COMPRESSED == 0 && e & OFLAG_ZERO != 0);
        }
        let Some(b) = backing else {
            return Ok(true);
        };
        // The rest of the cluster (up to the virtual size) through the backing chain.
        let start = c * cs;
        let end = (start + cs).min(w.virtual_size());
        for (s, t) in [(start, off), (off.saturating_add(len), end)] {
            let t = t.min(b.virtual_size());
            let mut pos = s;
            while pos < t {
                let (x, _, _) = b.map_flat(pos, t - pos)?;
                if x.kind.has_data() || x.len == 0 {
                    return Ok(false);
                }
                pos = x.end();
            }
        }
        Ok(true)
    }

    /// Flushes.
    pub fn finish(self) -> Result<()> {
        match self {
            DataTarget::Qcow2(w) => w.finish(),
            DataTarget::Raw(r) => r.sync(),
            DataTarget::Vdi(v) => v.finish(),
            DataTarget::Vpc(v) => v.finish(),
            DataTarget::Parallels(p) => p.finish(),
            DataTarget::Qed(w) => w.finish(),
            DataTarget::Vmdk(v) => v.finish(),
            DataTarget::Vhdx(v) => v.finish(),
            DataTarget::Qcow(q) => q.finish(),
            DataTarget::Luks(l) => l.flush(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(format: Format, op: UpdateOp) -> String {
        require(format, op).unwrap_err().message().to_string()
    }

    #[test]
    fn snapshot_and_bitmap_refusals_are_qemu_img_reasons() {
        for f in Format::ALL.iter().copied() {
            let c = caps(f);
            assert_eq!(c.snapshots, f == Format::Qcow2, "{f:?}");
            assert_eq!(c.bitmaps, f == Format::Qcow2, "{f:?}");
            if f == Format::Qcow2 {
                assert!(require(f, UpdateOp::SnapshotCreate).is_ok());
                assert!(require(f, UpdateOp::Bitmap).is_ok());
                continue;
            }
            assert_eq!(
                reason(f, UpdateOp::SnapshotCreate),
                "Operation not supported"
            );
            assert_eq!(
                reason(f, UpdateOp::SnapshotApply),
                "Block driver does not support snapshots"
            );
            assert_eq!(reason(f, UpdateOp::SnapshotDelete), "snapshot not found");
            assert_eq!(reason(f, UpdateOp::Bitmap), "Operation not supported");
        }
        assert_eq!(able(UpdateOp::Bitmap), vec![Format::Qcow2]);
        assert_eq!(
            reason(Format::Vmdk, UpdateOp::Amend),
            "Format driver 'vmdk' does not support option amendment"
        );
    }
}

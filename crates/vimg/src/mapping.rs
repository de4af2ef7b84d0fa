//! The read side of every format: the block-mapping trait.
//!
//! A format reader answers one question, "what is at guest offset X, and for how long?", with
//! an [`Extent`]: data at a host location, a compressed unit that must be decoded, explicit
//! zeros, or unallocated space (zero unless a backing image supplies data). Readers do no data
//! I/O of their own; [`crate::Image`] does the reads for all formats, through `&self`, so many
//! threads can read one image.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

pub use crate::codec::Codec;
use crate::formats::Format;
use crate::storage::Storage;
use crate::Result;

/// An offset in the guest's view of the disk (what the virtual machine sees).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// An offset inside a host file (where the bytes are stored).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

macro_rules! offset_ops {
    ($t:ident) => {
        impl $t {
            /// The raw byte offset.
            #[inline]
            pub const fn get(self) -> u64 {
                self.0
            }

            /// `self + n`, or `None` on overflow.
            #[inline]
            pub fn checked_add(self, n: u64) -> Option<$t> {
                self.0.checked_add(n).map($t)
            }
        }

        /// `self + n`; callers bound `n` so that this cannot overflow.
        impl std::ops::Add<u64> for $t {
            type Output = $t;

            #[inline]
            fn add(self, n: u64) -> $t {
                $t(self.0 + n)
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}
offset_ops!(GuestOffset);
offset_ops!(HostOffset);

/// Which of a reader's files an extent lives in (index into [`ImageReader::file`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileId(pub u16);

/// What a guest range holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapKind {
    /// Plain bytes: guest `start + i` is at host `offset + i` in `file`.
    Data {
        /// The file holding the bytes.
        file: FileId,
        /// Host offset of the extent's first byte.
        offset: HostOffset,
    },
    /// Part of a compressed unit: `len` encoded bytes at `offset` decode to `unit_len` bytes
    /// that hold guest `[unit_start, unit_start + unit_len)`.
    Compressed {
        /// The file holding the encoded bytes.
        file: FileId,
        /// Host offset of the encoded bytes.
        offset: HostOffset,
        /// Encoded length (may extend past the end of the file; the tail is then absent).
        len: u64,
        /// The encoding.
        codec: Codec,
        /// Guest offset of the unit's first byte.
        unit_start: GuestOffset,
        /// Decoded length of the unit.
        unit_len: u64,
    },
    /// Explicitly zero; never read from a backing image.
    Zero,
    /// Not stored here: zero, unless a backing image supplies data.
    Unallocated,
}

impl MapKind {
    /// True for the two kinds that carry bytes.
    pub fn has_data(&self) -> bool {
        matches!(self, MapKind::Data { .. } | MapKind::Compressed { .. })
    }
}

/// A run of guest bytes that are all of one [`MapKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First guest byte of the run.
    pub start: GuestOffset,
    /// Length in bytes (> 0).
    pub len: u64,
    /// What the run holds.
    pub kind: MapKind,
}

impl Extent {
    /// One past the last guest byte.
    pub fn end(&self) -> u64 {
        self.start.0 + self.len
    }

    /// The same extent with its first `skip` bytes removed (host offsets move with it).
    pub fn advance(&self, skip: u64) -> Extent {
        debug_assert!(skip <= self.len);
        let kind = match self.kind {
            MapKind::Data { file, offset } => MapKind::Data {
                file,
                offset: offset + skip,
            },
            k => k,
        };
        Extent {
            start: self.start + skip,
            len: self.len - skip,
            kind,
        }
    }

    /// The extent cut to at most `len` bytes.
    pub fn truncate(mut self, len: u64) -> Extent {
        self.len = self.len.min(len);
        self
    }
}

/// A file named inside an image: a backing file, an external data file, an extent, a parent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExternalRef {
    /// The header field or descriptor line that names it (e.g. `backing_file`,
    /// `extent 1`, `parent locator W2ru`).
    pub field: String,
    /// The name exactly as the image stores it.
    pub name: String,
    /// What the name refers to.
    pub role: RefRole,
}

impl BackingRef {
    /// This backing reference as one of the image's [`ExternalRef`]s.
    pub fn external_ref(&self) -> ExternalRef {
        ExternalRef {
            field: self.field.clone(),
            name: self.name.clone(),
            role: RefRole::Backing,
        }
    }
}

/// The role of an [`ExternalRef`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RefRole {
    /// A backing (parent) image whose data shows through unallocated areas.
    Backing,
    /// A file that holds this image's own data (qcow2 data file, VMDK extent).
    Data,
}

/// A file of an image that `info` lists as its own child node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildNode {
    /// qemu's node name (`extents.0`).
    pub name: String,
    /// The file.
    pub file: FileId,
    /// The name as the image stores it (shown joined to the image's folder).
    pub stored_name: String,
}

/// The backing image an image names, before the gate has judged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingRef {
    /// The field that names it, for error messages (`backing_file`, `parentFileNameHint`).
    pub field: String,
    /// The name as stored in the image.
    pub name: String,
    /// The format the image says the backing file has, if it says.
    pub format: Option<Format>,
    /// Alternative names to try in order after `name` (VHD parent locators).
    pub alternatives: Vec<String>,
    /// What the image recorded about its parent when it was made; the parent, once opened,
    /// must still show it ([`Image`](crate::Image) checks it and refuses the chain if not).
    pub link: Option<ParentLink>,
}

/// The identity a differencing image recorded of its parent when it was made: VMDK's
/// `parentCID` (the parent's `CID`), VHDX's `parent_linkage` (the parent's DataWriteGuid).
/// A parent whose identity no longer matches was written to after the child was made, so
/// the child's blocks no longer fit over it; VMware and Hyper-V refuse such a chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentLink {
    /// The parent's identity to compare, as [`ImageReader::link_identity`] names it (`CID`,
    /// `DataWriteGuid`).
    pub identity: &'static str,
    /// The values the parent's identity may have, each with the child's field that records
    /// it (`parentCID`, `parent_linkage`, `parent_linkage2`); any one matches. Values are in
    /// the spelling the parent's reader returns from [`ImageReader::link_identity`].
    pub expected: Vec<(String, String)>,
}

/// An internal snapshot (qcow2), as `info` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Snapshot ID string.
    pub id: String,
    /// Snapshot name.
    pub name: String,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Creation time, seconds.
    pub date_sec: u64,
    /// Creation time, nanoseconds part.
    pub date_nsec: u64,
    /// Guest clock, nanoseconds in all.
    pub vm_clock_nsec: u64,
    /// Instruction count, when recorded.
    pub icount: Option<u64>,
}

/// Format-specific facts for `info`, in qemu-img's shape: `{"type": ..., "data": {...}}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FormatSpecific {
    /// The format name as qemu-img spells it in this block (`qcow2`, `vmdk`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// The facts, with qemu-img's key names, in qemu-img's order.
    pub data: serde_json::Map<String, serde_json::Value>,
}

/// The read side of a format: a mapping query plus what `info` prints.
///
/// Implementations keep all mutable state (table caches) behind interior locks so that
/// `map` works through `&self` from any thread.
pub trait ImageReader: Send + Sync {
    /// The format this reader parses.
    fn format(&self) -> Format;

    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;

    /// Allocation unit (cluster, grain, block), when the format has one.
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// The longest run of one kind that starts at `offset` and is at most `max_len` long.
    /// Callers guarantee `offset < virtual_size()` and `max_len > 0`; the returned extent
    /// starts at `offset`, is non-empty and does not pass `offset + max_len`.
    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent>;

    /// The file behind a [`FileId`] that this reader returned.
    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>>;

    /// Every file this image consists of (its own file first), for disk usage and for
    /// recognising a destination that would overwrite the source.
    fn files(&self) -> Vec<Arc<dyn Storage>>;

    /// Bytes the image occupies on disk, for `info`'s `actual-size`: by default the sum
    /// over [`ImageReader::files`]. Formats whose qemu-img driver counts fewer files (qcow2
    /// counts its own file, not an external data file) override it.
    fn allocated_size(&self) -> Option<u64> {
        self.files()
            .iter()
            .map(|f| f.disk_usage())
            .try_fold(0u64, |acc, u| u.map(|u| acc + u))
    }

    /// The backing image this image names, if any.
    fn backing(&self) -> Option<&BackingRef> {
        None
    }

    /// This image's identity named `what` (see [`ParentLink`]: `CID` for VMDK,
    /// `DataWriteGuid` for VHDX), which a child image records to bind itself to this exact
    /// content; `None` when the format has no such identity.
    fn link_identity(&self, what: &str) -> Option<String> {
        let _ = what;
        None
    }

    /// Every file the image names (backing, data file, extents), for `info` and the gate.
    fn external_refs(&self) -> Vec<ExternalRef> {
        Vec::new()
    }

    /// qemu-img's `encrypted`: the image's data is encrypted (LUKS, qcow2 with
    /// `encrypt.format`).
    fn encrypted(&self) -> bool {
        false
    }

    /// qemu-img's `dirty-flag`.
    fn dirty(&self) -> bool {
        false
    }

    /// Internal snapshots.
    fn snapshots(&self) -> Vec<SnapshotInfo> {
        Vec::new()
    }

    /// Reads the image as it was when internal snapshot `id` / `name` was taken (both must
    /// match where given), for `convert -l`. Formats without internal snapshots refuse.
    fn load_snapshot(&mut self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        let _ = (id, name);
        Err(crate::Error::unsupported(format!(
            "Block format '{}' used by device '' does not support temporarily loading internal snapshots",
            self.format().name()
        )))
    }

    /// The `format-specific` block of `info`.
    fn format_specific(&self) -> Option<FormatSpecific> {
        None
    }

    /// For a [`MapKind::Zero`] extent this reader returned: the storage that still backs it,
    /// if any (a hole in a raw file, a preallocated zero cluster). Only `map` output uses it.
    fn zero_location(&self, e: &Extent) -> Option<(FileId, HostOffset)> {
        let _ = e;
        None
    }

    /// Persistent dirty bitmaps as `(name, granularity in bytes)`, for `measure`; `None`
    /// when the image cannot hold persistent bitmaps at all (qemu-img then prints no
    /// `bitmaps` figure).
    fn persistent_bitmaps(&self) -> Option<Vec<(String, u64)>> {
        None
    }

    /// Files besides the image's own that qemu-img lists as child nodes in `info` (VMDK
    /// extents other than the descriptor: `extents.N`), in qemu's order.
    fn child_nodes(&self) -> Vec<ChildNode> {
        Vec::new()
    }

    /// False when qemu's driver for this format answers no block status (bochs, cloop,
    /// dmg, luks): `map` then reports every guest byte as data without a host offset, as
    /// qemu-img does, whatever [`ImageReader::map`] knows.
    fn reports_allocation(&self) -> bool {
        true
    }

    /// False when qemu's driver does not ask its file about data it maps (no
    /// `BDRV_BLOCK_RECURSE`: parallels): `map` then reports a data run over a hole in the
    /// host file as data, as qemu-img does, instead of zero.
    fn map_probes_host_holes(&self) -> bool {
        true
    }

    /// QEMU's request alignment of the file under this reader: 512 when the user opened it
    /// with `cache.direct=on` (`O_DIRECT`), else 1. `map` then reports a data run ending in
    /// a partial sector at the end of the file as data to the sector's end, as qemu's file
    /// driver rounds it (iotest 253).
    fn status_alignment(&self) -> u64 {
        1
    }

    /// False when qemu's block status for this node carries no host offset (a `quorum`
    /// node: its data is in every child at once); `map` then prints none.
    fn host_offsets(&self) -> bool {
        true
    }

    /// The driver name `info` prints (`file format`): the format's, or another node's
    /// (`quorum`).
    fn driver_name(&self) -> &'static str {
        self.format().name()
    }

    /// Non-fatal problems found while opening (e.g. the qcow2 corrupt bit), for the CLI to print.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// A consistency check of the image's metadata (`vimg check`).
    fn check(&self) -> Result<crate::check::CheckReport> {
        Err(crate::Error::unsupported(
            "This image format does not support checks",
        ))
    }
}

/// Helper for readers: the guest range a `map` call covers, `[offset, offset + max_len)`
/// cut at the end of a disk of `size` bytes, as `(start, end)`. An empty range (an offset
/// at or past the end, or `max_len` 0) is refused, naming the offset and the size.
pub fn map_range(offset: GuestOffset, max_len: u64, size: u64) -> Result<(u64, u64)> {
    let pos = offset.get();
    let end = pos.saturating_add(max_len).min(size);
    if pos >= end {
        return Err(crate::Error::invalid_argument(format!(
            "map at {pos:#x} is outside the virtual disk ({size:#x} bytes)"
        )));
    }
    Ok((pos, end))
}

/// Helper for readers: a [`MapKind::Data`] extent whose bytes sit in a hole of the host
/// file reads as zeros and need not be read — qemu asks the file the same question under
/// every format. Returns the extent cut at the first hole (when it starts in data) or as
/// [`MapKind::Zero`] up to the next data (when it starts in a hole). Other kinds pass
/// through. One `SEEK_DATA`/`SEEK_HOLE` pair per call.
pub fn trim_at_holes(storage: &dyn Storage, e: Extent) -> Result<Extent> {
    let MapKind::Data { offset, .. } = e.kind else {
        return Ok(e);
    };
    let host = offset.get();
    let next = storage
        .next_data(host)
        .map_err(|err| crate::Error::io(format_args!("look for data at host {host:#x}"), err))?;
    Ok(match next {
        Some((s, end)) if s <= host => e.truncate((end - host).max(1)),
        Some((s, _)) => Extent {
            kind: MapKind::Zero,
            ..e.truncate((s - host).max(1))
        },
        None => Extent {
            kind: MapKind::Zero,
            ..e
        },
    })
}

/// Helper for readers: walks `map` from `offset` to `end`, calling `f` per extent.
pub fn for_each_extent(
    reader: &dyn ImageReader,
    offset: u64,
    end: u64,
    mut f: impl FnMut(&Extent) -> Result<()>,
) -> Result<()> {
    let mut pos = offset;
    while pos < end {
        let e = reader.map(GuestOffset(pos), end - pos)?;
        debug_assert_eq!(e.start.0, pos);
        if e.len == 0 || e.end() > end {
            return Err(crate::Error::corrupt(format!(
                "{} reader returned an invalid extent at {:#x}",
                reader.format().name(),
                pos
            )));
        }
        f(&e)?;
        pos = e.end();
    }
    Ok(())
}

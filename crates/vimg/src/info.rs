//! What `info` reports about an image, serialised with qemu-img's JSON keys so scripts
//! written for `qemu-img info --output=json` parse it unchanged.

use serde::Serialize;

use crate::image::Image;
use crate::mapping::{ExternalRef, FormatSpecific, SnapshotInfo};

pub(crate) mod children;
pub use children::{children, ChildInfo, NodeInfo, ProtocolSpecific};

/// One snapshot in qemu-img's JSON shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotJson {
    /// Instruction count (0 when not recorded, as qemu prints it).
    pub icount: u64,
    /// Nanoseconds part of the guest clock.
    pub vm_clock_nsec: u64,
    /// Tag.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u64,
    /// Creation time, nanoseconds part.
    pub date_nsec: u64,
    /// Whole seconds of the guest clock.
    pub vm_clock_sec: u64,
    /// ID string.
    pub id: String,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
}

impl From<&SnapshotInfo> for SnapshotJson {
    fn from(s: &SnapshotInfo) -> Self {
        SnapshotJson {
            icount: s.icount.unwrap_or(0),
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            name: s.name.clone(),
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            id: s.id.clone(),
            vm_state_size: s.vm_state_size,
        }
    }
}

/// `info` for one image (one layer of a chain). Fields are in qemu-img's JSON order.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The block nodes under the image's, as qemu-img 10 lists them (`children`).
    pub children: Vec<ChildInfo>,
    /// Internal snapshots.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotJson>,
    /// Format of the backing file, when the image names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// Guest-visible size.
    pub virtual_size: u64,
    /// The file name as given.
    pub filename: String,
    /// Allocation unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// Format name.
    pub format: String,
    /// Bytes the image's files occupy on disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    /// Format-specific facts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
    /// The backing file name joined to the image's folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// The backing file name as stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// The image's data is encrypted (shown only when it is, as qemu-img does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    /// The image was not closed cleanly (absent for formats qemu-img shows none for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_flag: Option<bool>,
    /// vimg addition: every file the image names, so a pipeline can judge it before
    /// converting.
    #[serde(rename = "vimg-external-references")]
    pub external_references: Vec<ExternalRef>,
}

/// What `qemu-img info` says about `image`'s top layer (its backing chain is
/// [`Image::chain`]): format, sizes, backing file, the files it names.
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.img");
/// # std::fs::write(&path, vec![0u8; 65536])?;
/// let image = vimg::Image::open(&path, &vimg::OpenOptions::default())?;
/// let info = vimg::info(&image);
/// assert_eq!((info.format.as_str(), info.virtual_size), ("raw", 65536));
/// // qemu-img's JSON keys.
/// let json = serde_json::to_value(&info)?;
/// assert_eq!(json["virtual-size"], 65536);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn info(image: &Image) -> ImageInfo {
    ImageInfo::of(image)
}

impl ImageInfo {
    /// Collects `info` for the top layer of `image`.
    pub fn of(image: &Image) -> ImageInfo {
        let r = image.reader();
        let backing = r.backing();
        let actual_size = r.allocated_size();
        ImageInfo {
            backing_filename_format: backing.and_then(|b| b.format).map(|f| f.name().to_string()),
            virtual_size: r.virtual_size(),
            filename: image.filename().to_string(),
            cluster_size: r.cluster_size(),
            format: r.driver_name().to_string(),
            actual_size,
            full_backing_filename: backing.and_then(|b| {
                // Over a quorum node a relative name has no folder to resolve against
                // (qemu-img: "cannot determine actual path").
                if image.storage().quorum_node().is_some()
                    && crate::quorum::dirname::needs_dirname(&b.name)
                {
                    return None;
                }
                // Shown as a blkdebug name (`blkdebug:...`, `json:{...}`), the image's folder
                // is its file's, as QEMU's `bdrv_dirname` finds it through the layer.
                let shown = image.filename();
                let base = if shown.starts_with("json:") || shown.starts_with("blkdebug:") {
                    image.path()
                } else {
                    Some(std::path::Path::new(shown))
                };
                Some(crate::image::full_backing_name(base, &b.name))
            }),
            backing_filename: backing.map(|b| b.name.clone()),
            snapshots: r.snapshots().iter().map(SnapshotJson::from).collect(),
            format_specific: r.format_specific(),
            encrypted: r.encrypted().then_some(true),
            // A quorum node has no dirty flag to report.
            dirty_flag: (r.format().reports_dirty_flag() && r.driver_name() != "quorum")
                .then(|| r.dirty()),
            external_references: r.external_refs(),
            children: children(image),
        }
    }
}

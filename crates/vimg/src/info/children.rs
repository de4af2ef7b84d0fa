//! The `children` of `qemu-img info --output=json` (QEMU 8.0 on, `BlockChildInfo` in
//! qapi/block-core.json): the block nodes under the image's format node, each as its node
//! name and the `info` of that node. qemu-img opens the image without its backing chain, so
//! a format node's children are the files its driver opens itself (a VMDK's extents, as
//! `extents.N`) and its own `file`, newest first; each of those is a protocol node (`file`, or
//! `host_device` for a block or character device) with no children of its own.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::image::{full_backing_name, Image};
use crate::storage::Storage;

/// One entry of `children`: qemu's node name and the node's own info.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChildInfo {
    /// The child's role under its parent (`file`, `extents.0`).
    pub name: String,
    /// The child node's info.
    pub info: NodeInfo,
}

/// `format-specific` of a protocol node: `{"type": "file", "data": {}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProtocolSpecific {
    /// Always `file` (qemu's file and host_device drivers both say so).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Empty: qemu fills in nothing for a local file.
    pub data: serde_json::Map<String, serde_json::Value>,
}

/// The info of a protocol node, in qemu-img's key order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NodeInfo {
    /// Its own children (none for a protocol node).
    pub children: Vec<ChildInfo>,
    /// The file's length rounded up to whole 512-byte sectors, as qemu's file driver
    /// counts it (its `file length` in human output).
    pub virtual_size: u64,
    /// The file name as qemu shows it: the image's name for `file`, an extent's stored
    /// name joined to the image's folder.
    pub filename: String,
    /// The protocol driver: `host_device` for block and character devices, else `file`.
    pub format: &'static str,
    /// Bytes the file occupies on disk (0 when unknown).
    pub actual_size: u64,
    /// The empty `file` block for a protocol node; none for a quorum node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<ProtocolSpecific>,
    /// False for a protocol node (it has no dirty flag); none for a quorum node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_flag: Option<bool>,
}

/// The `children` qemu-img 10 prints for `image`'s top layer. qemu keeps a node's children
/// newest first and attaches the image's `file` before the files its driver opens: the
/// format's own files last to first (`extents.2`, `extents.1`, `extents.0`), then `file`.
pub fn children(image: &Image) -> Vec<ChildInfo> {
    let r = image.reader();
    let quorum = image
        .storage()
        .as_any()
        .and_then(|a| a.downcast_ref::<crate::quorum::QuorumStorage>());
    if let Some(q) = quorum {
        // A quorum node is the disk (its children), or the file of the format above it.
        let node = quorum_node(q.quorum());
        if r.driver_name() == "quorum" {
            return node.children;
        }
        return vec![ChildInfo {
            name: "file".into(),
            info: node,
        }];
    }
    let folder_of = Some(Path::new(image.filename()));
    let mut v: Vec<ChildInfo> = r
        .child_nodes()
        .into_iter()
        .filter_map(|c| {
            let f = r.file(c.file)?;
            let shown = full_backing_name(folder_of, &c.stored_name);
            Some(protocol_child(c.name, shown, f))
        })
        .collect();
    v.reverse();
    let mut file = protocol_child(
        "file".to_string(),
        image.filename().to_string(),
        image.storage(),
    );
    // A compressed container or an OVA is read through a decoded (or member) view; the
    // `file` node is the file as stored, as qemu-img would show it: the compressed file's
    // length, not the decoded size (which `vimg-container` reports as `decoded-size`).
    let origin = image.origin();
    if origin.container.is_some() || origin.ova.is_some() {
        let stored = image.path().and_then(|p| std::fs::metadata(p).ok());
        let (len, usage) = match stored {
            Some(m) => (m.len(), m.blocks() * 512),
            None => (
                origin
                    .container
                    .as_ref()
                    .and_then(|c| c.compressed_size)
                    .unwrap_or(0),
                0,
            ),
        };
        file.info.virtual_size = len.div_ceil(512) * 512;
        file.info.actual_size = usage;
    }
    v.push(file);
    v
}

/// A quorum node as `info` describes it: a `quorum` node whose children are listed newest
/// first, as qemu keeps them. (`info` refuses quorums with other than file children.)
fn quorum_node(q: &crate::quorum::Quorum) -> NodeInfo {
    let mut children: Vec<ChildInfo> = q
        .children()
        .enumerate()
        .map(|(i, (c, _))| {
            protocol_child(format!("children.{i}"), c.name().to_string(), c.storage())
        })
        .collect();
    children.reverse();
    NodeInfo {
        children,
        virtual_size: q.len(),
        filename: q.name().to_string(),
        format: "quorum",
        actual_size: q.disk_usage(),
        format_specific: None,
        dirty_flag: None,
    }
}

pub(crate) fn protocol_child(
    name: String,
    filename: String,
    storage: &Arc<dyn Storage>,
) -> ChildInfo {
    ChildInfo {
        name,
        info: NodeInfo {
            children: Vec::new(),
            virtual_size: storage.len().div_ceil(512) * 512,
            format: protocol_of(&filename),
            filename,
            actual_size: storage.disk_usage().unwrap_or(0),
            format_specific: Some(ProtocolSpecific {
                kind: "file",
                data: serde_json::Map::new(),
            }),
            dirty_flag: Some(false),
        },
    }
}

/// qemu's protocol driver for a file: `host_device` for block and character devices
/// (what `qemu-img info /dev/loop0` reports), else `file`.
fn protocol_of(shown: &str) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(shown) {
        Ok(m) if m.file_type().is_block_device() || m.file_type().is_char_device() => "host_device",
        _ => "file",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OpenOptions;

    #[test]
    fn a_plain_file_has_one_file_child_in_whole_sectors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![1u8; 1000]).unwrap();
        let image = Image::open(&path, &OpenOptions::default()).unwrap();
        let c = children(&image);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].name, "file");
        assert_eq!(c[0].info.filename, path.display().to_string());
        assert_eq!(c[0].info.format, "file");
        assert_eq!(c[0].info.virtual_size, 1024);
        assert!(c[0].info.children.is_empty());
        let v = serde_json::to_value(&c[0]).unwrap();
        assert_eq!(
            v["info"]["format-specific"],
            serde_json::json!({"type": "file", "data": {}})
        );
        assert_eq!(v["info"]["dirty-flag"], false);
    }

    #[test]
    fn a_compressed_input_file_node_is_the_compressed_file() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&vec![0u8; 4 << 20]).unwrap();
        let gz = enc.finish().unwrap();
        std::fs::write(&path, &gz).unwrap();
        let image = Image::open(&path, &OpenOptions::default()).unwrap();
        assert_eq!(image.virtual_size(), 4 << 20);
        let c = children(&image);
        assert_eq!(c.len(), 1);
        assert_eq!(
            c[0].info.virtual_size,
            (gz.len() as u64).div_ceil(512) * 512
        );
        assert_eq!(c[0].info.filename, path.display().to_string());
    }
}

//! The vmdk reader: the extents `open.rs` found (named by a descriptor, its own file or
//! embedded in a monolithic sparse extent), each mapped onto its guest range.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::sparse::SparseExtent;
use crate::check::CheckReport;
use crate::error::{Error, Result};
use crate::formats::Format;
use crate::mapping::{
    BackingRef, ChildNode, Extent, ExternalRef, FileId, FormatSpecific, GuestOffset, HostOffset,
    ImageReader, MapKind,
};
use crate::storage::Storage;

/// What one extent holds.
pub(super) enum Kind {
    Flat { file: FileId, offset: u64 },
    Zero,
    Sparse(Box<SparseExtent>),
}

pub(super) struct VExtent {
    pub(super) start: u64,
    pub(super) len: u64,
    pub(super) kind: Kind,
    /// For `info`: filename as qemu-img prints it, type keyword ("" for a monolithic
    /// sparse file opened directly).
    pub(super) filename: String,
    pub(super) type_name: String,
}

/// Reads a VMDK image.
pub struct VmdkReader {
    pub(super) files: Vec<Arc<dyn Storage>>,
    pub(super) extents: Vec<VExtent>,
    pub(super) size: u64,
    pub(super) create_type: String,
    pub(super) cid: u32,
    pub(super) parent_cid: u32,
    pub(super) backing: Option<BackingRef>,
    pub(super) refs: Vec<ExternalRef>,
    pub(super) children: Vec<ChildNode>,
    pub(super) warnings: Vec<String>,
}

impl VmdkReader {
    fn extent_at(&self, off: u64) -> Option<&VExtent> {
        let i = self.extents.partition_point(|e| e.start + e.len <= off);
        self.extents.get(i)
    }
}

/// How CIDs are spelled in link checks and their messages: 8 hex digits.
pub(super) fn cid_text(cid: u32) -> String {
    format!("{cid:08x}")
}

impl ImageReader for VmdkReader {
    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> Option<u64> {
        // As qemu-img: one grain size when every extent is sparse alike; none for flat.
        let mut grain = None;
        let mut compressed = None;
        for e in &self.extents {
            match &e.kind {
                Kind::Sparse(s) => {
                    if grain.is_some_and(|g| g != s.grain_bytes())
                        || compressed.is_some_and(|c| c != s.is_compressed())
                    {
                        return None;
                    }
                    grain = Some(s.grain_bytes());
                    compressed = Some(s.is_compressed());
                }
                _ => return None,
            }
        }
        grain
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let off = offset.get();
        let e = self
            .extent_at(off)
            .ok_or_else(|| Error::corrupt(format!("no extent covers guest offset {off:#x}")))?;
        let rel = off - e.start;
        let max = max_len.min(e.len - rel);
        match &e.kind {
            Kind::Zero => Ok(Extent {
                start: offset,
                len: max,
                kind: MapKind::Zero,
            }),
            Kind::Flat { file, offset: base } => {
                // Holes in a flat file read as zeros; asking the filesystem saves reading
                // them (a fresh 2 GiB twoGbMaxExtentFlat piece is one hole).
                let host = base + rel;
                let f = self
                    .files
                    .get(file.0 as usize)
                    .ok_or_else(|| Error::corrupt("flat extent names an unknown file"))?;
                crate::mapping::trim_at_holes(
                    &**f,
                    Extent {
                        start: offset,
                        len: max,
                        kind: MapKind::Data {
                            file: *file,
                            offset: HostOffset(host),
                        },
                    },
                )
            }
            Kind::Sparse(s) => s.map(e.start, rel, max),
        }
    }

    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        self.files.get(id.0 as usize)
    }

    fn files(&self) -> Vec<Arc<dyn Storage>> {
        self.files.clone()
    }

    fn backing(&self) -> Option<&BackingRef> {
        self.backing.as_ref()
    }

    fn link_identity(&self, what: &str) -> Option<String> {
        (what == "CID").then(|| cid_text(self.cid))
    }

    fn external_refs(&self) -> Vec<ExternalRef> {
        self.refs.clone()
    }

    fn child_nodes(&self) -> Vec<ChildNode> {
        self.children.clone()
    }

    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    fn format_specific(&self) -> Option<FormatSpecific> {
        let mut data = Map::new();
        data.insert("cid".into(), json!(self.cid));
        data.insert("parent-cid".into(), json!(self.parent_cid));
        data.insert("create-type".into(), json!(self.create_type));
        let extents: Vec<Value> = self
            .extents
            .iter()
            .map(|e| {
                let mut m = Map::new();
                if let Kind::Sparse(s) = &e.kind {
                    if s.is_compressed() {
                        m.insert("compressed".into(), json!(true));
                    }
                }
                m.insert("virtual-size".into(), json!(e.len));
                m.insert("filename".into(), json!(e.filename));
                if let Kind::Sparse(s) = &e.kind {
                    m.insert("cluster-size".into(), json!(s.grain_bytes()));
                }
                m.insert("format".into(), json!(e.type_name));
                Value::Object(m)
            })
            .collect();
        data.insert("extents".into(), Value::Array(extents));
        Some(FormatSpecific {
            kind: "vmdk".into(),
            data,
        })
    }

    fn check(&self) -> Result<CheckReport> {
        // Every table entry was verified when the image was opened (an image that fails
        // those checks does not open). QEMU's vmdk check follows the main grain directory
        // only and says nothing of the redundant one, which a writer killed between the
        // two tables (or the two directories) leaves different; the main directory is
        // what QEMU and vimg read, so such an image is consistent, and vimg reports it as
        // qemu-img does: no errors (issue 15). qemu-img reports no cluster counts for
        // vmdk; neither does vimg.
        Ok(CheckReport::default())
    }
}

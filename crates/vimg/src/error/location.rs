//! Where in the image an error was found, as data: the structure and its byte offset in
//! the file, for callers that want them as fields rather than in the message (the Python
//! bindings' exception attributes). Read from the per-format error enums of the formats an
//! image service takes (qcow2, vmdk, vhd, vhdx, vdi); an error that names no structure, or
//! comes from another format, has none (its message still says what it knows).

use super::Error;
use crate::formats::qcow2::error::Qcow2Error;
use crate::formats::vdi::VdiError;
use crate::formats::vhd::VhdError;
use crate::formats::vhdx::VhdxError;
use crate::formats::vmdk::VmdkError;

/// A structure of the image and, when known, its byte offset in the file.
type Located = (String, Option<u64>);

impl Error {
    /// The on-disk structure this error concerns (`L2 table`, `VHD footer`,
    /// `VHDX header 1`), when the format's error names one.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("bad.vdi");
    /// std::fs::write(&path, vec![0u8; 512])?; // a VDI header without its signature
    /// let opts = vimg::OpenOptions::with_format(Some(vimg::Format::Vdi));
    /// let e = vimg::Image::open(&path, &opts).unwrap_err();
    /// assert_eq!(e.structure().as_deref(), Some("VDI header"));
    /// assert_eq!(e.offset(), Some(0x40));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn structure(&self) -> Option<String> {
        self.locate().map(|(s, _)| s)
    }

    /// The byte offset in the file of the structure [`Error::structure`] names, when known.
    pub fn offset(&self) -> Option<u64> {
        self.locate().and_then(|(_, o)| o)
    }

    /// The first format error in the chain of causes that names a structure.
    fn locate(&self) -> Option<Located> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&*self.source);
        while let Some(e) = cur {
            if let Some(found) = located(e) {
                return Some(found);
            }
            cur = match e.downcast_ref::<Error>() {
                Some(inner) => Some(&*inner.source),
                None => e.source(),
            };
        }
        None
    }
}

fn located(e: &(dyn std::error::Error + 'static)) -> Option<Located> {
    if let Some(e) = e.downcast_ref::<Qcow2Error>() {
        return qcow2(e);
    }
    if let Some(e) = e.downcast_ref::<VmdkError>() {
        return vmdk(e);
    }
    if let Some(e) = e.downcast_ref::<VhdError>() {
        return vhd(e);
    }
    if let Some(e) = e.downcast_ref::<VhdxError>() {
        return vhdx(e);
    }
    if let Some(e) = e.downcast_ref::<VdiError>() {
        return vdi(e);
    }
    None
}

fn at(structure: impl Into<String>, offset: u64) -> Option<Located> {
    Some((structure.into(), Some(offset)))
}

fn named(structure: impl Into<String>) -> Option<Located> {
    Some((structure.into(), None))
}

fn qcow2(e: &Qcow2Error) -> Option<Located> {
    match e {
        Qcow2Error::BadMagic(_) | Qcow2Error::Version(_) => at("qcow2 header", 0),
        Qcow2Error::ClusterBits(_) => at("qcow2 header", 0x14),
        Qcow2Error::Truncated(_) | Qcow2Error::HeaderField { .. } => at("qcow2 header", 0),
        Qcow2Error::Extension { offset, .. } => at("qcow2 header extension", *offset),
        Qcow2Error::Table { table, offset, .. }
        | Qcow2Error::TablePastEof { table, offset, .. } => at(*table, *offset),
        Qcow2Error::L1Entry { .. } => named("L1 table"),
        Qcow2Error::L2Entry { table, .. } => at("L2 table", *table),
        Qcow2Error::Snapshot { offset, .. } => at("snapshot table entry", *offset),
        Qcow2Error::Bitmap { offset, .. } => at("bitmap directory entry", *offset),
        _ => None,
    }
}

fn vmdk(e: &VmdkError) -> Option<Located> {
    match e {
        VmdkError::BadField {
            structure, offset, ..
        }
        | VmdkError::BadMagic {
            structure, offset, ..
        } => at(*structure, *offset),
        VmdkError::ExtentLine { .. } | VmdkError::Descriptor { .. } => named("descriptor"),
        VmdkError::PastEof { table, offset, .. } => at(table.clone(), *offset),
        VmdkError::BadEntry { table, .. } => named(table.clone()),
        VmdkError::FooterMismatch { offset, .. } => at("footer", *offset),
        _ => None,
    }
}

fn vhd(e: &VhdError) -> Option<Located> {
    match e {
        VhdError::BadCookie {
            structure, offset, ..
        }
        | VhdError::Checksum {
            structure, offset, ..
        }
        | VhdError::Version {
            structure, offset, ..
        } => at(*structure, *offset),
        VhdError::DiskType { offset, .. } => at("VHD footer", *offset),
        VhdError::HeaderOffset { offset, .. }
        | VhdError::BlockSize { offset, .. }
        | VhdError::TableTooSmall { offset, .. } => at("dynamic disk header", *offset),
        VhdError::TablePastEof { offset, .. } | VhdError::TableOverlap { offset, .. } => {
            at("BAT", *offset)
        }
        VhdError::EntryPastEof { .. }
        | VhdError::EntryOverlapsMetadata { .. }
        | VhdError::EntriesOverlap { .. } => named("BAT"),
        VhdError::Locator { .. } => named("parent locator"),
        _ => None,
    }
}

fn vhdx(e: &VhdxError) -> Option<Located> {
    match e {
        VhdxError::NotVhdx { .. } => at("VHDX file identifier", 0),
        VhdxError::HeaderField { index, offset, .. } => at(format!("VHDX header {index}"), *offset),
        VhdxError::RegionEntry { offset, .. } => at("VHDX region table entry", *offset),
        VhdxError::MetadataTable { what, offset, .. } => at(*what, *offset),
        VhdxError::MetadataEntry { offset, .. } => at("VHDX metadata entry", *offset),
        VhdxError::MetadataValue { item, offset, .. } => at(*item, *offset),
        VhdxError::ParentLocator { offset, .. } => at("VHDX parent locator", *offset),
        VhdxError::BatTooSmall { offset, .. } => at("VHDX BAT", *offset),
        VhdxError::BatEntry { offset, .. } => at("VHDX BAT entry", *offset),
        VhdxError::Log { offset, .. } => at("VHDX log", *offset),
        _ => None,
    }
}

fn vdi(e: &VdiError) -> Option<Located> {
    match e {
        VdiError::TooShort { .. } => at("VDI header", 0),
        VdiError::Signature { .. } => at("VDI header", 0x40),
        VdiError::Version { .. } => at("VDI header", 0x44),
        VdiError::HeaderSize { .. } => at("VDI header", 0x48),
        VdiError::ImageType { .. } => at("VDI header", 0x4c),
        VdiError::Unsupported { at: offset, .. } => at("VDI header", *offset),
        VdiError::BlockCount { .. } => at("VDI header", 0x180),
        VdiError::MapPastEof { offset, .. } => at("VDI block map", *offset),
        VdiError::EntryOutOfRange { .. }
        | VdiError::EntryPastEof { .. }
        | VdiError::EntryDuplicate { .. } => named("VDI block map"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn through_context_and_wrapping() {
        let e: Error = Qcow2Error::L2Entry {
            table: 0x50000,
            index: 3,
            value: 1,
            why: "x".into(),
        }
        .into();
        let e = e
            .with_path("a.qcow2")
            .context("Could not open backing file");
        assert_eq!(e.structure().as_deref(), Some("L2 table"));
        assert_eq!(e.offset(), Some(0x50000));
        let plain = Error::corrupt("nothing located");
        assert_eq!((plain.structure(), plain.offset()), (None, None));
    }
}

//! What an image service needs to register an image, in OpenStack Glance's vocabulary
//! (Image API v2 "Create image": `disk_format`, `container_format`, `min_disk`, and the
//! `os_hash_algo`/`os_hash_value` pair of its multihash), plus the safety verdict of the
//! external-file gate: an image that names other files (a qcow2 backing file, a VMDK
//! extent, a VHD parent) is not self-contained and must not be accepted by a service that
//! will later open it next to other tenants' files.
//!
//! ISO 9660 images are recognised here (the "CD001" standard identifier of the volume
//! descriptor at byte 0x8001, ECMA-119 8.1) and reported as `iso` while they are read and
//! converted as raw: `iso` is a label for the service, not a format writers must know.

use std::path::Path;

use serde::Serialize;

use crate::checksum::Checksum;
use crate::formats::Format;
use crate::gate::{self, ExternalPolicy};
use crate::image::Image;
use crate::mapping::{ExternalRef, RefRole};
use crate::storage::Storage;

/// Offset of the first volume descriptor of an ISO 9660 image (system area = 16 sectors of
/// 2048 bytes).
const ISO_DESCRIPTOR_AT: u64 = 0x8000;
/// The standard identifier of every volume descriptor.
const ISO_STANDARD_ID: &[u8; 5] = b"CD001";
/// Bytes in a GiB, the unit of Glance's `min_disk`.
const GIB: u64 = 1 << 30;

/// True when `storage` holds an ISO 9660 file system: a volume descriptor at 0x8000 whose
/// type is one ECMA-119 defines (0 boot record, 1 primary, 2 supplementary, 3 partition, 255
/// terminator), with identifier "CD001" and version 1.
pub fn is_iso9660(storage: &dyn Storage) -> bool {
    let mut d = [0u8; 7];
    if storage.read_exact_at(&mut d, ISO_DESCRIPTOR_AT).is_err() {
        return false;
    }
    matches!(d[0], 0..=3 | 255) && &d[1..6] == ISO_STANDARD_ID && d[6] == 1
}

/// A reference an image makes, with what the gate would do with it where the image is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JudgedRef {
    /// The reference as the image states it.
    #[serde(flatten)]
    pub reference: ExternalRef,
    /// What the default gate (same-folder policy) says about it: `allowed` or why not.
    pub gate: String,
}

/// What Glance's image create needs, and whether the image is safe to accept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImageServiceInfo {
    /// Glance's `disk_format`: raw, qcow2, vmdk, vhd, vhdx, vdi or iso.
    pub disk_format: &'static str,
    /// Glance's `container_format`: `bare`, `ova`, or `compressed` (the file is an xz, gzip
    /// or zstd container: upload the converted image, or use Glance's decompress import
    /// plugin).
    pub container_format: &'static str,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Glance's `min_disk`: the virtual size in GiB, rounded up.
    pub min_disk: u64,
    /// True when the image names no other file: it is self-contained.
    pub safe: bool,
    /// Why it is not safe (empty when safe).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unsafe_reasons: Vec<String>,
    /// Every file the image names, with the gate's verdict.
    pub references: Vec<JudgedRef>,
    /// Glance's `os_hash_algo`, when a checksum of this very file was computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os_hash_algo: Option<&'static str>,
    /// Glance's `os_hash_value`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os_hash_value: Option<String>,
}

/// Glance's name for the format of `image` (`iso` for a raw image holding ISO 9660); formats
/// Glance has none for are named as qemu-img names them (they are refused, see
/// [`Format::glance_disk_format`]).
pub fn disk_format(image: &Image) -> &'static str {
    let format = image.format();
    match format.glance_disk_format() {
        Ok(_) if format.is_plain() && is_iso9660(&**image.storage()) => "iso",
        Ok(name) => name,
        Err(_) => format.name(),
    }
}

/// Why an image of `format` is unsafe whatever it contains.
fn format_reasons(format: Format) -> Option<String> {
    format
        .glance_disk_format()
        .err()
        .map(|why| format!("{}: {why}", format.name()))
}

impl ImageServiceInfo {
    /// Judges the top layer of `image`. `checksum` is a checksum of the file as it would be
    /// uploaded; it is reported only when that file is the bare image.
    pub fn of(image: &Image, checksum: Option<&Checksum>) -> ImageServiceInfo {
        let origin = image.origin();
        let container_format = if origin.ova.is_some() {
            "ova"
        } else if origin.container.is_some() {
            "compressed"
        } else {
            "bare"
        };
        let refs = image.reader().external_refs();
        let path = image.path();
        let references: Vec<JudgedRef> = refs
            .iter()
            .map(|r| JudgedRef {
                reference: r.clone(),
                gate: judge(path, r),
            })
            .collect();
        let mut unsafe_reasons: Vec<String> = refs
            .iter()
            .map(|r| {
                let what = match r.role {
                    RefRole::Backing => "a backing file",
                    RefRole::Data => "a data file",
                };
                format!(
                    "{} names {what} '{}': the image is not self-contained, and a service that opens it would read that file from its own host",
                    r.field, r.name
                )
            })
            .collect();
        unsafe_reasons.extend(format_reasons(image.format()));
        let virtual_size = image.virtual_size();
        let (os_hash_algo, os_hash_value) = match checksum {
            Some(c) if container_format == "bare" => (Some(c.alg.name()), Some(c.hex.clone())),
            _ => (None, None),
        };
        ImageServiceInfo {
            disk_format: disk_format(image),
            container_format,
            virtual_size,
            min_disk: virtual_size.div_ceil(GIB),
            safe: unsafe_reasons.is_empty(),
            unsafe_reasons,
            references,
            os_hash_algo,
            os_hash_value,
        }
    }
}

fn judge(image_path: Option<&Path>, r: &ExternalRef) -> String {
    match gate::resolve(image_path, &r.field, &r.name, ExternalPolicy::SameFolder) {
        Ok(_) => "allowed".to_string(),
        Err(e) => format!("refused: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn iso_descriptor() {
        let mut v = vec![0u8; 0x9000];
        assert!(!is_iso9660(&MemStorage::new(v.clone())));
        v[0x8000..0x8007].copy_from_slice(b"\x01CD001\x01");
        assert!(is_iso9660(&MemStorage::new(v.clone())));
        v[0x8000] = 9;
        assert!(!is_iso9660(&MemStorage::new(v.clone())));
        assert!(!is_iso9660(&MemStorage::new(vec![0u8; 100])));
    }
}

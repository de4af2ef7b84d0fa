//! What an image service needs to register an image, in OpenStack Glance's vocabulary
//! (Image API v2 "Create image": `disk_format`, `container_format`, `min_disk`, and the
//! `os_hash_algo`/`os_hash_value` pair of its multihash), plus the safety verdict of the
//! external-file gate: an image that names other files (a qcow2 backing file, a VMDK
//! extent, a VHD parent) is not self-contained and must not be accepted by a service that
//! will later open it next to other tenants' files.
//!
//! For an input that is not itself what a service can boot (an image inside an xz, gzip or
//! zstd container, a disk inside an OVA) the block describes what to upload instead: the
//! image inside, converted out to a file of its own. Glance's `decompress` import plugin
//! takes zip, lha and gzip only and skips images already marked `compressed`, and Nova boots
//! neither a compressed nor an `ova` image, so keys that named the input would register an
//! image nothing can boot.
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
///
/// `min_ram` is never given: nothing in an image says how much memory its guest needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImageServiceInfo {
    /// Glance's `disk_format`: raw, qcow2, vmdk, vhd, vhdx, vdi or iso.
    pub disk_format: &'static str,
    /// Glance's `container_format` of what to upload: always `bare`. For a compressed or
    /// OVA input that is the image inside, converted out ([`Self::input_container_format`]).
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
    /// What the input file itself is, when it is not the image to upload: `compressed` (an
    /// xz, gzip or zstd container) or `ova`. The other keys then describe the image inside.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_container_format: Option<&'static str>,
    /// `Some(false)` with `input_container_format`: the input cannot be uploaded as it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_usable: Option<bool>,
    /// Why the input is not what to upload, and what is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The command that writes the file to upload (`INPUT`, `OUTPUT` to be filled in).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub convert_command: Option<String>,
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
        let input_container_format = if origin.ova.is_some() {
            Some("ova")
        } else if origin.container.is_some() {
            Some("compressed")
        } else {
            None
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
        // A checksum of the container is not one of the image to upload.
        let (os_hash_algo, os_hash_value) = match checksum {
            Some(c) if input_container_format.is_none() => {
                (Some(c.alg.name()), Some(c.hex.clone()))
            }
            _ => (None, None),
        };
        let disk_format = disk_format(image);
        let format = image.format().name();
        let note = input_container_format.map(|input| {
            let what = if input == "ova" {
                "an OVA archive"
            } else {
                "a compressed container"
            };
            format!(
                "this file is {what} around a {format} image, which an image service cannot boot as uploaded; \
                 these keys describe the image inside, converted out to a file of its own: upload that file"
            )
        });
        let convert_command = input_container_format.map(|_| {
            format!("vimg convert -O {format} --checksum sha512 INPUT OUTPUT.{disk_format}")
        });
        ImageServiceInfo {
            disk_format,
            container_format: "bare",
            virtual_size,
            min_disk: virtual_size.div_ceil(GIB),
            safe: unsafe_reasons.is_empty(),
            unsafe_reasons,
            references,
            os_hash_algo,
            os_hash_value,
            input_container_format,
            input_usable: input_container_format.map(|_| false),
            note,
            convert_command,
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

    #[test]
    fn a_compressed_input_describes_the_image_inside() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&vec![7u8; 3 << 20]).unwrap();
        std::fs::write(&path, enc.finish().unwrap()).unwrap();
        let image = Image::open(&path, &crate::OpenOptions::default()).unwrap();
        let sum = crate::checksum::hash_file(&path, crate::HashAlg::Sha256).unwrap();
        let svc = ImageServiceInfo::of(&image, Some(&sum));
        assert_eq!((svc.disk_format, svc.container_format), ("raw", "bare"));
        assert_eq!(svc.input_container_format, Some("compressed"));
        assert_eq!(svc.input_usable, Some(false));
        assert!(svc
            .note
            .as_deref()
            .unwrap()
            .contains("a compressed container around a raw image"));
        assert_eq!(
            svc.convert_command.as_deref(),
            Some("vimg convert -O raw --checksum sha512 INPUT OUTPUT.raw")
        );
        // The container's checksum is not the uploaded file's.
        assert_eq!((svc.os_hash_algo, svc.os_hash_value), (None, None));
        assert_eq!(svc.min_disk, 1);

        let plain = dir.path().join("disk.raw");
        std::fs::write(&plain, vec![7u8; 3 << 20]).unwrap();
        let image = Image::open(&plain, &crate::OpenOptions::default()).unwrap();
        let sum = crate::checksum::hash_file(&plain, crate::HashAlg::Sha256).unwrap();
        let svc = ImageServiceInfo::of(&image, Some(&sum));
        assert_eq!(svc.input_container_format, None);
        assert_eq!(svc.os_hash_algo, Some("sha256"));
        let v = serde_json::to_value(&svc).unwrap();
        for k in [
            "input_container_format",
            "input_usable",
            "note",
            "convert_command",
        ] {
            assert!(v.get(k).is_none(), "{k} in {v}");
        }
    }
}

//! The signatures of the formats issue 13 added (qed, qcow, LUKS, bochs, cloop, dmg), so
//! that probing never mistakes one of them for raw bytes, and a driver for formats vimg
//! recognises but does not read, which refuses them by name (none today: LUKS is read by
//! `formats/luks`, which still refuses LUKS2 by name).
//!
//! Each probe follows the signature check of QEMU's driver for the format (block/qed.c,
//! block/qcow.c, crypto/block-luks.c, block/bochs.c, block/cloop.c, block/dmg.c), with
//! two deliberate differences, both towards refusing rather than guessing:
//! - LUKS version 2 headers are recognised too (QEMU probes them as raw);
//! - dmg is recognised by its UDIF "koly" trailer in the last 512 bytes; QEMU goes by the
//!   file name (".dmg"), which a probe of content cannot see.
//!
//! The readers of qed, qcow, LUKS, bochs, cloop and dmg (their own folders) use these
//! probes.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::formats::{Format, OpenContext};
use crate::mapping::ImageReader;
use crate::options::CreateOptions;
use crate::output::Output;
use crate::storage::Storage;
use crate::writer::ImageWriter;

/// "QED\0" as a little-endian u32 at offset 0 (docs/interop/qed_spec.txt, `magic`).
pub const QED_MAGIC: u32 = 0x0044_4551;
/// Size of the QED header QEMU requires before probing (its `QEDHeader`).
pub const QED_HEADER_SIZE: usize = 64;
/// "QFI\xfb": the qcow magic (big-endian), shared with qcow2.
pub const QCOW_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Size of the qcow version 1 header QEMU requires before probing (its `QCowHeader`).
pub const QCOW_HEADER_SIZE: usize = 48;
/// "LUKS\xba\xbe": the LUKS partition header magic, followed by a big-endian u16 version.
pub const LUKS_MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Size of the Bochs header QEMU requires before probing.
pub const BOCHS_HEADER_SIZE: usize = 512;
/// Bochs magic, NUL-terminated inside a 32-byte field at 0.
pub const BOCHS_MAGIC: &[u8] = b"Bochs Virtual HD Image\0";
/// Bochs image type, NUL-terminated inside a 16-byte field at 32.
pub const BOCHS_TYPE: &[u8] = b"Redolog\0";
/// Bochs image subtype, NUL-terminated inside a 16-byte field at 48.
pub const BOCHS_SUBTYPE: &[u8] = b"Growing\0";
/// Bochs header versions QEMU reads (little-endian u32 at 64): 2.0 and the older 1.0.
pub const BOCHS_VERSIONS: [u32; 2] = [0x0002_0000, 0x0001_0000];
/// The shell preamble every cloop V2.0 image starts with.
pub const CLOOP_MAGIC: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
/// "koly": the UDIF trailer signature, in the last 512 bytes of a dmg.
pub const DMG_KOLY: &[u8; 4] = b"koly";
/// Size of the UDIF trailer.
pub const DMG_TRAILER_SIZE: u64 = 512;

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// qed: the magic, in a head long enough for the header.
pub fn probe_qed(head: &[u8], _storage: &dyn Storage) -> bool {
    head.len() >= QED_HEADER_SIZE && le32(head, 0) == Some(QED_MAGIC)
}

/// qcow (version 1): the qcow magic and version 1 (qcow2 takes versions 2 and up).
pub fn probe_qcow(head: &[u8], _storage: &dyn Storage) -> bool {
    head.len() >= QCOW_HEADER_SIZE && head.starts_with(&QCOW_MAGIC) && be32(head, 4) == Some(1)
}

/// The LUKS version of `head`, when it starts with a LUKS header (1 or 2).
pub fn luks_version(head: &[u8]) -> Option<u16> {
    if !head.starts_with(&LUKS_MAGIC) {
        return None;
    }
    let v = head.get(6..8).map(|s| u16::from_be_bytes([s[0], s[1]]))?;
    matches!(v, 1 | 2).then_some(v)
}

/// LUKS: the magic and version 1 or 2.
pub fn probe_luks(head: &[u8], _storage: &dyn Storage) -> bool {
    luks_version(head).is_some()
}

/// bochs: magic, type "Redolog", subtype "Growing" (each a C string in its field) and a
/// known version.
pub fn probe_bochs(head: &[u8], _storage: &dyn Storage) -> bool {
    head.len() >= BOCHS_HEADER_SIZE
        && head.starts_with(BOCHS_MAGIC)
        && head[32..].starts_with(BOCHS_TYPE)
        && head[48..].starts_with(BOCHS_SUBTYPE)
        && le32(head, 64).is_some_and(|v| BOCHS_VERSIONS.contains(&v))
}

/// cloop: the V2.0 shell preamble.
pub fn probe_cloop(head: &[u8], _storage: &dyn Storage) -> bool {
    head.starts_with(CLOOP_MAGIC)
}

/// dmg: "koly" at the start of the last 512 bytes.
pub fn probe_dmg(_head: &[u8], storage: &dyn Storage) -> bool {
    let len = storage.len();
    if len < DMG_TRAILER_SIZE {
        return false;
    }
    let mut sig = [0u8; 4];
    storage
        .read_exact_at(&mut sig, len - DMG_TRAILER_SIZE)
        .is_ok()
        && &sig == DMG_KOLY
}

/// A driver for a format vimg recognises but does not read or write.
pub struct Unread {
    format: Format,
    probe: fn(&[u8], &dyn Storage) -> bool,
}

/// LUKS (1 and 2).
pub static LUKS: Unread = Unread {
    format: Format::Luks,
    probe: probe_luks,
};
impl Unread {
    fn what(&self, storage: &dyn Storage) -> String {
        let name = self.format.name();
        if self.format == Format::Luks {
            let mut head = [0u8; 8];
            if storage.read_exact_at(&mut head, 0).is_ok() && luks_version(&head) == Some(2) {
                return "a LUKS2 image; vimg does not read LUKS2".to_string();
            }
        }
        format!("a {name} image; vimg does not read {name} yet")
    }
}

impl crate::formats::Driver for Unread {
    fn format(&self) -> Format {
        self.format
    }

    fn probe(&self, head: &[u8], storage: &dyn Storage) -> bool {
        (self.probe)(head, storage)
    }

    fn open(&self, storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Box<dyn ImageReader>> {
        let _ = ctx;
        let msg = format!(
            "this is {} (only '-f raw' copies its bytes as they are)",
            self.what(&*storage)
        );
        Err(Error::unsupported(msg))
    }

    fn create(
        &self,
        _out: &Output,
        _size: u64,
        _opts: &CreateOptions,
    ) -> Result<Box<dyn ImageWriter>> {
        Err(Error::unsupported(format!(
            "vimg does not write {} images yet",
            self.format.name()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn mem(b: &[u8]) -> MemStorage {
        MemStorage::new(b.to_vec())
    }

    #[test]
    fn qed_needs_magic_and_whole_header() {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"QED\0");
        assert!(probe_qed(&h, &mem(&h)));
        assert!(!probe_qed(&h[..63], &mem(&h[..63])));
    }

    #[test]
    fn qcow_version_1_only() {
        let mut h = vec![0u8; 48];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[7] = 1;
        assert!(probe_qcow(&h, &mem(&h)));
        h[7] = 2;
        assert!(!probe_qcow(&h, &mem(&h)));
    }

    #[test]
    fn luks_versions() {
        let mut h = b"LUKS\xba\xbe\x00\x01".to_vec();
        assert_eq!(luks_version(&h), Some(1));
        h[7] = 2;
        assert_eq!(luks_version(&h), Some(2));
        h[7] = 3;
        assert_eq!(luks_version(&h), None);
    }

    #[test]
    fn bochs_fields_are_c_strings() {
        let mut h = vec![0u8; 512];
        h[..22].copy_from_slice(b"Bochs Virtual HD Image");
        h[32..39].copy_from_slice(b"Redolog");
        h[48..55].copy_from_slice(b"Growing");
        h[64..68].copy_from_slice(&0x0002_0000u32.to_le_bytes());
        assert!(probe_bochs(&h, &mem(&h)));
        h[55] = b'X';
        assert!(!probe_bochs(&h, &mem(&h)));
    }

    #[test]
    fn dmg_by_trailer() {
        let mut f = vec![0u8; 4096];
        let at = f.len() - 512;
        f[at..at + 4].copy_from_slice(b"koly");
        assert!(probe_dmg(&f, &mem(&f)));
        assert!(!probe_dmg(&f[..100], &mem(&f[..100])));
    }
}

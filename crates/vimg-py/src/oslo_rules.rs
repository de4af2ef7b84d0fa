//! oslo.utils' own rules for qcow2 feature bits and single-file VMDKs, which its
//! format inspector applies on top of parsing and which callers match on by message. The
//! streaming `vimg.format_inspector` keeps them, under oslo's check names, in addition
//! to the library's verdict (which they never replace). Messages keep oslo's wording.
//!
//! qcow2: QEMU's docs/interop/qcow2.txt, header bytes 72..80 (incompatible features).
//! VMDK: VMware's Virtual Disk Format 1.1, section 4 (hosted sparse extent header, the
//! stream-optimized footer and its markers) and section 3 (the descriptor's lines).

/// Checks a qcow2 header's version and incompatible feature bits: version 2 has none;
/// version 3 may set only bits below `max_bit`; other versions are refused.
pub fn qcow2_features(header: &[u8], max_bit: u32) -> Result<(), String> {
    let be32 = |at: usize| {
        header
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    match be32(4) {
        Some(2) => return Ok(()),
        Some(3) => {}
        _ => return Err("Unsupported qcow2 version".into()),
    }
    let Some(f) = header.get(0x48..0x50) else {
        return Err("qcow2 header too short for its feature bits".into());
    };
    let features = u64::from_be_bytes([f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]]);
    let unknown = if max_bit >= 64 {
        0
    } else {
        features >> max_bit
    };
    if unknown != 0 {
        return Err("Unknown QCOW2 features found".into());
    }
    Ok(())
}

/// The access modes an extent line starts with.
const EXTENT_ACCESS: [&str; 3] = ["rw", "rdonly", "noaccess"];

/// Checks a VMDK descriptor (lower-cased text) as oslo does: a single-file subformat
/// (`createtype` monolithicsparse or streamoptimized), only comment, `ddb`, `key=value`
/// and extent lines, extents naming no path (`/`), and at least one extent.
pub fn vmdk_descriptor(text: &str, create_type: &str) -> Result<(), String> {
    if !matches!(create_type, "monolithicsparse" | "streamoptimized") {
        return Err("Unsupported subformat".into());
    }
    let mut extents = 0usize;
    for line in text.split('\n').map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with("ddb") {
            continue;
        }
        if let Some((key, _)) = line.split_once('=') {
            if !key.contains(' ') {
                continue;
            }
        }
        let first = line.split(' ').next().unwrap_or("");
        if EXTENT_ACCESS.contains(&first) {
            if line.contains('/') {
                return Err("Invalid extent filenames found".into());
            }
            extents += 1;
            continue;
        }
        return Err("Invalid VMDK descriptor data".into());
    }
    if extents == 0 {
        return Err("No extents found".into());
    }
    Ok(())
}

/// gdOffset value meaning "the grain directory is in the footer".
pub const GD_AT_END: u64 = u64::MAX;
/// Stream-optimized marker types.
const MARKER_EOS: u32 = 0;
const MARKER_FOOTER: u32 = 3;

/// The fields of a hosted sparse extent header oslo compares: signature, version,
/// descriptor sector, descriptor sectors, gdOffset.
fn sparse_fields(b: &[u8]) -> Option<([u8; 4], u32, u64, u64, u64)> {
    let b = b.get(..64)?;
    let le32 = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let le64 = |at: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(x)
    };
    Some((
        [b[0], b[1], b[2], b[3]],
        le32(4),
        le64(28),
        le64(36),
        le64(56),
    ))
}

/// A marker sector: (value, size == 0 and type == `kind` and zero padding).
fn marker(sector: &[u8], kind: u32) -> Option<(u64, bool)> {
    let s = sector.get(..512)?;
    let mut v = [0u8; 8];
    v.copy_from_slice(&s[..8]);
    let size = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    let typ = u32::from_le_bytes([s[12], s[13], s[14], s[15]]);
    Some((
        u64::from_le_bytes(v),
        size == 0 && typ == kind && s[16..].iter().all(|&x| x == 0),
    ))
}

/// Checks a stream-optimized VMDK's last three sectors (footer marker, footer, end-of-
/// stream marker) against its header: same signature, version and descriptor, a grain
/// directory offset that is not "at end" again, and well-formed markers.
pub fn vmdk_footer(header: &[u8], footer: &[u8]) -> Result<(), String> {
    let h = sparse_fields(header).ok_or("VMDK header too short")?;
    let f = footer
        .get(512..)
        .and_then(sparse_fields)
        .ok_or("VMDK footer too short")?;
    if h.0 != f.0 {
        return Err("Header and footer signature do not match".into());
    }
    if h.1 != f.1 {
        return Err("Header and footer versions do not match".into());
    }
    if (h.2, h.3) != (f.2, f.3) {
        return Err("Footer specifies a different descriptor than header".into());
    }
    if f.4 == GD_AT_END {
        return Err("Footer indicates another footer".into());
    }
    match marker(footer, MARKER_FOOTER) {
        Some((_, true)) => {}
        _ => return Err("Footer marker is invalid".into()),
    }
    match footer.get(1024..).and_then(|s| marker(s, MARKER_EOS)) {
        Some((0, true)) => Ok(()),
        _ => Err("End-of-stream marker is invalid".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_feature_bits() {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[7] = 3;
        assert!(qcow2_features(&h, 5).is_ok());
        h[0x4f] = 0x80; // bit 7
        assert!(qcow2_features(&h, 5).unwrap_err().contains("Unknown"));
        assert!(qcow2_features(&h, 12).is_ok());
        h[7] = 2;
        assert!(qcow2_features(&h, 5).is_ok());
        h[7] = 4;
        assert!(qcow2_features(&h, 5).unwrap_err().contains("version"));
    }

    #[test]
    fn vmdk_descriptor_lines() {
        let ok = "# c\ncreatetype=\"monolithicsparse\"\nddb.x = \"1\"\nrw 2048 sparse \"a.vmdk\"\n";
        assert!(vmdk_descriptor(ok, "monolithicsparse").is_ok());
        assert!(vmdk_descriptor(ok, "monolithicflat")
            .unwrap_err()
            .contains("subformat"));
        let abs = "rw 2048 sparse \"/etc/hosts\"\n";
        assert!(vmdk_descriptor(abs, "streamoptimized")
            .unwrap_err()
            .contains("filenames"));
        assert!(vmdk_descriptor("wronly 1 x\n", "streamoptimized")
            .unwrap_err()
            .contains("data"));
        assert!(vmdk_descriptor("a=b\n", "streamoptimized")
            .unwrap_err()
            .contains("No extents"));
    }
}

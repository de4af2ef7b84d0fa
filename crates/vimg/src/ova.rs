//! OVA: a tar archive holding an OVF descriptor and the disk files it names (DMTF DSP0243
//! "Open Virtualization Format Specification" 2.1, section 5.3: an OVA is a POSIX/ustar tar
//! with the `.ovf` descriptor first). A disk is read in place, as a window
//! ([`crate::storage::SliceStorage`]) over its tar member: nothing is unpacked.
//!
//! The tar headers are parsed here with strict checks (header checksum, sizes in octal or
//! base-256, every member inside the file, no absolute or `..` names, bounded counts), and
//! the OVF minimally: `References/File` (`id`, `href`, `size`, `compression`, `chunkSize`)
//! and `DiskSection/Disk` (`diskId`, `fileRef`, `capacity`, `capacityAllocationUnits`,
//! `format`). XML is read with quick-xml, which expands no external entities.

use std::path::{Component, Path};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{ErrorKind, FormatError, Result};
use crate::storage::Storage;

/// Size of a tar header block (and the unit member data is padded to).
const BLOCK: u64 = 512;
/// Offset of the ustar magic in a header ("ustar\0" POSIX, "ustar  \0" GNU).
const USTAR_MAGIC_AT: usize = 257;
/// Most members an OVA may hold.
const MAX_MEMBERS: usize = 100_000;
/// Largest pax extended header or GNU long name read into memory.
const MAX_EXT_HEADER: u64 = 1 << 20;
/// Largest OVF descriptor read into memory.
const MAX_OVF: u64 = 16 << 20;

/// Why an OVA was refused.
#[derive(Debug, thiserror::Error)]
pub enum OvaError {
    /// A tar header is malformed.
    #[error("OVA '{name}': tar header at offset {offset:#x} is invalid: {detail}")]
    BadHeader {
        /// The archive.
        name: String,
        /// Where the header is.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// A member extends past the end of the archive.
    #[error("OVA '{name}': member '{member}' at offset {offset:#x} claims {size} bytes, past the end of the file ({len} bytes)")]
    PastEnd {
        /// The archive.
        name: String,
        /// The member.
        member: String,
        /// Where its data starts.
        offset: u64,
        /// Its claimed size.
        size: u64,
        /// The archive's length.
        len: u64,
    },
    /// A member name that is absolute or climbs out with `..`.
    #[error("OVA '{name}': member name '{member}' at offset {offset:#x} is unsafe (absolute or with '..')")]
    UnsafeName {
        /// The archive.
        name: String,
        /// The member name.
        member: String,
        /// Where its header is.
        offset: u64,
    },
    /// The OVF descriptor is malformed or names something the archive lacks.
    #[error("OVA '{name}': OVF descriptor '{ovf}': {detail}")]
    BadOvf {
        /// The archive.
        name: String,
        /// The descriptor's member name.
        ovf: String,
        /// What is wrong.
        detail: String,
    },
    /// A limit was exceeded.
    #[error("OVA '{name}': {detail}")]
    TooLarge {
        /// The archive.
        name: String,
        /// What is too large.
        detail: String,
    },
}

impl FormatError for OvaError {
    fn kind(&self) -> ErrorKind {
        match self {
            OvaError::UnsafeName { .. } => ErrorKind::UnsafeReference,
            OvaError::TooLarge { .. } => ErrorKind::Unsupported,
            OvaError::PastEnd { .. } => ErrorKind::Corrupt,
            _ => ErrorKind::Invalid,
        }
    }
}
crate::impl_from_format_error!(OvaError);

/// One regular file in the archive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Member {
    /// Its name.
    pub name: String,
    /// Offset of its data in the archive.
    pub offset: u64,
    /// Its size.
    pub size: u64,
}

/// A disk the OVF names, located in the archive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OvaDisk {
    /// `ovf:diskId` (or the file id when the OVF has no disk section).
    pub disk_id: String,
    /// The member holding it (`ovf:href`).
    pub file: String,
    /// Offset of the member's data in the archive.
    pub member_offset: u64,
    /// Size of the member.
    pub member_size: u64,
    /// Guest size the OVF declares, in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    /// `ovf:format`: a URL naming the disk format (e.g. VMware's `...#streamOptimized`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// `ovf:compression` of the file (`gzip`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
}

/// A parsed OVA.
#[derive(Clone, Debug)]
pub struct Ova {
    /// The OVF descriptor's member name.
    pub ovf_name: String,
    /// The disks, in the OVF's order.
    pub disks: Vec<OvaDisk>,
    /// Every regular file in the archive.
    pub members: Vec<Member>,
}

fn header_checksum_ok(h: &[u8]) -> bool {
    let Some(stored) = parse_octal(&h[148..156]) else {
        return false;
    };
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(*b)
            }
        })
        .sum();
    sum == stored
}

/// True when `head` starts with a ustar header whose checksum is right.
pub fn looks_like_tar(head: &[u8]) -> bool {
    head.len() >= BLOCK as usize
        && &head[USTAR_MAGIC_AT..USTAR_MAGIC_AT + 5] == b"ustar"
        && header_checksum_ok(&head[..BLOCK as usize])
}

/// An octal field: optional leading spaces, digits, then NUL or space padding.
fn parse_octal(f: &[u8]) -> Option<u64> {
    let s: Vec<u8> = f
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| *b != 0 && *b != b' ')
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    let mut v = 0u64;
    for b in s {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// A size field: octal, or GNU base-256 (first byte 0x80, then big-endian).
fn parse_size(f: &[u8]) -> Option<u64> {
    if f.first() == Some(&0x80) {
        let mut v = 0u64;
        for b in &f[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(v);
    }
    if f.first().is_some_and(|b| b & 0x80 != 0) {
        return None;
    }
    parse_octal(f)
}

fn cstr(f: &[u8]) -> String {
    let end = f.iter().position(|b| *b == 0).unwrap_or(f.len());
    String::from_utf8_lossy(&f[..end]).into_owned()
}

fn safe_name(n: &str) -> bool {
    let p = Path::new(n);
    !n.is_empty()
        && !p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Normalises a member or href name for matching (`./disk.vmdk` = `disk.vmdk`).
fn norm(n: &str) -> String {
    Path::new(n)
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Parses pax extended header records (`"%d %s=%s\n"`) for `path` and `size`.
fn parse_pax(data: &[u8]) -> Option<(Option<String>, Option<u64>)> {
    let mut path = None;
    let mut size = None;
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest.iter().position(|b| *b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp + 1 || len > rest.len() {
            return None;
        }
        let rec = &rest[sp + 1..len];
        let rec = rec.strip_suffix(b"\n")?;
        let eq = rec.iter().position(|b| *b == b'=')?;
        let (k, v) = (&rec[..eq], &rec[eq + 1..]);
        match k {
            b"path" => path = Some(String::from_utf8_lossy(v).into_owned()),
            b"size" => size = Some(std::str::from_utf8(v).ok()?.parse().ok()?),
            _ => {}
        }
        rest = &rest[len..];
    }
    Some((path, size))
}

/// Walks the tar headers of `s`.
pub fn members(s: &dyn Storage, name: &str) -> Result<Vec<Member>> {
    let len = s.len();
    let mut pos = 0u64;
    let mut out = Vec::new();
    let mut long_name: Option<String> = None;
    let mut pax: Option<(Option<String>, Option<u64>)> = None;
    let bad = |offset: u64, detail: String| OvaError::BadHeader {
        name: name.to_string(),
        offset,
        detail,
    };
    loop {
        if pos == len {
            // No end-of-archive blocks: tolerated, as tar does with a warning.
            break;
        }
        let mut h = [0u8; BLOCK as usize];
        s.read_exact_at(&mut h, pos)
            .map_err(|e| bad(pos, format!("cannot be read: {e}")))?;
        if h.iter().all(|b| *b == 0) {
            break;
        }
        if !header_checksum_ok(&h) {
            return Err(bad(pos, "header checksum does not match".into()).into());
        }
        let size = parse_size(&h[124..136])
            .ok_or_else(|| bad(pos, "size field is not a number".into()))?;
        let typeflag = h[156];
        let mut mname = cstr(&h[0..100]);
        if &h[USTAR_MAGIC_AT..USTAR_MAGIC_AT + 5] == b"ustar" {
            let prefix = cstr(&h[345..500]);
            if !prefix.is_empty() && typeflag != b'L' {
                mname = format!("{prefix}/{mname}");
            }
        }
        let data_at = pos + BLOCK;
        let mut msize = size;
        let ext_read = |n: u64| -> Result<Vec<u8>> {
            if n > MAX_EXT_HEADER {
                return Err(OvaError::TooLarge {
                    name: name.to_string(),
                    detail: format!("extended header at {pos:#x} is {n} bytes"),
                }
                .into());
            }
            let mut v = vec![0u8; n as usize];
            s.read_exact_at(&mut v, data_at)
                .map_err(|e| bad(pos, format!("extended header cannot be read: {e}")))?;
            Ok(v)
        };
        let end_check = |member: &str, sz: u64| -> Result<u64> {
            data_at
                .checked_add(sz)
                .filter(|e| *e <= len)
                .ok_or_else(|| {
                    OvaError::PastEnd {
                        name: name.to_string(),
                        member: member.to_string(),
                        offset: data_at,
                        size: sz,
                        len,
                    }
                    .into()
                })
        };
        match typeflag {
            b'x' => {
                end_check(&mname, size)?;
                let data = ext_read(size)?;
                pax = Some(
                    parse_pax(&data).ok_or_else(|| bad(pos, "pax header is malformed".into()))?,
                );
            }
            b'L' => {
                end_check(&mname, size)?;
                let data = ext_read(size)?;
                long_name = Some(cstr(&data));
            }
            b'0' | 0 | b'7' => {
                if let Some(n) = long_name.take() {
                    mname = n;
                }
                if let Some((p, sz)) = pax.take() {
                    if let Some(p) = p {
                        mname = p;
                    }
                    if let Some(sz) = sz {
                        msize = sz;
                    }
                }
                if !safe_name(&mname) {
                    return Err(OvaError::UnsafeName {
                        name: name.to_string(),
                        member: mname,
                        offset: pos,
                    }
                    .into());
                }
                end_check(&mname, msize)?;
                if out.len() >= MAX_MEMBERS {
                    return Err(OvaError::TooLarge {
                        name: name.to_string(),
                        detail: format!("more than {MAX_MEMBERS} members"),
                    }
                    .into());
                }
                out.push(Member {
                    name: norm(&mname),
                    offset: data_at,
                    size: msize,
                });
            }
            _ => {
                // Folders, links, devices: never disks; their names still must be safe.
                long_name = None;
                pax = None;
                if !mname.is_empty() && !safe_name(&mname) {
                    return Err(OvaError::UnsafeName {
                        name: name.to_string(),
                        member: mname,
                        offset: pos,
                    }
                    .into());
                }
            }
        }
        // Regular members may have a pax size; others use the header's.
        let body = if matches!(typeflag, b'0' | 0 | b'7') {
            msize
        } else {
            size
        };
        let padded = body
            .checked_add(BLOCK - 1)
            .map(|x| x / BLOCK * BLOCK)
            .and_then(|x| data_at.checked_add(x))
            .ok_or_else(|| bad(pos, "size overflows".into()))?;
        if padded > len {
            // The last member's padding may be missing in truncated archives; the data
            // itself was checked to be there.
            break;
        }
        pos = padded;
    }
    Ok(out)
}

/// `capacity` in `units` (`byte * 2^N` as DSP0004 writes programmatic units, or nothing for
/// bytes).
fn capacity_bytes(capacity: &str, units: Option<&str>) -> Option<u64> {
    let n: u64 = capacity.trim().parse().ok()?;
    let Some(u) = units else {
        return Some(n);
    };
    let u: String = u.chars().filter(|c| !c.is_whitespace()).collect();
    let u = u.to_ascii_lowercase();
    if u == "byte" || u == "bytes" {
        return Some(n);
    }
    let exp = u.strip_prefix("byte*2^")?;
    let e: u32 = exp.parse().ok()?;
    if e > 62 {
        return None;
    }
    n.checked_mul(1u64 << e)
}

struct OvfFile {
    id: String,
    href: String,
    compression: Option<String>,
    chunked: bool,
}

struct OvfDisk {
    id: String,
    file_ref: Option<String>,
    capacity: Option<String>,
    units: Option<String>,
    format: Option<String>,
}

/// Parses the File and Disk elements of an OVF descriptor; `bad` words a fault as the
/// archive's error (naming the archive and the descriptor).
fn parse_ovf(
    xml: &str,
    bad: &dyn Fn(String) -> OvaError,
) -> std::result::Result<(Vec<OvfFile>, Vec<OvfDisk>), OvaError> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut files = Vec::new();
    let mut disks = Vec::new();
    loop {
        let ev = reader.read_event().map_err(|e| {
            bad(format!(
                "XML error at byte {}: {e}",
                reader.buffer_position()
            ))
        })?;
        let e = match ev {
            Event::Start(e) | Event::Empty(e) => e,
            Event::Eof => break,
            _ => continue,
        };
        let local = e.local_name();
        let tag = local.as_ref();
        if tag != b"File" && tag != b"Disk" {
            continue;
        }
        let mut attrs = std::collections::HashMap::new();
        for a in e.attributes() {
            let a = a.map_err(|e| bad(format!("bad attribute: {e}")))?;
            let k = String::from_utf8_lossy(a.key.local_name().as_ref()).into_owned();
            let v = a
                .unescape_value()
                .map_err(|e| bad(format!("bad attribute value: {e}")))?
                .into_owned();
            attrs.insert(k, v);
        }
        if files.len() + disks.len() >= MAX_MEMBERS {
            return Err(bad("too many File and Disk elements".into()));
        }
        if tag == b"File" {
            let (Some(id), Some(href)) = (attrs.get("id"), attrs.get("href")) else {
                return Err(bad("a File element lacks ovf:id or ovf:href".into()));
            };
            files.push(OvfFile {
                id: id.clone(),
                href: href.clone(),
                compression: attrs.get("compression").cloned(),
                chunked: attrs.contains_key("chunkSize"),
            });
        } else {
            let Some(id) = attrs.get("diskId") else {
                return Err(bad("a Disk element lacks ovf:diskId".into()));
            };
            disks.push(OvfDisk {
                id: id.clone(),
                file_ref: attrs.get("fileRef").cloned(),
                capacity: attrs.get("capacity").cloned(),
                units: attrs.get("capacityAllocationUnits").cloned(),
                format: attrs.get("format").cloned(),
            });
        }
    }
    Ok((files, disks))
}

impl Ova {
    /// Parses `storage` as an OVA; `Ok(None)` when it is a tar without an `.ovf` member.
    pub fn parse(storage: Arc<dyn Storage>, name: &str) -> Result<Option<Ova>> {
        let members = members(&*storage, name)?;
        let Some(ovf) = members
            .iter()
            .find(|m| m.name.to_ascii_lowercase().ends_with(".ovf"))
        else {
            return Ok(None);
        };
        let ovf_err = |detail: String| OvaError::BadOvf {
            name: name.to_string(),
            ovf: ovf.name.clone(),
            detail,
        };
        if ovf.size > MAX_OVF {
            return Err(OvaError::TooLarge {
                name: name.to_string(),
                detail: format!("OVF descriptor '{}' is {} bytes", ovf.name, ovf.size),
            }
            .into());
        }
        let mut buf = vec![0u8; ovf.size as usize];
        storage
            .read_exact_at(&mut buf, ovf.offset)
            .map_err(|e| ovf_err(format!("cannot be read: {e}")))?;
        let text = String::from_utf8(buf).map_err(|_| ovf_err("is not UTF-8".into()))?;
        let (files, ovf_disks) = parse_ovf(&text, &ovf_err)?;
        let find_member = |href: &str| -> Result<&Member> {
            if !safe_name(href) {
                return Err(ovf_err(format!("names an unsafe file '{href}'")).into());
            }
            let want = norm(href);
            members.iter().find(|m| m.name == want).ok_or_else(|| {
                ovf_err(format!(
                    "names file '{href}', which the archive does not contain"
                ))
                .into()
            })
        };
        let mut disks = Vec::new();
        let mut add =
            |id: &str, f: &OvfFile, cap: Option<u64>, format: Option<String>| -> Result<()> {
                if f.chunked {
                    return Err(ovf_err(format!(
                        "file '{}' is split into chunks (ovf:chunkSize), which vimg does not read",
                        f.href
                    ))
                    .into());
                }
                let m = find_member(&f.href)?;
                disks.push(OvaDisk {
                    disk_id: id.to_string(),
                    file: m.name.clone(),
                    member_offset: m.offset,
                    member_size: m.size,
                    capacity: cap,
                    format,
                    compression: f.compression.clone(),
                });
                Ok(())
            };
        if ovf_disks.is_empty() {
            for f in &files {
                add(&f.id, f, None, None)?;
            }
        } else {
            for d in &ovf_disks {
                // A disk without a file is a blank disk the importer creates: nothing to read.
                let Some(r) = &d.file_ref else { continue };
                let f = files.iter().find(|f| &f.id == r).ok_or_else(|| {
                    ovf_err(format!(
                        "disk '{}' refers to file id '{r}', which References does not list",
                        d.id
                    ))
                })?;
                let cap = d
                    .capacity
                    .as_deref()
                    .and_then(|c| capacity_bytes(c, d.units.as_deref()));
                add(&d.id, f, cap, d.format.clone())?;
            }
        }
        if disks.is_empty() {
            return Err(ovf_err("names no disk file".into()).into());
        }
        let ovf_name = ovf.name.clone();
        Ok(Some(Ova {
            ovf_name,
            disks,
            members,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    /// A ustar header for `name` of `size` bytes.
    fn header(name: &str, size: u64, typeflag: u8) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[156] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let sum: u64 = h
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(*b)
                }
            })
            .sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h[155] = b' ';
        h
    }

    fn tar(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut v = Vec::new();
        for (n, d) in members {
            v.extend(header(n, d.len() as u64, b'0'));
            v.extend_from_slice(d);
            v.resize(v.len().div_ceil(512) * 512, 0);
        }
        v.extend(vec![0u8; 1024]);
        v
    }

    const OVF: &str = r#"<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:id="file1" ovf:href="disk1.img" ovf:size="2048"/>
    <File ovf:id="file2" ovf:href="./disk2.img"/>
  </References>
  <DiskSection>
    <Info>disks</Info>
    <Disk ovf:diskId="vmdisk2" ovf:fileRef="file2" ovf:capacity="1" ovf:capacityAllocationUnits="byte * 2^20"/>
    <Disk ovf:diskId="blank" ovf:capacity="1"/>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="4096" ovf:format="http://example/raw"/>
  </DiskSection>
</Envelope>"#;

    #[test]
    fn disks_in_ovf_order() {
        let d1 = vec![1u8; 2048];
        let d2 = vec![2u8; 1000];
        let t = tar(&[
            ("vm.ovf", OVF.as_bytes()),
            ("disk1.img", &d1),
            ("disk2.img", &d2),
        ]);
        assert!(looks_like_tar(&t));
        let ova = Ova::parse(Arc::new(MemStorage::new(t.clone())), "x.ova")
            .unwrap()
            .unwrap();
        assert_eq!(ova.ovf_name, "vm.ovf");
        assert_eq!(ova.disks.len(), 2);
        assert_eq!(ova.disks[0].disk_id, "vmdisk2");
        assert_eq!(ova.disks[0].file, "disk2.img");
        assert_eq!(ova.disks[0].capacity, Some(1 << 20));
        assert_eq!(ova.disks[0].member_size, 1000);
        assert_eq!(t[ova.disks[0].member_offset as usize], 2);
        assert_eq!(ova.disks[1].capacity, Some(4096));
    }

    #[test]
    fn hostile_archives_fail_clearly() {
        // A name that climbs out.
        let t = tar(&[("../evil.ovf", OVF.as_bytes())]);
        let e = Ova::parse(Arc::new(MemStorage::new(t)), "x.ova").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{e}");
        // A member that claims more than the file holds.
        let mut t = header("vm.ovf", 0o37777777777, b'0');
        t.extend(vec![0u8; 1024]);
        let e = Ova::parse(Arc::new(MemStorage::new(t)), "x.ova").unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
        // A bad checksum.
        let mut t = tar(&[("vm.ovf", OVF.as_bytes())]);
        t[0] = b'W';
        assert!(Ova::parse(Arc::new(MemStorage::new(t)), "x.ova").is_err());
        // An OVF naming a file that is not there.
        let t = tar(&[("vm.ovf", OVF.as_bytes())]);
        let e = Ova::parse(Arc::new(MemStorage::new(t)), "x.ova").unwrap_err();
        assert!(e.to_string().contains("does not contain"), "{e}");
        // A tar without an OVF is not an OVA.
        let t = tar(&[("a.txt", b"hi")]);
        assert!(Ova::parse(Arc::new(MemStorage::new(t)), "x.tar")
            .unwrap()
            .is_none());
    }

    #[test]
    fn field_parsers() {
        assert_eq!(parse_octal(b"0000644\0"), Some(0o644));
        assert_eq!(parse_octal(b"  12 \0"), Some(0o12));
        assert_eq!(parse_octal(b"0009"), None);
        let mut b = [0u8; 12];
        b[0] = 0x80;
        b[11] = 5;
        b[10] = 1;
        assert_eq!(parse_size(&b), Some(261));
        assert_eq!(capacity_bytes("2", Some("byte * 2^30")), Some(2 << 30));
        assert_eq!(capacity_bytes("7", None), Some(7));
        assert_eq!(capacity_bytes("7", Some("byte * 2^70")), None);
        assert_eq!(
            parse_pax(b"19 path=disk1.vmdk\n11 size=42\n"),
            Some((Some("disk1.vmdk".into()), Some(42)))
        );
        assert_eq!(parse_pax(b"99 path=x\n"), None);
    }
}

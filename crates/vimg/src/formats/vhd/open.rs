//! Opening a VHD: picks the footer, validates the dynamic header, the parent locators and
//! every BAT entry once (Microsoft's VHD specification, "Hard Disk Footer Format",
//! "Dynamic Disk Header Format", "Block Allocation Table"). `read.rs` answers `map`.

use std::sync::Arc;

use super::error::VhdError;
use super::geometry::{self, MAX_SECTORS};
use super::header::{
    self, bitmap_size, show_bytes, DynHeader, Footer, BAT_UNUSED, DISK_TYPE_DIFFERENCING,
    DISK_TYPE_DYNAMIC, DISK_TYPE_FIXED, DYN_HEADER_SIZE, FOOTER_SIZE, SECTOR,
};
use super::read::{BitmapCache, DiskKind, Dynamic, VhdReader};
use crate::error::Result;
use crate::formats::Format;
use crate::limits;
use crate::mapping::{BackingRef, ExternalRef, RefRole};
use crate::storage::{read_exact, Storage};

/// Largest parent locator the reader decodes (a Windows path of 32767 UTF-16 units).
const MAX_LOCATOR_BYTES: u32 = 65536;

/// A region of the file that holds metadata, for overlap checks.
#[derive(Clone, Debug)]
struct Region {
    start: u64,
    end: u64,
    what: String,
}

fn overlaps(a0: u64, a1: u64, b0: u64, b1: u64) -> bool {
    a0 < b1 && b0 < a1
}

/// Reads and parses the footer at `offset`, if its cookie is there.
fn footer_at(storage: &dyn Storage, offset: u64) -> Result<Option<Footer>> {
    let mut b = [0u8; FOOTER_SIZE];
    read_exact(storage, &mut b, offset, "VHD footer")?;
    if b[..8] != header::FOOTER_COOKIE {
        return Ok(None);
    }
    Ok(Some(Footer::parse(&b)?))
}

/// True when the last 512 bytes of `storage` hold a valid fixed-disk footer whose disk is
/// exactly the rest of the file: cookie, checksum, type fixed, `current_size + 512` equal to
/// the file length. This is how a fixed VHD (which has no header) is recognised.
pub fn has_fixed_footer(storage: &dyn Storage) -> bool {
    let len = storage.len();
    if len < FOOTER_SIZE as u64 {
        return false;
    }
    match footer_at(storage, len - FOOTER_SIZE as u64) {
        Ok(Some(f)) => {
            f.checksum_ok()
                && f.disk_type == DISK_TYPE_FIXED
                && f.current_size.checked_add(FOOTER_SIZE as u64) == Some(len)
        }
        _ => false,
    }
}

fn checksum_error(f: &Footer, offset: u64) -> VhdError {
    VhdError::Checksum {
        structure: "VHD footer",
        offset,
        stored: f.checksum,
        computed: f.computed_checksum(),
    }
}

/// Decodes UTF-16LE locator data, up to the first NUL.
fn utf16le(data: &[u8]) -> Option<String> {
    if !data.len().is_multiple_of(2) {
        return None;
    }
    let units: Vec<u16> = data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|u| *u != 0)
        .collect();
    String::from_utf16(&units).ok().filter(|s| !s.is_empty())
}

/// A Windows path as vimg passes it to the gate: backslashes become slashes. A relative path
/// keeps its `.\` and `..\` parts, so the gate sees (and refuses) escapes.
fn windows_path(p: &str) -> String {
    p.replace('\\', "/")
}

/// The path of a `MacX` locator: a `file://` URL (RFC 2396), percent-decoded.
pub(super) fn file_url_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix("file://")?;
    // "file://localhost/x" and "file:///x" name /x; anything else after "//" is a host.
    let path = if let Some(p) = rest.strip_prefix("localhost") {
        p
    } else {
        rest
    };
    if !path.starts_with('/') {
        return None;
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl VhdReader {
    /// Opens the VHD in `storage`.
    pub fn open(storage: Arc<dyn Storage>) -> Result<VhdReader> {
        let len = storage.len();
        if len < FOOTER_SIZE as u64 {
            return Err(VhdError::TooShort { len }.into());
        }
        let tail_at = len - FOOTER_SIZE as u64;
        let head = footer_at(&*storage, 0)?;
        let tail = if tail_at == 0 {
            head.clone()
        } else {
            footer_at(&*storage, tail_at)?
        };
        let mut warnings = Vec::new();
        let tail_ok = tail.as_ref().filter(|f| f.checksum_ok());
        let head_ok = head.as_ref().filter(|f| f.checksum_ok());

        // The footer at the end is the footer; the copy at offset 0 of dynamic disks is there
        // for redundancy, and the specification says to use it when the footer's checksum
        // fails. A valid fixed footer at the end wins even over a "conectix" at offset 0
        // (a fixed disk whose guest data starts with a VHD).
        let (footer, footer_offset) = match (tail_ok, head_ok) {
            (Some(t), _) if t.disk_type == DISK_TYPE_FIXED => (t.clone(), tail_at),
            (Some(t), Some(h)) => {
                if t != h {
                    warnings.push(
                        "the footer copy at the start of the file differs from the footer at the end; using the footer at the end"
                            .to_string(),
                    );
                }
                (t.clone(), tail_at)
            }
            (Some(t), None) => {
                match &head {
                    Some(h) => warnings.push(format!(
                        "the footer copy at the start of the file is corrupt (checksum {:#010x}, expected {:#010x}); using the footer at the end",
                        h.checksum,
                        h.computed_checksum()
                    )),
                    None => warnings.push(
                        "the dynamic disk has no footer copy at the start of the file".to_string(),
                    ),
                }
                (t.clone(), tail_at)
            }
            (None, Some(h)) => {
                match &tail {
                    Some(t) => warnings.push(format!(
                        "the footer at the end of the file is corrupt (checksum {:#010x}, expected {:#010x}); using its copy at the start",
                        t.checksum,
                        t.computed_checksum()
                    )),
                    None => warnings.push("the footer at the end of the file is missing; using its copy at the start".to_string()),
                }
                (h.clone(), 0)
            }
            (None, None) => {
                return Err(match (&tail, &head) {
                    (Some(t), _) => checksum_error(t, tail_at),
                    (None, Some(h)) => checksum_error(h, 0),
                    (None, None) => VhdError::NoFooter,
                }
                .into())
            }
        };
        if footer.version >> 16 != 1 {
            return Err(VhdError::Version {
                structure: "VHD footer",
                offset: footer_offset,
                version: footer.version,
            }
            .into());
        }
        let kind = match footer.disk_type {
            DISK_TYPE_FIXED => DiskKind::Fixed,
            DISK_TYPE_DYNAMIC => DiskKind::Dynamic,
            DISK_TYPE_DIFFERENCING => DiskKind::Differencing,
            t => {
                return Err(VhdError::DiskType {
                    offset: footer_offset,
                    disk_type: t,
                }
                .into())
            }
        };
        if kind == DiskKind::Fixed && footer_offset != tail_at {
            return Err(VhdError::Layout(
                "a fixed-disk footer is at the start of the file, but the end of the file holds no valid footer".into(),
            )
            .into());
        }
        let sectors = geometry::virtual_sectors(&footer);
        let virtual_size = sectors * SECTOR;
        if sectors > MAX_SECTORS {
            return Err(VhdError::TooLarge { size: virtual_size }.into());
        }
        let mut reader = VhdReader {
            storage,
            footer,
            footer_offset,
            kind,
            virtual_size,
            dynamic: None,
            backing: None,
            refs: Vec::new(),
            warnings,
        };
        match kind {
            DiskKind::Fixed => {
                if virtual_size > tail_at {
                    return Err(VhdError::FixedTruncated {
                        size: virtual_size,
                        data: tail_at,
                    }
                    .into());
                }
            }
            DiskKind::Dynamic | DiskKind::Differencing => {
                let has_head = head.is_some();
                let has_tail = tail.is_some() && tail_at > 0;
                reader.open_dynamic(has_head, has_tail)?;
            }
        }
        Ok(reader)
    }

    fn open_dynamic(&mut self, has_head: bool, has_tail: bool) -> Result<()> {
        let storage = self.storage.clone();
        let len = storage.len();
        let hoff = self.footer.data_offset;
        let head_end = if has_head { FOOTER_SIZE as u64 } else { 0 };
        if hoff < head_end || hoff >= len {
            return Err(VhdError::HeaderOffset { offset: hoff, len }.into());
        }
        // qemu reads the header zero-padded where it runs past the end of the file and
        // checks its fields first (block/vpc.c, vpc_open); vimg reads the same 1024 bytes at
        // most and checks the fields qemu checks in qemu's order, then refuses the header
        // that does not fit, then its own checks (checksum, version).
        let mut hb = [0u8; DYN_HEADER_SIZE];
        let have = (len - hoff).min(DYN_HEADER_SIZE as u64) as usize;
        read_exact(&*storage, &mut hb[..have], hoff, "VHD dynamic disk header")?;
        let header = DynHeader::parse(&hb).map_err(|e| match e {
            VhdError::BadCookie {
                structure,
                found,
                expected,
                ..
            } => VhdError::BadCookie {
                structure,
                offset: hoff,
                found,
                expected,
            },
            e => e,
        })?;
        let bs = header.block_size;
        if !bs.is_power_of_two() || bs < SECTOR as u32 {
            return Err(VhdError::BlockSize {
                offset: hoff,
                block_size: bs,
            }
            .into());
        }
        let block_size = u64::from(bs);
        let entries = header.max_table_entries;
        let covers = u64::from(entries) * block_size;
        if covers < self.virtual_size {
            return Err(VhdError::TableTooSmall {
                offset: hoff,
                entries,
                block_size,
                covers,
                size: self.virtual_size,
            }
            .into());
        }
        if entries > i32::MAX as u32 / 4 {
            return Err(VhdError::TableTooLarge {
                offset: hoff,
                entries,
            }
            .into());
        }
        if hoff
            .checked_add(DYN_HEADER_SIZE as u64)
            .is_none_or(|e| e > len)
        {
            return Err(VhdError::HeaderOffset { offset: hoff, len }.into());
        }
        // qemu does not check this checksum; the specification says a header whose checksum
        // fails is corrupt, and Hyper-V refuses such files, so vimg does too.
        let computed = header.computed_checksum();
        if !crate::checksum::checksum_matches(header.checksum, computed) {
            return Err(VhdError::Checksum {
                structure: "dynamic disk header",
                offset: hoff,
                stored: header.checksum,
                computed,
            }
            .into());
        }
        if header.version >> 16 != 1 {
            return Err(VhdError::Version {
                structure: "dynamic disk header",
                offset: hoff,
                version: header.version,
            }
            .into());
        }
        let bat_bytes = u64::from(entries) * 4;
        let toff = header.table_offset;
        if toff.checked_add(bat_bytes).is_none_or(|e| e > len) {
            return Err(VhdError::TablePastEof {
                offset: toff,
                entries,
                bytes: bat_bytes,
                len,
            }
            .into());
        }
        let n = limits::check_table_bytes("VHD block allocation table", bat_bytes)?;
        let bat_region = bat_bytes.div_ceil(SECTOR) * SECTOR;

        let mut meta = Vec::new();
        if has_head {
            meta.push(Region {
                start: 0,
                end: FOOTER_SIZE as u64,
                what: "footer copy at offset 0".into(),
            });
        }
        meta.push(Region {
            start: hoff,
            end: hoff + DYN_HEADER_SIZE as u64,
            what: format!("dynamic disk header at {hoff:#x}"),
        });
        if has_tail {
            meta.push(Region {
                start: len - FOOTER_SIZE as u64,
                end: len,
                what: format!("footer at {:#x}", len - FOOTER_SIZE as u64),
            });
        }
        for r in &meta {
            if overlaps(toff, toff.saturating_add(bat_region), r.start, r.end) {
                return Err(VhdError::TableOverlap {
                    offset: toff,
                    bytes: bat_region,
                    what: r.what.clone(),
                }
                .into());
            }
        }
        meta.push(Region {
            start: toff,
            end: toff.saturating_add(bat_region),
            what: format!("BAT at {toff:#x}"),
        });

        if self.kind == DiskKind::Differencing {
            self.read_locators(&header, &mut meta)?;
        }

        let mut raw = vec![0u8; n];
        read_exact(&*storage, &mut raw, toff, "VHD block allocation table")?;
        let bat = header::parse_bat(&raw, entries as usize)?;
        drop(raw);
        let bmp = bitmap_size(block_size);
        validate_bat(&bat, block_size + bmp, len, &meta)?;

        self.dynamic = Some(Dynamic {
            metadata_end: (hoff + DYN_HEADER_SIZE as u64).max(toff.saturating_add(bat_region)),
            header,
            bat,
            block_size,
            block_shift: block_size.trailing_zeros(),
            bitmap_size: bmp,
            cache: BitmapCache::new(bmp),
        });
        Ok(())
    }

    /// Decodes the parent locators into the backing reference and the external refs.
    fn read_locators(&mut self, header: &DynHeader, meta: &mut Vec<Region>) -> Result<()> {
        let len = self.storage.len();
        // (priority, field, name): W2ru first (relative, the one the gate can accept), then
        // W2ku, then MacX, then the bare parent name.
        let mut found: Vec<(u8, String, String)> = Vec::new();
        for (i, loc) in header.locators.iter().enumerate() {
            if loc.is_unused() || loc.platform_code == [0; 4] {
                continue;
            }
            let code = show_bytes(&loc.platform_code);
            let bad = |reason: String| VhdError::Locator {
                index: i,
                code: code.clone(),
                reason,
            };
            let prio = match loc.platform_code {
                header::PLATFORM_W2RU => 0,
                header::PLATFORM_W2KU => 1,
                header::PLATFORM_MACX => 2,
                // A Mac OS alias blob or a deprecated code-page path: nothing vimg can use.
                _ => continue,
            };
            if loc.data_length == 0 {
                continue;
            }
            if loc.data_length > MAX_LOCATOR_BYTES {
                return Err(bad(format!(
                    "has data length {:#x}, more than the {MAX_LOCATOR_BYTES:#x} bytes of any file name",
                    loc.data_length
                ))
                .into());
            }
            let dlen = u64::from(loc.data_length);
            let end = loc.data_offset.checked_add(dlen).filter(|e| *e <= len).ok_or_else(|| {
                bad(format!(
                    "data at {:#x} ({dlen:#x} bytes) lies past the end of the file ({len:#x} bytes)",
                    loc.data_offset
                ))
            })?;
            for r in meta.iter() {
                if overlaps(loc.data_offset, end, r.start, r.end) {
                    return Err(bad(format!(
                        "data at {:#x} ({dlen:#x} bytes) overlaps the {}",
                        loc.data_offset, r.what
                    ))
                    .into());
                }
            }
            let mut data = vec![0u8; dlen as usize];
            read_exact(
                &*self.storage,
                &mut data,
                loc.data_offset,
                format_args!("parent locator {i}"),
            )?;
            let name = match prio {
                2 => std::str::from_utf8(&data)
                    .ok()
                    .map(|s| s.trim_end_matches('\0'))
                    .and_then(file_url_path)
                    .ok_or_else(|| bad("is not a UTF-8 file:// URL".into()))?,
                _ => windows_path(
                    &utf16le(&data).ok_or_else(|| bad("is not a UTF-16LE path".into()))?,
                ),
            };
            meta.push(Region {
                start: loc.data_offset,
                end: end.div_ceil(SECTOR) * SECTOR,
                what: format!("parent locator {i} data at {:#x}", loc.data_offset),
            });
            found.push((prio, format!("parent locator {code}"), name));
        }
        if let Some(n) = header.parent_name() {
            found.push((3, "parent unicode name".into(), windows_path(&n)));
        }
        found.sort_by_key(|(p, _, _)| *p);
        let mut names: Vec<String> = Vec::new();
        for (_, field, name) in &found {
            self.refs.push(ExternalRef {
                field: field.clone(),
                name: name.clone(),
                role: RefRole::Backing,
            });
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        let Some((_, field, _)) = found.first() else {
            return Err(VhdError::NoParent.into());
        };
        self.backing = Some(BackingRef {
            field: field.clone(),
            name: names[0].clone(),
            format: Some(Format::Vpc),
            alternatives: names[1..].to_vec(),
            link: None,
        });
        Ok(())
    }
}

/// Checks every allocated BAT entry: its block (bitmap plus data) lies inside the file, does
/// not overlap metadata, and does not overlap another entry's block. Linear in the entries
/// plus a sort of the allocated ones, whose count the file length bounds.
fn validate_bat(bat: &[u32], slot: u64, len: u64, meta: &[Region]) -> Result<()> {
    // More allocated blocks than fit in the file means two of them overlap; stop collecting
    // there so the sort below stays bounded by the file size.
    let max_disjoint = len / slot;
    let mut used: Vec<(u64, u32)> = Vec::new();
    for (i, &v) in bat.iter().enumerate() {
        if v == BAT_UNUSED {
            continue;
        }
        let index = i as u32;
        let start = u64::from(v) * SECTOR;
        let end = start + slot;
        if end > len {
            return Err(VhdError::EntryPastEof {
                index,
                value: v,
                start,
                end,
                len,
            }
            .into());
        }
        if let Some(r) = meta.iter().find(|r| overlaps(start, end, r.start, r.end)) {
            return Err(VhdError::EntryOverlapsMetadata {
                index,
                value: v,
                start,
                end,
                what: r.what.clone(),
            }
            .into());
        }
        used.push((start, index));
        if used.len() as u64 > max_disjoint {
            break;
        }
    }
    used.sort_unstable();
    for w in used.windows(2) {
        let ((a, ai), (b, bi)) = (w[0], w[1]);
        if a + slot > b {
            return Err(VhdError::EntriesOverlap {
                index: ai,
                value: (a / SECTOR) as u32,
                other: bi,
                other_value: (b / SECTOR) as u32,
            }
            .into());
        }
    }
    Ok(())
}

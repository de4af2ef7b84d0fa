//! Opening a VHDX image: the two headers, log replay, the region table, the metadata
//! region and its items, the parent locator and the BAT, each checked against the others and
//! the file (MS-VHDX §2.2-§2.6). `read.rs` answers `map` from what this builds.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use byteorder::{ByteOrder, LittleEndian as LE};

use super::error::VhdxError;
use super::geometry::Geometry;
use super::header::*;
use super::log::{self, LogState};
use super::read::{Parsed, VhdxReader};
use crate::error::{Error, Result};
use crate::formats::{Format, OpenContext};
use crate::limits;
use crate::mapping::{BackingRef, ExternalRef, ParentLink, RefRole};
use crate::storage::{read_exact, Storage};

/// Parent locator keys that name the parent's path, in the order they are tried (§2.6.2.6.1:
/// relative first).
const PATH_KEYS: [&str; 3] = ["relative_path", "volume_path", "absolute_win32_path"];

/// Reads the two headers and returns the current one with its number.
pub(super) fn read_headers(storage: &dyn Storage) -> Result<(Header, u8)> {
    let mut b1 = vec![0u8; HEADER_SIZE];
    let mut b2 = vec![0u8; HEADER_SIZE];
    let r1 = read_exact(storage, &mut b1, HEADER1_OFFSET, "VHDX header 1")
        .map_err(|e| e.to_string())
        .and_then(|_| Header::parse(&b1).map_err(|e| e.0));
    let r2 = read_exact(storage, &mut b2, HEADER2_OFFSET, "VHDX header 2")
        .map_err(|e| e.to_string())
        .and_then(|_| Header::parse(&b2).map_err(|e| e.0));
    match (r1, r2) {
        (Ok(h), Err(_)) => Ok((h, 1)),
        (Err(_), Ok(h)) => Ok((h, 2)),
        (Err(header1), Err(header2)) => Err(VhdxError::NoValidHeader { header1, header2 }.into()),
        (Ok(h1), Ok(h2)) => {
            if h1.sequence_number > h2.sequence_number {
                Ok((h1, 1))
            } else if h2.sequence_number > h1.sequence_number {
                Ok((h2, 2))
            } else if h1 == h2 {
                // Disk2vhd writes two identical headers with the same sequence number.
                Ok((h1, 1))
            } else {
                Err(VhdxError::HeadersDisagree {
                    sequence: h1.sequence_number,
                }
                .into())
            }
        }
    }
}

/// Checks the current header's log fields (qemu refuses the same values).
pub(super) fn check_log_fields(h: &Header, index: u8) -> Result<()> {
    let offset = if index == 1 {
        HEADER1_OFFSET
    } else {
        HEADER2_OFFSET
    };
    let bad = |field, value, reason| -> Error {
        VhdxError::HeaderField {
            index,
            offset,
            field,
            value,
            reason,
        }
        .into()
    };
    if h.log_version != LOG_VERSION {
        return Err(bad(
            "log version",
            u64::from(h.log_version),
            "only log version 0 is defined",
        ));
    }
    if h.log_offset < HEADER_SECTION_END || !h.log_offset.is_multiple_of(MIB) {
        return Err(bad(
            "log offset",
            h.log_offset,
            "must be a multiple of 1 MiB past the header section",
        ));
    }
    if u64::from(h.log_length) % MIB != 0 {
        return Err(bad(
            "log length",
            u64::from(h.log_length),
            "must be a multiple of 1 MiB",
        ));
    }
    if h.log_offset.checked_add(u64::from(h.log_length)).is_none() {
        return Err(bad("log offset", h.log_offset, "log end overflows"));
    }
    Ok(())
}

/// Reads region table 1, or table 2 when table 1 is damaged.
fn read_region_table(view: &dyn Storage) -> Result<(RegionTable, u64)> {
    let mut buf = vec![0u8; REGION_TABLE_SIZE];
    let mut reasons = Vec::new();
    for off in [REGION_TABLE1_OFFSET, REGION_TABLE2_OFFSET] {
        let r = read_exact(view, &mut buf, off, "VHDX region table")
            .map_err(|e| e.to_string())
            .and_then(|_| RegionTable::parse(&buf).map_err(|e| e.0));
        match r {
            Ok(t) => return Ok((t, off)),
            Err(e) => reasons.push(e),
        }
    }
    let table2 = reasons.pop().unwrap_or_default();
    let table1 = reasons.pop().unwrap_or_default();
    Err(VhdxError::NoValidRegionTable { table1, table2 }.into())
}

/// A named area of the file, for overlap checks.
#[derive(Clone, Debug)]
struct Area {
    start: u64,
    end: u64,
    name: String,
}

/// Fails when any two of `areas` overlap (empty areas never do).
fn check_overlaps(areas: &mut [Area]) -> Result<()> {
    areas.sort_by_key(|a| (a.start, a.end));
    let mut widest: Option<&Area> = None;
    for a in areas.iter().filter(|a| a.end > a.start) {
        if let Some(w) = widest {
            if a.start < w.end {
                return Err(overlap(w, a));
            }
        }
        if widest.is_none_or(|w| a.end > w.end) {
            widest = Some(a);
        }
    }
    Ok(())
}

fn overlap(a: &Area, b: &Area) -> Error {
    VhdxError::Overlap {
        first: a.name.clone(),
        first_start: a.start,
        first_end: a.end,
        second: b.name.clone(),
        second_start: b.start,
        second_end: b.end,
    }
    .into()
}

fn region_name(g: &Guid) -> String {
    if *g == BAT_GUID {
        "BAT region".into()
    } else if *g == METADATA_GUID {
        "metadata region".into()
    } else {
        format!("region {g}")
    }
}

/// Checks the region table entries and finds the BAT and metadata regions. Returns them and
/// the fixed areas of the file (header section, log, regions).
fn check_regions(
    t: &RegionTable,
    table_off: u64,
    h: &Header,
) -> Result<(RegionEntry, RegionEntry, Vec<Area>)> {
    let mut areas = vec![
        Area {
            start: 0,
            end: HEADER_SECTION_END,
            name: "header section".into(),
        },
        Area {
            start: h.log_offset,
            end: h.log_offset + u64::from(h.log_length),
            name: "log".into(),
        },
    ];
    let mut bat = None;
    let mut meta = None;
    for (i, e) in t.entries.iter().enumerate() {
        let eoff = table_off + 16 + (i * RegionEntry::SIZE) as u64;
        let bad = |field, value, reason| -> Error {
            VhdxError::RegionEntry {
                index: i,
                guid: e.guid.to_string(),
                offset: eoff,
                field,
                value,
                reason,
            }
            .into()
        };
        if e.file_offset < HEADER_SECTION_END || e.file_offset % MIB != 0 {
            return Err(bad(
                "file offset",
                e.file_offset,
                "must be a multiple of 1 MiB past the header section",
            ));
        }
        if u64::from(e.length) % MIB != 0 {
            return Err(bad(
                "length",
                u64::from(e.length),
                "must be a multiple of 1 MiB",
            ));
        }
        let end = e
            .file_offset
            .checked_add(u64::from(e.length))
            .ok_or_else(|| bad("file offset", e.file_offset, "region end overflows"))?;
        if e.flags & !REGION_REQUIRED != 0 {
            return Err(bad("flags", u64::from(e.flags), "reserved bits are set"));
        }
        areas.push(Area {
            start: e.file_offset,
            end,
            name: format!("{} (region table entry {i})", region_name(&e.guid)),
        });
        let slot = if e.guid == BAT_GUID {
            &mut bat
        } else if e.guid == METADATA_GUID {
            &mut meta
        } else {
            if e.required() {
                return Err(VhdxError::UnknownRequiredRegion {
                    index: i,
                    guid: e.guid.to_string(),
                }
                .into());
            }
            continue;
        };
        if slot.is_some() {
            return Err(VhdxError::RegionSet {
                what: format!(
                    "{} appears twice (again at entry {i})",
                    region_name(&e.guid)
                ),
            }
            .into());
        }
        *slot = Some(*e);
    }
    let bat = bat.ok_or_else(|| VhdxError::RegionSet {
        what: "no BAT region".into(),
    })?;
    let meta = meta.ok_or_else(|| VhdxError::RegionSet {
        what: "no metadata region".into(),
    })?;
    check_overlaps(&mut areas)?;
    Ok((bat, meta, areas))
}

/// The metadata items vimg understands, found in the table.
#[derive(Default)]
struct Items {
    file_parameters: Option<MetadataEntry>,
    virtual_size: Option<MetadataEntry>,
    page83: Option<MetadataEntry>,
    logical_sector: Option<MetadataEntry>,
    physical_sector: Option<MetadataEntry>,
    parent_locator: Option<MetadataEntry>,
}

fn known_item<'a>(
    items: &'a mut Items,
    g: &Guid,
) -> Option<(&'static str, &'a mut Option<MetadataEntry>)> {
    Some(match *g {
        FILE_PARAMETERS_GUID => ("file parameters", &mut items.file_parameters),
        VIRTUAL_DISK_SIZE_GUID => ("virtual disk size", &mut items.virtual_size),
        PAGE83_GUID => ("page 83 data", &mut items.page83),
        LOGICAL_SECTOR_SIZE_GUID => ("logical sector size", &mut items.logical_sector),
        PHYSICAL_SECTOR_SIZE_GUID => ("physical sector size", &mut items.physical_sector),
        PARENT_LOCATOR_GUID => ("parent locator", &mut items.parent_locator),
        _ => return None,
    })
}

/// Checks the metadata table against its region and collects the known items.
fn check_metadata_table(t: &MetadataTable, region: &RegionEntry) -> Result<Items> {
    let mut items = Items::default();
    let mut areas = Vec::new();
    for (i, e) in t.entries.iter().enumerate() {
        let eoff = region.file_offset + 32 + (i * MetadataEntry::SIZE) as u64;
        let bad = |field, value: u32, reason| -> Error {
            VhdxError::MetadataEntry {
                index: i,
                guid: e.item_id.to_string(),
                offset: eoff,
                field,
                value: u64::from(value),
                reason,
            }
            .into()
        };
        if e.length > METADATA_ITEM_MAX {
            return Err(bad("length", e.length, "items are at most 1 MiB"));
        }
        if e.length == 0 {
            if e.offset != 0 {
                return Err(bad("offset", e.offset, "must be 0 for an empty item"));
            }
        } else {
            if u64::from(e.offset) < KIB64 {
                return Err(bad(
                    "offset",
                    e.offset,
                    "items start at least 64 KiB into the region",
                ));
            }
            if u64::from(e.offset) + u64::from(e.length) > u64::from(region.length) {
                return Err(bad(
                    "offset",
                    e.offset,
                    "the item extends past the end of the metadata region",
                ));
            }
            areas.push(Area {
                start: region.file_offset + u64::from(e.offset),
                end: region.file_offset + u64::from(e.offset) + u64::from(e.length),
                name: format!("metadata item {} (entry {i})", e.item_id),
            });
        }
        if e.flags & !(META_IS_USER | META_IS_VIRTUAL_DISK | META_IS_REQUIRED) != 0 {
            return Err(bad("flags", e.flags, "reserved bits are set"));
        }
        if e.flags & META_IS_USER != 0 {
            // User metadata is opaque to the disk; only its placement matters.
            continue;
        }
        match known_item(&mut items, &e.item_id) {
            Some((name, slot)) => {
                if slot.is_some() {
                    return Err(VhdxError::MetadataSet {
                        what: format!("the {name} item appears twice (again at entry {i})"),
                    }
                    .into());
                }
                *slot = Some(*e);
            }
            None if e.required() => {
                return Err(VhdxError::UnknownRequiredMetadata {
                    index: i,
                    guid: e.item_id.to_string(),
                }
                .into())
            }
            None => {}
        }
    }
    check_overlaps(&mut areas)?;
    Ok(items)
}

/// Reads a metadata item that must be at least `size` bytes long.
fn read_item(
    view: &dyn Storage,
    region: &RegionEntry,
    entry: Option<MetadataEntry>,
    name: &'static str,
    size: usize,
) -> Result<(Vec<u8>, u64)> {
    let e = entry.ok_or_else(|| VhdxError::MetadataSet {
        what: format!("the required {name} item is missing"),
    })?;
    let off = region.file_offset + u64::from(e.offset);
    if (e.length as usize) < size {
        return Err(VhdxError::MetadataValue {
            item: name,
            offset: off,
            value: u64::from(e.length),
            reason: "the item is shorter than its structure",
        }
        .into());
    }
    let mut buf = vec![0u8; e.length as usize];
    read_exact(view, &mut buf, off, format_args!("VHDX {name}"))?;
    Ok((buf, off))
}

/// Replaces Windows separators so the gate can resolve a relative parent path.
fn unix_relative(path: &str) -> String {
    path.replace('\\', "/")
}

impl VhdxReader {
    /// Opens the image held in `storage`.
    pub fn open(storage: Arc<dyn Storage>, _ctx: &OpenContext) -> Result<VhdxReader> {
        let mut id = vec![0u8; FileIdentifier::SIZE];
        let id_len = storage.len().min(FileIdentifier::SIZE as u64) as usize;
        read_exact(&*storage, &mut id[..id_len], 0, "VHDX file identifier")?;
        let ident = FileIdentifier::parse(&id).map_err(|_| VhdxError::NotVhdx {
            found: String::from_utf8_lossy(&id[..id_len.min(8)]).into_owned(),
        })?;

        let (header, header_index) = read_headers(&*storage)?;
        check_log_fields(&header, header_index)?;

        let mut warnings = Vec::new();
        let mut log_pending = false;
        let view: Arc<dyn Storage> = match log::replay(&storage, &header)? {
            LogState::Empty => storage.clone(),
            LogState::NoValidSequence { reason } => {
                let w = format!(
                    "VHDX log GUID {} is set but the log holds no valid entry sequence ({reason}); reading the image without replay, as qemu does",
                    header.log_guid
                );
                warnings.push(w);
                storage.clone()
            }
            LogState::Replayed {
                overlay,
                entries,
                head_sequence,
            } => {
                let w = format!(
                    "VHDX log holds {entries} unapplied entr{} (up to sequence {head_sequence:#x}); vimg replayed {} in memory and left the file unchanged",
                    if entries == 1 { "y" } else { "ies" },
                    if entries == 1 { "it" } else { "them" }
                );
                warnings.push(w);
                log_pending = true;
                Arc::new(overlay)
            }
        };

        let (rt, rt_off) = read_region_table(&*view)?;
        let (bat_region, metadata_region, fixed_areas) = check_regions(&rt, rt_off, &header)?;

        if u64::from(metadata_region.length) < KIB64 {
            return Err(VhdxError::RegionEntry {
                index: rt
                    .entries
                    .iter()
                    .position(|e| e.guid == METADATA_GUID)
                    .unwrap_or(0),
                guid: METADATA_GUID.to_string(),
                offset: rt_off,
                field: "length",
                value: u64::from(metadata_region.length),
                reason: "the metadata region must hold the 64 KiB metadata table",
            }
            .into());
        }
        let mut mt_buf = vec![0u8; METADATA_TABLE_SIZE];
        read_exact(
            &*view,
            &mut mt_buf,
            metadata_region.file_offset,
            "VHDX metadata table",
        )?;
        let mt = MetadataTable::parse(&mt_buf).map_err(|e| VhdxError::MetadataTable {
            what: "metadata table",
            offset: metadata_region.file_offset,
            reason: e.0,
        })?;
        let items = check_metadata_table(&mt, &metadata_region)?;

        let (b, off) = read_item(
            &*view,
            &metadata_region,
            items.file_parameters,
            "file parameters",
            FileParameters::SIZE,
        )?;
        let params = FileParameters::parse(&b).map_err(|e| VhdxError::MetadataTable {
            what: "file parameters",
            offset: off,
            reason: e.0,
        })?;
        let bad_value = |item, offset, value, reason| -> Error {
            VhdxError::MetadataValue {
                item,
                offset,
                value,
                reason,
            }
            .into()
        };
        if !params.block_size.is_power_of_two()
            || params.block_size < BLOCK_SIZE_MIN
            || params.block_size > BLOCK_SIZE_MAX
        {
            return Err(bad_value(
                "file parameters: block size",
                off,
                u64::from(params.block_size),
                "must be a power of two from 1 MiB to 256 MiB",
            ));
        }
        if params.flags & !(PARAM_LEAVE_BLOCKS_ALLOCATED | PARAM_HAS_PARENT) != 0 {
            return Err(bad_value(
                "file parameters: flags",
                off + 4,
                u64::from(params.flags),
                "reserved bits are set",
            ));
        }
        let (b, off) = read_item(
            &*view,
            &metadata_region,
            items.logical_sector,
            "logical sector size",
            4,
        )?;
        let logical = LE::read_u32(&b);
        if logical != 512 && logical != 4096 {
            return Err(bad_value(
                "logical sector size",
                off,
                u64::from(logical),
                "must be 512 or 4096",
            ));
        }
        let (b, off) = read_item(
            &*view,
            &metadata_region,
            items.physical_sector,
            "physical sector size",
            4,
        )?;
        let physical = LE::read_u32(&b);
        if physical != 512 && physical != 4096 {
            return Err(bad_value(
                "physical sector size",
                off,
                u64::from(physical),
                "must be 512 or 4096",
            ));
        }
        let (b, off) = read_item(
            &*view,
            &metadata_region,
            items.virtual_size,
            "virtual disk size",
            8,
        )?;
        let virtual_size = LE::read_u64(&b);
        if virtual_size > MAX_VIRTUAL_SIZE || virtual_size % u64::from(logical) != 0 {
            return Err(bad_value(
                "virtual disk size",
                off,
                virtual_size,
                "must be a multiple of the logical sector size, at most 64 TiB",
            ));
        }
        let (b, _) = read_item(&*view, &metadata_region, items.page83, "page 83 data", 16)?;
        let page83 = Guid::read(&b);

        let differencing = params.has_parent();
        let mut link = None;
        let parent = match (differencing, items.parent_locator) {
            (false, _) => None,
            (true, None) => return Err(VhdxError::MetadataSet {
                what:
                    "the file parameters say the image has a parent, but there is no parent locator"
                        .into(),
            }
            .into()),
            (true, Some(e)) => {
                let (b, off) = read_item(
                    &*view,
                    &metadata_region,
                    Some(e),
                    "parent locator",
                    ParentLocator::HEADER_SIZE,
                )?;
                let l = ParentLocator::parse(&b).map_err(|e| VhdxError::ParentLocator {
                    offset: off,
                    reason: e.0,
                })?;
                if l.locator_type != PARENT_TYPE_VHDX_GUID {
                    return Err(VhdxError::ParentLocator {
                        offset: off,
                        reason: format!(
                            "locator type {} is not the VHDX parent type {PARENT_TYPE_VHDX_GUID}",
                            l.locator_type
                        ),
                    }
                    .into());
                }
                for (i, (k, _)) in l.entries.iter().enumerate() {
                    if l.entries[..i].iter().any(|(k2, _)| k2 == k) {
                        return Err(VhdxError::ParentLocator {
                            offset: off,
                            reason: format!("key {k:?} appears twice"),
                        }
                        .into());
                    }
                }
                if PATH_KEYS.iter().all(|k| l.get(k).is_none()) {
                    return Err(VhdxError::ParentLocator {
                        offset: off,
                        reason: "no relative_path, volume_path or absolute_win32_path entry names the parent".into(),
                    }
                    .into());
                }
                link = parent_link(&l, off)?;
                if link.is_none() {
                    warnings.push(
                        "the parent locator has no parent_linkage entry: the parent's \
                         DataWriteGuid is not checked"
                            .to_string(),
                    );
                }
                Some(l)
            }
        };

        let geometry = Geometry::new(
            virtual_size,
            u64::from(params.block_size),
            u64::from(logical),
            differencing,
        );
        let entries = geometry.bat_entries();
        let bat_bytes = entries * 8;
        if bat_bytes > u64::from(bat_region.length) {
            return Err(VhdxError::BatTooSmall {
                offset: bat_region.file_offset,
                length: u64::from(bat_region.length),
                virtual_size,
                entries,
                needed: bat_bytes,
            }
            .into());
        }
        let n = limits::check_table_bytes("VHDX BAT", bat_bytes)?;
        // Read in pieces so the raw bytes never sit in memory next to the whole table.
        let mut bat: Vec<u64> = Vec::with_capacity(n / 8);
        let mut raw = vec![0u8; n.min(MIB as usize)];
        while bat.len() * 8 < n {
            let done = bat.len() * 8;
            let piece = &mut raw[..(n - done).min(MIB as usize)];
            read_exact(
                &*view,
                piece,
                bat_region.file_offset + done as u64,
                "VHDX BAT",
            )?;
            bat.extend(piece.chunks_exact(8).map(LE::read_u64));
        }

        let parsed = Parsed {
            creator: ident.creator,
            header,
            header_index,
            bat_region,
            metadata_region,
            params,
            physical_sector: physical,
            page83,
            parent,
            geometry,
        };
        check_bat(&parsed, &bat, view.len(), fixed_areas)?;

        let (backing, refs) = match &parsed.parent {
            None => (None, Vec::new()),
            Some(l) => parent_refs(l, link),
        };
        Ok(VhdxReader {
            storage,
            view,
            parsed,
            bat,
            backing,
            refs,
            warnings,
            log_pending,
            bitmaps: Mutex::new(VecDeque::new()),
        })
    }
}

/// The parent's DataWriteGuid as the locator recorded it when the child was made
/// (§2.6.2.6.2): `parent_linkage`, or the alternative `parent_linkage2` when present. Hyper-V
/// writes a `parent_linkage2` of all zeros when it has none, so the zero GUID counts as
/// absent. `None` when there is no `parent_linkage` (the spec requires it; the chain is then
/// unchecked). A value that is not a GUID is refused, naming the entry.
fn parent_link(l: &ParentLocator, offset: u64) -> Result<Option<ParentLink>> {
    if l.get("parent_linkage").is_none() {
        return Ok(None);
    }
    let mut expected = Vec::new();
    for key in ["parent_linkage", "parent_linkage2"] {
        let Some(v) = l.get(key) else { continue };
        let g = uuid::Uuid::parse_str(v.trim()).map_err(|_| VhdxError::ParentLocator {
            offset,
            reason: format!("{key} {v:?} is not a GUID"),
        })?;
        let g = Guid(g.to_bytes_le());
        if key == "parent_linkage2" && g.is_zero() {
            continue;
        }
        expected.push((key.to_string(), guid_text(&g)));
    }
    Ok(Some(ParentLink {
        identity: "DataWriteGuid",
        expected,
    }))
}

/// How GUIDs are spelled in link checks and their messages: braced, as the locator has them.
pub(super) fn guid_text(g: &Guid) -> String {
    format!("{{{g}}}")
}

/// The backing reference and external references of a parent locator.
fn parent_refs(
    l: &ParentLocator,
    link: Option<ParentLink>,
) -> (Option<BackingRef>, Vec<ExternalRef>) {
    let mut names = Vec::new();
    let mut refs = Vec::new();
    for key in PATH_KEYS {
        if let Some(v) = l.get(key) {
            refs.push(ExternalRef {
                field: format!("parent locator {key}"),
                name: v.to_string(),
                role: RefRole::Backing,
            });
            names.push(if key == "relative_path" {
                unix_relative(v)
            } else {
                v.to_string()
            });
        }
    }
    let mut it = names.into_iter();
    let backing = it.next().map(|name| BackingRef {
        field: "VHDX parent locator".into(),
        name,
        format: Some(Format::Vhdx),
        alternatives: it.collect(),
        link,
    });
    (backing, refs)
}

/// Checks every BAT entry: states, reserved bits, and that each allocated block lies inside
/// the file and overlaps neither the fixed areas nor another block.
fn check_bat(p: &Parsed, bat: &[u64], file_len: u64, fixed: Vec<Area>) -> Result<()> {
    let g = &p.geometry;
    let bat_off = p.bat_region.file_offset;
    let bad = |i: u64, reason: String| -> Error {
        VhdxError::BatEntry {
            index: i,
            offset: bat_off + i * 8,
            value: bat[i as usize],
            reason,
        }
        .into()
    };
    // Allocated entries, sorted by file offset below; kept as indices to stay small.
    let mut allocated: Vec<u32> = Vec::new();
    for (i, &v) in bat.iter().enumerate() {
        let i = i as u64;
        let e = BatEntry(v);
        let is_bitmap = g.is_bitmap_entry(i);
        if is_bitmap && !g.differencing {
            // Dynamic and fixed images never read their bitmap entries (qemu ignores them).
            continue;
        }
        if e.reserved() != 0 {
            return Err(bad(i, "reserved bits are set".into()));
        }
        let state = e.state();
        let allocated_state = if is_bitmap {
            match state {
                SB_NOT_PRESENT => false,
                SB_PRESENT => true,
                s => return Err(bad(i, format!("sector bitmap state {s} is not defined"))),
            }
        } else {
            match state {
                PAYLOAD_FULLY_PRESENT => true,
                PAYLOAD_PARTIALLY_PRESENT if g.differencing => {
                    let chunk = g.block_of_entry(i) / g.chunk_ratio;
                    let sb = BatEntry(
                        bat.get(g.bitmap_entry(chunk) as usize)
                            .copied()
                            .unwrap_or(0),
                    );
                    if sb.state() != SB_PRESENT {
                        return Err(bad(
                            i,
                            format!(
                                "the block is partially present but the sector bitmap of its chunk (entry {}) is not present",
                                g.bitmap_entry(chunk)
                            ),
                        ));
                    }
                    true
                }
                PAYLOAD_PARTIALLY_PRESENT => {
                    return Err(bad(
                        i,
                        "partially present blocks exist only in differencing images".into(),
                    ))
                }
                PAYLOAD_NOT_PRESENT
                | PAYLOAD_UNDEFINED
                | PAYLOAD_ZERO
                | PAYLOAD_UNMAPPED
                | PAYLOAD_UNMAPPED_V095 => false,
                s => return Err(bad(i, format!("payload block state {s} is reserved"))),
            }
        };
        if !allocated_state {
            continue;
        }
        let off = e.file_offset();
        let needed = if is_bitmap {
            MIB
        } else {
            g.block_len(g.block_of_entry(i))
        };
        if off.checked_add(needed).is_none_or(|end| end > file_len) {
            return Err(bad(
                i,
                format!(
                    "the block [{off:#x}, +{needed:#x}) extends past the end of the file ({file_len:#x} bytes)"
                ),
            ));
        }
        allocated.push(i as u32);
    }
    // Overlaps: fixed areas and blocks together, sorted by start.
    let extent = |i: u32| -> (u64, u64) {
        let off = BatEntry(bat[i as usize]).file_offset();
        let len = if g.is_bitmap_entry(u64::from(i)) {
            MIB
        } else {
            g.block_size
        };
        (off, off.saturating_add(len))
    };
    allocated.sort_unstable_by_key(|i| extent(*i));
    let mut fixed = fixed;
    fixed.retain(|a| a.end > a.start);
    fixed.sort_by_key(|a| (a.start, a.end));
    let name = |i: u32| -> String {
        let kind = if g.is_bitmap_entry(u64::from(i)) {
            "sector bitmap block"
        } else {
            "payload block"
        };
        format!("{kind} of BAT entry {i} ({:#018x})", bat[i as usize])
    };
    // Merge the two sorted lists, tracking the area that reaches furthest.
    let mut widest: Option<Area> = None;
    let (mut a, mut b) = (0usize, 0usize);
    while a < allocated.len() || b < fixed.len() {
        let take_block = match (allocated.get(a), fixed.get(b)) {
            (Some(&i), Some(f)) => extent(i) < (f.start, f.end),
            (Some(_), None) => true,
            _ => false,
        };
        let cur = if take_block {
            let i = allocated[a];
            a += 1;
            let (start, end) = extent(i);
            Area {
                start,
                end,
                name: name(i),
            }
        } else {
            b += 1;
            fixed[b - 1].clone()
        };
        if let Some(w) = &widest {
            if cur.start < w.end {
                return Err(overlap(w, &cur));
            }
        }
        if widest.as_ref().is_none_or(|w| cur.end > w.end) {
            widest = Some(cur);
        }
    }
    Ok(())
}

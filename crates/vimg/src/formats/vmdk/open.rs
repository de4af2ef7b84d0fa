//! Opening a vmdk image: the sparse extent headers (hosted sparse, COWD, seSparse), the
//! descriptor (its own file or embedded) and each extent it names, opened through the
//! external-file gate and checked (VMware Virtual Disk Format 1.1, "Hosted Sparse Extent
//! Header", "The Descriptor File"). `read.rs` answers `map` from what this builds.

use std::sync::Arc;

use super::descriptor::{Access, Descriptor, ExtentType, MAX_DESCRIPTOR_BYTES};
use super::error::VmdkError;
use super::header::*;
use super::read::{cid_text, Kind, VExtent, VmdkReader};
use super::sparse::{read_directory, Flavor, SparseExtent, SparseParams};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::{Format, OpenContext};
use crate::limits;
use crate::mapping::{BackingRef, ChildNode, ExternalRef, FileId, ParentLink, RefRole};
use crate::storage::{read_exact, Storage};

/// Largest grain vimg accepts: QEMU refuses more than 0x200000 sectors (1 GiB).
pub const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// Largest compressed grain (the read layer decodes at most 64 MiB units).
pub const MAX_COMPRESSED_GRAIN_SECTORS: u64 = 0x2_0000;
/// Most entries a hosted grain table may have (QEMU's limit; VMware always writes 512).
pub const MAX_GTES_PER_GT: u32 = 512;

/// createType values vimg reads from a descriptor file.
const DESCRIPTOR_TYPES: &[&str] = &[
    "monolithicFlat",
    "monolithicSparse",
    "streamOptimized",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "vmfs",
    "vmfsSparse",
    "vmfsThin",
    "vmfsPreallocated",
    "vmfsEagerZeroedThick",
    "seSparse",
    "custom",
];

fn image_name(ctx: &OpenContext) -> String {
    ctx.path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "-".into())
}

/// The path qemu-img prints for an extent file: the descriptor's folder joined to the name.
fn extent_display(ctx: &OpenContext, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_string();
    }
    match ctx.path.as_ref().and_then(|p| p.parent()) {
        Some(d) if !d.as_os_str().is_empty() => format!("{}/{name}", d.display()),
        _ => name.to_string(),
    }
}

fn bad_field(
    structure: &'static str,
    offset: u64,
    field: &'static str,
    value: u64,
    why: &'static str,
) -> Error {
    VmdkError::BadField {
        structure,
        offset,
        field,
        value,
        why,
    }
    .into()
}

/// Reads the hosted sparse header, resolving `GD_AT_END` through the footer.
pub(super) fn read_sparse_header(storage: &dyn Storage) -> Result<SparseHeader> {
    let mut buf = [0u8; 512];
    read_exact(storage, &mut buf, 0, "sparse extent header")?;
    let header = SparseHeader::parse(&buf, 0)?;
    if header.gd_offset != GD_AT_END {
        return Ok(header);
    }
    // The real header is the footer: footer marker, footer, end-of-stream marker in the
    // last three sectors.
    let len = storage.len();
    if !len.is_multiple_of(SECTOR) || len < 4 * SECTOR {
        return Err(bad_field(
            "stream-optimized extent",
            0,
            "file length",
            len,
            "the footer needs a sector-aligned file of at least 4 sectors",
        ));
    }
    let at = len - 3 * SECTOR;
    let mut tail = [0u8; 1536];
    read_exact(storage, &mut tail, at, "footer")?;
    let fm = Marker::parse(&tail[..512]);
    let eos = Marker::parse(&tail[1024..]);
    if fm.size != 0 || fm.kind != MARKER_FOOTER {
        return Err(bad_field(
            "footer marker",
            at,
            "type",
            fm.kind.into(),
            "not a footer marker",
        ));
    }
    if eos.num_sectors != 0 || eos.size != 0 || eos.kind != MARKER_EOS {
        return Err(bad_field(
            "end-of-stream marker",
            at + 1024,
            "type",
            eos.kind.into(),
            "not an end-of-stream marker",
        ));
    }
    let footer = SparseHeader::parse(&tail[512..1024], at + 512)?;
    let fo = at + 512;
    let same = |field: &'static str, f: u64, h: u64| -> Result<()> {
        if f != h {
            return Err(VmdkError::FooterMismatch {
                offset: fo,
                field,
                footer: f,
                header: h,
            }
            .into());
        }
        Ok(())
    };
    same("version", footer.version.into(), header.version.into())?;
    same("flags", footer.flags.into(), header.flags.into())?;
    same("capacity", footer.capacity, header.capacity)?;
    same("grainSize", footer.grain_size, header.grain_size)?;
    same(
        "numGTEsPerGT",
        footer.num_gtes_per_gt.into(),
        header.num_gtes_per_gt.into(),
    )?;
    same(
        "compressAlgorithm",
        footer.compress_algorithm.into(),
        header.compress_algorithm.into(),
    )?;
    if footer.gd_offset == GD_AT_END {
        return Err(bad_field(
            "footer",
            fo,
            "gdOffset",
            footer.gd_offset,
            "the footer must hold the directory offset",
        ));
    }
    Ok(footer)
}

/// QEMU's checks of a hosted sparse header (`vmdk_open_vmdk4`, `vmdk_add_extent`), in its
/// order and with its words, vimg's detail after them; vimg's own checks follow.
pub(super) fn check_like_qemu(label: &str, h: &SparseHeader, file_len: u64) -> Result<()> {
    let refuse_as = |kind: ErrorKind, words: &str, detail: String| -> Result<()> {
        Err(VmdkError::QemuWords {
            words: words.into(),
            detail: format!("{label}: {detail}"),
            kind,
        }
        .into())
    };
    let refuse = |words: &str, detail: String| refuse_as(ErrorKind::Invalid, words, detail);
    if h.num_gtes_per_gt > MAX_GTES_PER_GT {
        return refuse(
            "L2 table size too big",
            format!(
                "numGTEsPerGT = {} at byte 0x2c, at most {MAX_GTES_PER_GT}",
                h.num_gtes_per_gt
            ),
        );
    }
    // QEMU keeps the sectors one directory entry covers in 32 bits.
    let span = u64::from((u64::from(h.num_gtes_per_gt).wrapping_mul(h.grain_size)) as u32);
    if span == 0 {
        return refuse(
            "L1 entry size is invalid",
            format!(
                "numGTEsPerGT = {} at byte 0x2c, grainSize = {} at byte 0x14",
                h.num_gtes_per_gt, h.grain_size
            ),
        );
    }
    if file_len.div_ceil(SECTOR) < h.overhead {
        return refuse_as(
            ErrorKind::Corrupt,
            &format!(
                "File truncated, expecting at least {} bytes",
                h.overhead.saturating_mul(SECTOR)
            ),
            format!(
                "the metadata (overHead {:#x} sectors at byte 0x40) runs past the end of the file ({file_len:#x} bytes)",
                h.overhead
            ),
        );
    }
    if h.grain_size > MAX_GRAIN_SECTORS {
        return refuse(
            "Invalid granularity, image may be corrupt",
            format!(
                "grainSize = {:#x} sectors at byte 0x14, at most {MAX_GRAIN_SECTORS:#x}",
                h.grain_size
            ),
        );
    }
    let entries = h.capacity.div_ceil(span);
    if entries > super::QEMU_MAX_GD_ENTRIES {
        return refuse(
            "L1 size too big",
            format!(
                "capacity = {:#x} sectors at byte 0x0c needs {entries} grain directory entries, at most {}",
                h.capacity,
                super::QEMU_MAX_GD_ENTRIES
            ),
        );
    }
    Ok(())
}

/// Checks a hosted header and opens its tables as extent `label`.
fn open_hosted(
    label: &str,
    file: FileId,
    storage: Arc<dyn Storage>,
    h: &SparseHeader,
    len: u64,
) -> Result<SparseExtent> {
    const S: &str = "sparse extent header";
    if h.version == 0 || h.version > 3 {
        return Err(VmdkError::Unsupported(format!(
            "{label}: sparse extent version {}",
            h.version
        ))
        .into());
    }
    if h.flags & !KNOWN_FLAGS != 0 {
        return Err(VmdkError::Unsupported(format!(
            "{label}: unknown sparse extent flags {:#x}",
            h.flags & !KNOWN_FLAGS
        ))
        .into());
    }
    check_like_qemu(label, h, storage.len())?;
    let compressed = match h.compress_algorithm {
        COMPRESSION_NONE => false,
        COMPRESSION_DEFLATE => true,
        a => {
            return Err(
                VmdkError::Unsupported(format!("{label}: compression algorithm {a}")).into(),
            )
        }
    };
    let g = h.grain_size;
    let max_grain = if compressed {
        MAX_COMPRESSED_GRAIN_SECTORS
    } else {
        MAX_GRAIN_SECTORS
    };
    if g == 0 || !g.is_power_of_two() || g > max_grain {
        return Err(bad_field(
            S,
            0x14,
            "grainSize",
            g,
            "must be a power of two of at most 1 GiB (64 MiB compressed) in sectors",
        ));
    }
    if h.num_gtes_per_gt == 0 || h.num_gtes_per_gt > MAX_GTES_PER_GT {
        return Err(bad_field(
            S,
            0x2c,
            "numGTEsPerGT",
            h.num_gtes_per_gt.into(),
            "must be 1..=512",
        ));
    }
    let gtes = u64::from(h.num_gtes_per_gt);
    let span = gtes * g;
    let entries = h.capacity.div_ceil(span);
    if entries > limits::MAX_TABLE_BYTES / 4 {
        return Err(bad_field(
            S,
            0x0c,
            "capacity",
            h.capacity,
            "needs a grain directory larger than vimg's limit",
        ));
    }
    let file_len = storage.len();
    if h.overhead.checked_mul(SECTOR).is_none_or(|o| o > file_len) {
        // A metadata area that runs past the end of the file, like a table that does:
        // the file was cut short (or the header lies about it).
        return Err(VmdkError::PastEof {
            table: format!("{label} metadata (overHead {:#x} sectors)", h.overhead),
            offset: 0,
            len: h.overhead.saturating_mul(SECTOR),
            file_len,
        }
        .into());
    }
    let gd_bytes_sectors = (entries * 4).div_ceil(SECTOR);
    let gd = read_directory(&*storage, label, "grain directory", h.gd_offset, entries)?;
    let rgd = if h.flags & FLAG_RGD != 0 && h.rgd_offset != 0 {
        Some(read_directory(
            &*storage,
            label,
            "redundant grain directory",
            h.rgd_offset,
            entries,
        )?)
    } else {
        None
    };
    let mut metadata = vec![(0, 1), (h.gd_offset, h.gd_offset + gd_bytes_sectors)];
    if h.descriptor_offset != 0 {
        metadata.push((
            h.descriptor_offset,
            h.descriptor_offset.saturating_add(h.descriptor_size),
        ));
    }
    if rgd.is_some() {
        metadata.push((h.rgd_offset, h.rgd_offset + gd_bytes_sectors));
    }
    SparseExtent::open(SparseParams {
        label: label.to_string(),
        file,
        storage,
        flavor: Flavor::Hosted {
            compressed,
            markers: h.flags & FLAG_MARKERS != 0,
            zero_grain: h.flags & FLAG_ZERO_GRAIN != 0,
        },
        len,
        grain_sectors: g,
        gtes_per_gt: gtes,
        entry_size: 4,
        gd,
        rgd,
        metadata,
    })
}

fn open_cowd(
    label: &str,
    file: FileId,
    storage: Arc<dyn Storage>,
    len: u64,
) -> Result<(SparseExtent, u64)> {
    const S: &str = "COWD sparse extent header";
    let mut buf = [0u8; CowdHeader::LEN];
    read_exact(&*storage, &mut buf, 0, "COWD header")?;
    let h = CowdHeader::parse(&buf)?;
    if h.version != 1 {
        return Err(VmdkError::Unsupported(format!("{label}: COWD version {}", h.version)).into());
    }
    let g = u64::from(h.grain_size);
    if g == 0 || !g.is_power_of_two() || g > MAX_GRAIN_SECTORS {
        return Err(bad_field(
            S,
            0x10,
            "grainSize",
            g,
            "must be a power of two of at most 1 GiB in sectors",
        ));
    }
    let capacity = u64::from(h.capacity);
    let entries = u64::from(h.num_gd_entries);
    if entries.saturating_mul(COWD_GTES_PER_GT * g) < capacity {
        return Err(bad_field(
            S,
            0x18,
            "numGDEntries",
            entries,
            "too few to address the capacity",
        ));
    }
    let gd = read_directory(
        &*storage,
        label,
        "grain directory",
        h.gd_offset.into(),
        entries,
    )?;
    let gd_sectors = (entries * 4).div_ceil(SECTOR);
    let len = if len == 0 { capacity * SECTOR } else { len };
    let ext = SparseExtent::open(SparseParams {
        label: label.to_string(),
        file,
        storage,
        flavor: Flavor::Cowd,
        len,
        grain_sectors: g,
        gtes_per_gt: COWD_GTES_PER_GT,
        entry_size: 4,
        gd,
        rgd: None,
        metadata: vec![
            (0, 4),
            (h.gd_offset.into(), u64::from(h.gd_offset) + gd_sectors),
        ],
    })?;
    Ok((ext, capacity))
}

fn open_sesparse(
    label: &str,
    file: FileId,
    storage: Arc<dyn Storage>,
    len: u64,
) -> Result<(SparseExtent, u64)> {
    let mut buf = [0u8; 512];
    read_exact(&*storage, &mut buf, 0, "seSparse const header")?;
    let h = SeSparseConstHeader::parse(&buf)?;
    let vo = h
        .volatile_header_offset
        .checked_mul(SECTOR)
        .ok_or_else(|| {
            bad_field(
                "seSparse const header",
                0,
                "volatile_header_offset",
                h.volatile_header_offset,
                "overflows",
            )
        })?;
    read_exact(&*storage, &mut buf, vo, "seSparse volatile header")?;
    SeSparseVolatileHeader::parse(&buf, vo)?;
    let gd_bytes = h.grain_dir_size.checked_mul(SECTOR).ok_or_else(|| {
        bad_field(
            "seSparse const header",
            0x88,
            "grain_dir_size",
            h.grain_dir_size,
            "overflows",
        )
    })?;
    let n = limits::check_table_bytes(&format!("{label} grain directory"), gd_bytes)?;
    let gd_at = h
        .grain_dir_offset
        .checked_mul(SECTOR)
        .filter(|s| s.checked_add(gd_bytes).is_some_and(|e| e <= storage.len()));
    let Some(gd_at) = gd_at else {
        return Err(VmdkError::PastEof {
            table: format!("{label} grain directory"),
            offset: h.grain_dir_offset.saturating_mul(SECTOR),
            len: gd_bytes,
            file_len: storage.len(),
        }
        .into());
    };
    let mut raw = vec![0u8; n];
    read_exact(
        &*storage,
        &mut raw,
        gd_at,
        format_args!("{label} grain directory"),
    )?;
    let gtes = h.grain_table_size * SECTOR / 8;
    let span = gtes * h.grain_size;
    if (raw.len() as u64 / 8).saturating_mul(span) < h.capacity {
        return Err(bad_field(
            "seSparse const header",
            0x10,
            "capacity",
            h.capacity,
            "more than the grain directory can address",
        ));
    }
    let mut gd = Vec::with_capacity(raw.len() / 8);
    for (i, c) in raw.chunks_exact(8).enumerate() {
        let v = u64::from_le_bytes(c.try_into().unwrap_or([0xff; 8]));
        if v == 0 {
            gd.push(0);
            continue;
        }
        if v & 0xffff_ffff_0000_0000 != 0x1000_0000_0000_0000 {
            return Err(VmdkError::BadEntry {
                table: format!("{label} grain directory"),
                index: i as u64,
                value: v,
                why: "not an allocated seSparse grain table entry",
            }
            .into());
        }
        let sector = (v & 0xffff_ffff)
            .checked_mul(h.grain_table_size)
            .and_then(|x| x.checked_add(h.grain_tables_offset))
            .and_then(|x| u32::try_from(x).ok())
            .filter(|&x| x != 0);
        match sector {
            Some(s) => gd.push(s),
            None => {
                return Err(VmdkError::BadEntry {
                    table: format!("{label} grain directory"),
                    index: i as u64,
                    value: v,
                    why: "grain table offset out of range",
                }
                .into())
            }
        }
    }
    let len = if len == 0 {
        h.capacity.saturating_mul(SECTOR)
    } else {
        len
    };
    let vol_end = h
        .volatile_header_offset
        .saturating_add(h.volatile_header_size.max(1));
    let ext = SparseExtent::open(SparseParams {
        label: label.to_string(),
        file,
        storage,
        flavor: Flavor::SeSparse {
            grains_offset: h.grains_offset,
        },
        len,
        grain_sectors: h.grain_size,
        gtes_per_gt: gtes,
        entry_size: 8,
        gd,
        rgd: None,
        metadata: vec![
            (0, 1),
            (h.volatile_header_offset, vol_end),
            (
                h.grain_dir_offset,
                h.grain_dir_offset.saturating_add(h.grain_dir_size),
            ),
        ],
    })?;
    Ok((ext, h.capacity))
}

fn read_embedded_descriptor(storage: &dyn Storage, h: &SparseHeader) -> Result<Descriptor> {
    if h.descriptor_offset == 0 || h.descriptor_size == 0 {
        return Ok(Descriptor::default());
    }
    let size = h
        .descriptor_size
        .checked_mul(SECTOR)
        .filter(|s| *s <= MAX_DESCRIPTOR_BYTES as u64)
        .ok_or_else(|| {
            bad_field(
                "sparse extent header",
                0x24,
                "descriptorSize",
                h.descriptor_size,
                "larger than 1 MiB",
            )
        })?;
    let at = h
        .descriptor_offset
        .checked_mul(SECTOR)
        .filter(|a| a.checked_add(size).is_some_and(|e| e <= storage.len()));
    let Some(at) = at else {
        return Err(VmdkError::PastEof {
            table: "embedded descriptor".into(),
            offset: h.descriptor_offset.saturating_mul(SECTOR),
            len: size,
            file_len: storage.len(),
        }
        .into());
    };
    let mut buf = vec![0u8; size as usize];
    read_exact(storage, &mut buf, at, "embedded descriptor")?;
    Ok(Descriptor::parse_bytes(&buf)?)
}

impl VmdkReader {
    /// Opens `storage` (a sparse extent, a COWD file, or a descriptor).
    pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<VmdkReader> {
        if storage.len() < 4 {
            return Err(Error::invalid("File is too small, not a valid image"));
        }
        let mut magic = [0u8; 4];
        read_exact(&*storage, &mut magic, 0, "magic")?;
        let magic = u32::from_le_bytes(magic);
        if magic == SPARSE_MAGIC {
            let h = read_sparse_header(&*storage)?;
            if h.capacity == 0 && h.descriptor_offset != 0 {
                // A descriptor kept inside a sparse header with no extent of its own.
                let d = read_embedded_descriptor(&*storage, &h)?;
                return VmdkReader::from_descriptor(storage, ctx, d);
            }
            return VmdkReader::monolithic(storage, ctx, h);
        }
        if magic == COWD_MAGIC {
            let (ext, cap) = open_cowd("extent 1", FileId(0), storage.clone(), 0)?;
            let len = cap * SECTOR;
            return VmdkReader::single(
                storage,
                ctx,
                ext,
                len,
                "vmfsSparse",
                0xffff_ffff,
                0xffff_ffff,
                None,
            );
        }
        let len = storage.len();
        if len > MAX_DESCRIPTOR_BYTES as u64 {
            return Err(Error::invalid(format!(
                "not a VMDK image: no sparse extent magic, and at {len} bytes too large for a descriptor"
            )));
        }
        let mut buf = vec![0u8; len as usize];
        read_exact(&*storage, &mut buf, 0, "descriptor")?;
        let d = Descriptor::parse_bytes(&buf)?;
        VmdkReader::from_descriptor(storage, ctx, d)
    }

    #[allow(clippy::too_many_arguments)]
    fn single(
        storage: Arc<dyn Storage>,
        ctx: &OpenContext,
        ext: SparseExtent,
        len: u64,
        create_type: &str,
        cid: u32,
        parent_cid: u32,
        backing: Option<BackingRef>,
    ) -> Result<VmdkReader> {
        if len > limits::MAX_VIRTUAL_SIZE {
            return Err(Error::unsupported(format!(
                "virtual size {len} is too large"
            )));
        }
        let mut refs = Vec::new();
        if let Some(b) = &backing {
            refs.push(ExternalRef {
                field: b.field.clone(),
                name: b.name.clone(),
                role: RefRole::Backing,
            });
        }
        Ok(VmdkReader {
            files: vec![storage],
            extents: vec![VExtent {
                start: 0,
                len,
                kind: Kind::Sparse(Box::new(ext)),
                filename: image_name(ctx),
                type_name: String::new(),
            }],
            size: len,
            create_type: create_type.to_string(),
            cid,
            parent_cid,
            backing,
            refs,
            children: Vec::new(),
            warnings: Vec::new(),
        })
    }

    fn monolithic(
        storage: Arc<dyn Storage>,
        ctx: &OpenContext,
        h: SparseHeader,
    ) -> Result<VmdkReader> {
        check_like_qemu("extent 1", &h, storage.len())?;
        let len = h
            .capacity
            .checked_mul(SECTOR)
            .filter(|l| *l <= limits::MAX_VIRTUAL_SIZE)
            .ok_or_else(|| {
                bad_field(
                    "sparse extent header",
                    0x0c,
                    "capacity",
                    h.capacity,
                    "larger than vimg's limit",
                )
            })?;
        let d = read_embedded_descriptor(&*storage, &h)?;
        let ext = open_hosted("extent 1", FileId(0), storage.clone(), &h, len)?;
        // As qemu-img reports it: the header decides, not the embedded createType.
        let create_type = if ext.is_compressed() {
            "streamOptimized"
        } else {
            "monolithicSparse"
        };
        let (cid, parent_cid) = cids(&d)?;
        let backing = backing_of(&d, parent_cid);
        let mut r = VmdkReader::single(
            storage,
            ctx,
            ext,
            len,
            create_type,
            cid,
            parent_cid,
            backing,
        )?;
        if h.unclean_shutdown != 0 {
            r.warnings
                .push("the sparse extent was not closed cleanly".into());
        }
        Ok(r)
    }

    fn from_descriptor(
        storage: Arc<dyn Storage>,
        ctx: &OpenContext,
        d: Descriptor,
    ) -> Result<VmdkReader> {
        let ct = d
            .get("createType")
            .ok_or_else(|| Error::invalid("invalid VMDK image descriptor: no createType"))?
            .to_string();
        if !DESCRIPTOR_TYPES.contains(&ct.as_str()) {
            return Err(VmdkError::Unsupported(format!("image type '{ct}'")).into());
        }
        if d.extents.is_empty() {
            return Err(Error::invalid("invalid VMDK image descriptor: no extents"));
        }
        let (cid, parent_cid) = cids(&d)?;
        let backing = backing_of(&d, parent_cid);
        let mut files: Vec<Arc<dyn Storage>> = vec![storage];
        let mut extents = Vec::with_capacity(d.extents.len());
        let mut refs = Vec::new();
        let mut children = Vec::new();
        let mut pos = 0u64;
        let mut sparse_ids = Vec::new();
        for (i, x) in d.extents.iter().enumerate() {
            let label = format!("extent {}", i + 1);
            let len = x
                .sectors
                .checked_mul(SECTOR)
                .filter(|_| x.sectors > 0)
                .ok_or_else(|| {
                    Error::invalid(format!("{label}: invalid size of {} sectors", x.sectors))
                })?;
            let end = pos
                .checked_add(len)
                .filter(|e| *e <= limits::MAX_VIRTUAL_SIZE)
                .ok_or_else(|| {
                    Error::unsupported(format!("{label}: the disk is larger than vimg's limit"))
                })?;
            let name = x.file.clone().unwrap_or_default();
            let mut open = |files: &mut Vec<Arc<dyn Storage>>| -> Result<FileId> {
                refs.push(ExternalRef {
                    field: label.clone(),
                    name: name.clone(),
                    role: RefRole::Data,
                });
                if let Some(node) = ctx
                    .quorum_node
                    .as_ref()
                    .filter(|_| crate::quorum::dirname::needs_dirname(&name))
                {
                    return Err(Error::invalid(format!(
                        "Cannot use relative paths with VMDK descriptor file '{node}': {}",
                        crate::quorum::dirname::NO_DIRNAME
                    )));
                }
                let f = ctx.open_external(&label, &name)?;
                let id = u16::try_from(files.len())
                    .map_err(|_| Error::unsupported("too many extent files"))?;
                files.push(f);
                // qemu names an extent's node by its index among the descriptor's extents.
                children.push(ChildNode {
                    name: format!("extents.{i}"),
                    file: FileId(id),
                    stored_name: name.clone(),
                });
                Ok(FileId(id))
            };
            let kind = if x.access == Access::NoAccess || x.kind == ExtentType::Zero {
                Kind::Zero
            } else {
                match x.kind {
                    ExtentType::Flat | ExtentType::Vmfs => {
                        let id = open(&mut files)?;
                        let off = x.offset.unwrap_or(0).checked_mul(SECTOR);
                        let flen = files[id.0 as usize].len();
                        match off {
                            Some(o) if o.checked_add(len).is_some_and(|e| e <= flen) => {
                                Kind::Flat {
                                    file: id,
                                    offset: o,
                                }
                            }
                            _ => {
                                return Err(VmdkError::PastEof {
                                    table: format!(
                                        "{label} (flat, '{}')",
                                        crate::escape::escape_control(&name)
                                    ),
                                    offset: x.offset.unwrap_or(0).saturating_mul(SECTOR),
                                    len,
                                    file_len: flen,
                                }
                                .into())
                            }
                        }
                    }
                    ExtentType::Sparse | ExtentType::VmfsSparse => {
                        let id = open(&mut files)?;
                        let f = files[id.0 as usize].clone();
                        unique_sparse(&mut sparse_ids, &*f, &label)?;
                        let mut m = [0u8; 4];
                        read_exact(&*f, &mut m, 0, format_args!("{label} magic"))?;
                        let (ext, cap) = match u32::from_le_bytes(m) {
                            SPARSE_MAGIC => {
                                let h = read_sparse_header(&*f)?;
                                (open_hosted(&label, id, f, &h, len)?, h.capacity)
                            }
                            COWD_MAGIC => open_cowd(&label, id, f, len)?,
                            other => {
                                return Err(VmdkError::BadMagic {
                                    structure: "sparse extent",
                                    offset: 0,
                                    found: other.into(),
                                }
                                .into())
                            }
                        };
                        if cap < x.sectors {
                            return Err(Error::invalid(format!(
                                "{label}: the descriptor says {} sectors, the extent holds {cap}",
                                x.sectors
                            )));
                        }
                        Kind::Sparse(Box::new(ext))
                    }
                    ExtentType::SeSparse => {
                        let id = open(&mut files)?;
                        let f = files[id.0 as usize].clone();
                        unique_sparse(&mut sparse_ids, &*f, &label)?;
                        let (ext, cap) = open_sesparse(&label, id, f, len)?;
                        if cap < x.sectors {
                            return Err(Error::invalid(format!(
                                "{label}: the descriptor says {} sectors, the extent holds {cap}",
                                x.sectors
                            )));
                        }
                        Kind::Sparse(Box::new(ext))
                    }
                    ExtentType::VmfsRdm | ExtentType::VmfsRaw | ExtentType::Zero => {
                        return Err(VmdkError::Unsupported(format!(
                            "{label}: {} extents (raw device mappings)",
                            x.kind.as_str()
                        ))
                        .into())
                    }
                }
            };
            extents.push(VExtent {
                start: pos,
                len,
                kind,
                filename: if x.file.is_some() {
                    extent_display(ctx, &name)
                } else {
                    String::new()
                },
                type_name: x.kind.as_str().to_string(),
            });
            pos = end;
        }
        let mut meta = 0u64;
        let sparse = extents
            .iter()
            .filter(|e| matches!(e.kind, Kind::Sparse(_)))
            .count();
        for e in extents.iter_mut() {
            if let Kind::Sparse(s) = &mut e.kind {
                s.share_cache(sparse);
                meta += s.metadata_bytes();
            }
        }
        if meta > limits::MAX_METADATA_BYTES {
            return Err(Error::unsupported(format!(
                "the extents' grain directories need {meta} bytes, more than vimg's limit of {}",
                limits::MAX_METADATA_BYTES
            )));
        }
        if let Some(b) = &backing {
            refs.push(ExternalRef {
                field: b.field.clone(),
                name: b.name.clone(),
                role: RefRole::Backing,
            });
        }
        Ok(VmdkReader {
            files,
            extents,
            size: pos,
            create_type: ct,
            cid,
            parent_cid,
            backing,
            refs,
            children,
            warnings: Vec::new(),
        })
    }
}

/// One sparse file named by two extent lines would be walked (and its tables held) twice:
/// a descriptor could multiply one file's cost by thousands. Real images never share a
/// sparse extent file (flat extents may share one, at no cost).
fn unique_sparse(seen: &mut Vec<(u64, u64)>, f: &dyn Storage, label: &str) -> Result<()> {
    if let Some(id) = f.identity() {
        if seen.contains(&id) {
            return Err(Error::invalid(format!(
                "{label}: its sparse file is already used by another extent"
            )));
        }
        seen.push(id);
    }
    Ok(())
}

fn cids(d: &Descriptor) -> Result<(u32, u32)> {
    let cid = d.get_cid("CID").unwrap_or(0xffff_ffff);
    let parent = d.get_cid("parentCID").unwrap_or(0xffff_ffff);
    Ok((cid, parent))
}

/// The parent a delta link names. Its `parentCID` is the `CID` the parent had when the
/// child was made (VMware Virtual Disk Format 1.1, "The Descriptor"); the parent must still
/// have it once opened, or it was written to since and VMware refuses the chain (so do
/// libvmdk, when the parent is set, and QEMU, on the first read that reaches the parent).
/// `ffffffff` means "no parent": a delta link that says so yet names a parent is checked
/// like any other, as both peers do, so it only opens over a parent whose CID is also
/// `ffffffff`.
fn backing_of(d: &Descriptor, parent_cid: u32) -> Option<BackingRef> {
    let hint = d.get("parentFileNameHint")?;
    if hint.is_empty() {
        return None;
    }
    Some(BackingRef {
        field: "parentFileNameHint".into(),
        name: hint.to_string(),
        format: Some(Format::Vmdk),
        alternatives: Vec::new(),
        link: Some(ParentLink {
            identity: "CID",
            expected: vec![("parentCID".into(), cid_text(parent_cid))],
        }),
    })
}

#[cfg(test)]
mod tests {
    //! One failing case per validation rule, each a patch of one hand-laid image.
    use super::*;
    use crate::error::ErrorKind;
    use crate::gate::ExternalPolicy;
    use crate::mapping::{GuestOffset, HostOffset, ImageReader, MapKind};
    use crate::storage::MemStorage;

    /// A 1 MiB monolithicSparse image laid out by hand (sectors):
    /// 0 header, 1..3 descriptor, 3 grain directory (1 entry), 4..8 grain table 0,
    /// 8.. grain 0 (grain size 8 sectors = 4 KiB, 256 grains, 512 entries per table),
    /// 16.. grain 1. Guest grain 0 holds 0x11, guest grain 5 holds 0x22, guest grain 7
    /// is a zeroed grain (flag set).
    fn fixture() -> Vec<u8> {
        let mut img = vec![0u8; 24 * 512];
        let h = SparseHeader {
            version: 2,
            flags: FLAG_NL_DETECT | FLAG_ZERO_GRAIN,
            capacity: 2048,       // 1 MiB
            grain_size: 8,        // 4 KiB grains
            descriptor_offset: 1, // sectors 1..3
            descriptor_size: 2,
            num_gtes_per_gt: 512,
            rgd_offset: 0,
            gd_offset: 3,
            overhead: 8,
            unclean_shutdown: 0,
            newline_check: NEWLINE_CHECK,
            compress_algorithm: COMPRESSION_NONE,
        };
        h.write_to(&mut img);
        let desc = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
                    createType=\"monolithicSparse\"\nRW 2048 SPARSE \"x.vmdk\"\n";
        img[512..512 + desc.len()].copy_from_slice(desc.as_bytes());
        img[3 * 512..3 * 512 + 4].copy_from_slice(&4u32.to_le_bytes()); // GD[0] = sector 4
        let gt = 4 * 512;
        img[gt..gt + 4].copy_from_slice(&8u32.to_le_bytes()); // grain 0 at sector 8
        img[gt + 20..gt + 24].copy_from_slice(&16u32.to_le_bytes()); // grain 5 at sector 16
        img[gt + 28..gt + 32].copy_from_slice(&GTE_ZEROED.to_le_bytes()); // grain 7 zeroed
        img[8 * 512..16 * 512].fill(0x11);
        img[16 * 512..24 * 512].fill(0x22);
        img
    }

    fn open(img: Vec<u8>) -> Result<VmdkReader> {
        let ctx = OpenContext::new(None, ExternalPolicy::SameFolder);
        VmdkReader::open(Arc::new(MemStorage::new(img)), &ctx)
    }

    type Patch = Box<dyn Fn(&mut Vec<u8>)>;

    fn set32(img: &mut [u8], at: usize, v: u32) {
        img[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn set64(img: &mut [u8], at: usize, v: u64) {
        img[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn kind_of(img: Vec<u8>) -> ErrorKind {
        match open(img) {
            Ok(_) => panic!("opened an invalid image"),
            Err(e) => e.kind(),
        }
    }

    #[test]
    fn fixture_maps() {
        let r = open(fixture()).unwrap();
        assert_eq!(r.virtual_size(), 1 << 20);
        assert_eq!(r.cluster_size(), Some(4096));
        let e = r.map(GuestOffset(0), 1 << 20).unwrap();
        assert_eq!(e.len, 4096);
        assert!(matches!(
            e.kind,
            MapKind::Data {
                offset: HostOffset(4096),
                ..
            }
        ));
        let e = r.map(GuestOffset(4096), 1 << 20).unwrap();
        assert_eq!((e.len, e.kind), (4 * 4096, MapKind::Unallocated));
        let e = r.map(GuestOffset(7 * 4096), 1 << 20).unwrap();
        assert_eq!((e.len, e.kind), (4096, MapKind::Zero));
        let fs = r.format_specific().unwrap();
        assert_eq!(fs.data["cid"], 0x12345678);
        assert_eq!(fs.data["create-type"], "monolithicSparse");
        assert!(r.check().unwrap().corruptions == 0);
    }

    #[test]
    fn header_rules() {
        let cases: Vec<(&str, Patch, ErrorKind)> = vec![
            (
                "version 4",
                Box::new(|i| set32(i, 0x04, 4)),
                ErrorKind::Unsupported,
            ),
            (
                "unknown flag",
                Box::new(|i| set32(i, 0x08, 1 << 5)),
                ErrorKind::Unsupported,
            ),
            (
                "grain 0",
                Box::new(|i| set64(i, 0x14, 0)),
                ErrorKind::Invalid,
            ),
            (
                "grain not pow2",
                Box::new(|i| set64(i, 0x14, 12)),
                ErrorKind::Invalid,
            ),
            (
                "grain too big",
                Box::new(|i| set64(i, 0x14, 1 << 22)),
                ErrorKind::Invalid,
            ),
            (
                "gtes 0",
                Box::new(|i| set32(i, 0x2c, 0)),
                ErrorKind::Invalid,
            ),
            (
                "gtes 1024",
                Box::new(|i| set32(i, 0x2c, 1024)),
                ErrorKind::Invalid,
            ),
            (
                "capacity 2^50",
                Box::new(|i| set64(i, 0x0c, 1 << 50)),
                ErrorKind::Invalid,
            ),
            (
                "gd past eof",
                Box::new(|i| set64(i, 0x38, 1000)),
                ErrorKind::Corrupt,
            ),
            (
                "overhead past eof",
                Box::new(|i| set64(i, 0x40, 1000)),
                ErrorKind::Corrupt,
            ),
            (
                "compression 2",
                Box::new(|i| i[0x4d] = 2),
                ErrorKind::Unsupported,
            ),
            (
                "descriptor past eof",
                Box::new(|i| set64(i, 0x1c, 100)),
                ErrorKind::Corrupt,
            ),
            (
                "descriptor > 1 MiB",
                Box::new(|i| set64(i, 0x24, 4096)),
                ErrorKind::Invalid,
            ),
            ("bad magic", Box::new(|i| i[0] = b'X'), ErrorKind::Invalid),
        ];
        for (name, patch, kind) in cases {
            let mut img = fixture();
            patch(&mut img);
            assert_eq!(kind_of(img), kind, "{name}");
        }
    }

    #[test]
    fn table_rules() {
        let gt = 4 * 512;
        let cases: Vec<(&str, Patch)> = vec![
            ("grain table past eof", Box::new(|i| set32(i, 3 * 512, 100))),
            (
                "grain table on the directory",
                Box::new(|i| set32(i, 3 * 512, 3)),
            ),
            ("grain past eof", Box::new(move |i| set32(i, gt + 4, 40))),
            (
                "grain in the header",
                Box::new(move |i| set32(i, gt + 4, 0)),
            ),
            (
                "grain in the grain table",
                Box::new(move |i| set32(i, gt + 4, 5)),
            ),
            (
                "grain in the descriptor",
                Box::new(move |i| set32(i, gt + 4, 2)),
            ),
            (
                "two entries at one grain",
                Box::new(move |i| set32(i, gt + 4, 8)),
            ),
            (
                "overlapping grains",
                Box::new(move |i| set32(i, gt + 4, 12)),
            ),
            (
                "grain past the extent",
                Box::new(move |i| set32(i, gt + 4 * 300, 8)),
            ),
        ];
        for (name, patch) in cases {
            let mut img = fixture();
            // Grain 1 at sector 0 would read as "unallocated"; the header case uses 1 with
            // the zero-grain flag cleared.
            patch(&mut img);
            if name == "grain in the header" {
                set32(&mut img, 0x08, FLAG_NL_DETECT);
                set32(&mut img, gt + 4, 1);
            }
            let e = open(img).err().unwrap_or_else(|| panic!("{name}: opened"));
            assert!(
                matches!(e.kind(), ErrorKind::Corrupt),
                "{name}: {e} ({:?})",
                e.kind()
            );
        }
    }

    #[test]
    fn stream_footer_rules() {
        // A stream-optimized image whose header defers to the footer.
        let mut img = fixture();
        set64(&mut img, 0x38, GD_AT_END);
        let mut tail = vec![0u8; 1536];
        Marker {
            num_sectors: 1,
            size: 0,
            kind: MARKER_FOOTER,
        }
        .write_to(&mut tail);
        tail[512..1024].copy_from_slice(&fixture()[..512]);
        img.extend_from_slice(&tail);
        assert!(open(img.clone()).is_ok());
        let footer = img.len() - 1024;
        let mut bad = img.clone();
        set64(&mut bad, footer + 0x0c, 4096);
        assert_eq!(kind_of(bad), ErrorKind::Corrupt, "footer capacity differs");
        let mut bad = img.clone();
        set32(&mut bad, footer - 512 + 12, MARKER_GT);
        assert_eq!(kind_of(bad), ErrorKind::Invalid, "not a footer marker");
        let mut bad = img.clone();
        let n = bad.len();
        set32(&mut bad, n - 512 + 12, 7);
        assert_eq!(kind_of(bad), ErrorKind::Invalid, "no end-of-stream marker");
        let mut bad = img;
        set64(&mut bad, footer + 0x38, GD_AT_END);
        assert_eq!(kind_of(bad), ErrorKind::Invalid, "footer without directory");
    }

    #[test]
    fn delta_link_carries_the_parent_cid() {
        let r = open(fixture()).unwrap();
        assert_eq!(r.backing(), None);
        assert_eq!(r.link_identity("CID").as_deref(), Some("12345678"));
        assert_eq!(r.link_identity("DataWriteGuid"), None);
        // Same length as the fixture's parentCID line, plus a parent hint in the padding.
        let mut img = fixture();
        let desc = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=00c0ffee\n\
                    createType=\"monolithicSparse\"\nRW 2048 SPARSE \"x.vmdk\"\n\
                    parentFileNameHint=\"base.vmdk\"\n";
        img[512..512 + desc.len()].copy_from_slice(desc.as_bytes());
        let r = open(img).unwrap();
        let b = r.backing().unwrap();
        assert_eq!(b.name, "base.vmdk");
        let l = b.link.as_ref().unwrap();
        assert_eq!(l.identity, "CID");
        assert_eq!(
            l.expected,
            [("parentCID".to_string(), "00c0ffee".to_string())]
        );
    }

    #[test]
    fn descriptor_rules() {
        let d = |t: &str| {
            VmdkReader::open(
                Arc::new(MemStorage::new(t.as_bytes().to_vec())),
                &OpenContext::new(None, ExternalPolicy::SameFolder),
            )
        };
        let e = d("version=1\nCID=1\nparentCID=ffffffff\nRW 10 FLAT \"a\" 0\n")
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::Invalid, "no createType: {e}");
        let e = d("createType=\"fullDevice\"\nRW 10 FLAT \"a\" 0\n")
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        let e = d("createType=\"monolithicFlat\"\n").err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Invalid, "no extents: {e}");
        // Extent files go through the gate: without a folder nothing may be opened.
        let e = d("createType=\"monolithicFlat\"\nRW 10 FLAT \"a\" 0\n")
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{e}");
        // ZERO extents need no file.
        let r =
            d("createType=\"custom\"\nRW 10 ZERO\nNOACCESS 6 FLAT \"never-opened\" 0\n").unwrap();
        assert_eq!(r.virtual_size(), 16 * 512);
        assert_eq!(r.map(GuestOffset(0), 8192).unwrap().kind, MapKind::Zero);
    }
}

#[cfg(test)]
mod cowd_tests {
    use super::*;
    use crate::gate::ExternalPolicy;
    use crate::mapping::{GuestOffset, HostOffset, ImageReader, MapKind};
    use crate::storage::MemStorage;

    /// A hand-laid COWD (vmfsSparse) file: header, a one-entry grain directory at sector 4,
    /// its 4096-entry grain table at sectors 5..37, one 512-byte grain at sector 37.
    #[test]
    fn cowd_extent_reads() {
        let mut img = vec![0u8; 38 * 512];
        CowdHeader {
            version: 1,
            flags: 3,
            capacity: 4096, // 2 MiB
            grain_size: 1,  // 512-byte grains
            gd_offset: 4,
            num_gd_entries: 1,
            free_sector: 38,
        }
        .write_to(&mut img);
        img[4 * 512..4 * 512 + 4].copy_from_slice(&5u32.to_le_bytes());
        img[5 * 512 + 12..5 * 512 + 16].copy_from_slice(&37u32.to_le_bytes()); // grain 3
        img[37 * 512..].fill(0x42);
        let ctx = OpenContext::new(None, ExternalPolicy::SameFolder);
        let r = VmdkReader::open(Arc::new(MemStorage::new(img.clone())), &ctx).unwrap();
        assert_eq!(r.virtual_size(), 2 << 20);
        let e = r.map(GuestOffset(3 * 512), 4096).unwrap();
        assert_eq!(e.len, 512);
        assert!(matches!(
            e.kind,
            MapKind::Data {
                offset: HostOffset(0x4a00),
                ..
            }
        ));
        assert_eq!(
            r.format_specific().unwrap().data["create-type"],
            "vmfsSparse"
        );
        // Too few directory entries for the capacity.
        img[0x0c..0x10].copy_from_slice(&(1u32 << 20).to_le_bytes());
        let e = VmdkReader::open(Arc::new(MemStorage::new(img)), &ctx)
            .err()
            .unwrap();
        assert_eq!(e.kind(), crate::ErrorKind::Invalid);
    }
}

#[cfg(test)]
mod sesparse_tests {
    use super::*;
    use crate::gate::ExternalPolicy;
    use crate::mapping::{GuestOffset, HostOffset, ImageReader, MapKind};
    use crate::storage::MemStorage;

    /// A hand-laid seSparse extent (sectors): const header 0, volatile header 1, grain
    /// directory 2 (one entry: table 0), grain tables from 3 (64 sectors each), grains from
    /// 67 (8 sectors = 4 KiB each). Grain 0 is allocated at cluster 0 and holds 'a'; grain
    /// 1 is a zero grain.
    fn extent() -> Vec<u8> {
        let mut img = vec![0u8; 75 * 512];
        SeSparseConstHeader {
            magic: SESPARSE_CONST_MAGIC,
            version: SESPARSE_VERSION,
            capacity: 2048,
            grain_size: 8,
            grain_table_size: 64,
            volatile_header_offset: 1,
            volatile_header_size: 1,
            grain_dir_offset: 2,
            grain_dir_size: 1,
            grain_tables_offset: 3,
            grain_tables_size: 64,
            grains_offset: 67,
            grains_size: 8,
            ..Default::default()
        }
        .write_to(&mut img);
        img[512..520].copy_from_slice(&SESPARSE_VOLATILE_MAGIC.to_le_bytes());
        img[1024..1032].copy_from_slice(&0x1000_0000_0000_0000u64.to_le_bytes());
        img[1536..1544].copy_from_slice(&0x3000_0000_0000_0000u64.to_le_bytes());
        img[1544..1552].copy_from_slice(&0x2000_0000_0000_0000u64.to_le_bytes());
        img[67 * 512..].fill(b'a');
        img
    }

    fn open_with(ext: &[u8]) -> Result<VmdkReader> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("e.vmdk"), ext).unwrap();
        let desc = "createType=\"seSparse\"\nCID=fffffffe\nparentCID=ffffffff\nRW 2048 SESPARSE \"e.vmdk\"\n";
        let ctx = OpenContext::new(Some(&dir.path().join("d.vmdk")), ExternalPolicy::SameFolder);
        VmdkReader::open(Arc::new(MemStorage::new(desc.as_bytes().to_vec())), &ctx)
    }

    #[test]
    fn sesparse_maps() {
        let r = open_with(&extent()).unwrap();
        assert_eq!(r.virtual_size(), 1 << 20);
        let e = r.map(GuestOffset(0), 1 << 20).unwrap();
        assert_eq!(e.len, 4096);
        assert!(matches!(
            e.kind,
            MapKind::Data {
                offset: HostOffset(0x8600),
                ..
            }
        ));
        assert_eq!(
            r.map(GuestOffset(4096), 1 << 20).unwrap().kind,
            MapKind::Zero
        );
        assert_eq!(
            r.map(GuestOffset(8192), 1 << 20).unwrap().kind,
            MapKind::Unallocated
        );
        assert_eq!(r.cluster_size(), Some(4096));
    }

    #[test]
    fn sesparse_rules() {
        let kind = |patch: &dyn Fn(&mut Vec<u8>)| {
            let mut x = extent();
            patch(&mut x);
            open_with(&x).err().map(|e| e.kind())
        };
        use crate::ErrorKind::*;
        assert_eq!(kind(&|x| x[8] = 2), Some(Unsupported), "version");
        assert_eq!(kind(&|x| x[0x18] = 16), Some(Invalid), "grain size");
        assert_eq!(kind(&|x| x[512] = 0), Some(Invalid), "volatile magic");
        assert_eq!(
            kind(&|x| x[512 + 24] = 1),
            Some(Unsupported),
            "dirty journal"
        );
        assert_eq!(
            kind(&|x| x[1024 + 7] = 0x20),
            Some(Corrupt),
            "directory entry type"
        );
        assert_eq!(
            kind(&|x| x[1536 + 7] = 0x50),
            Some(Corrupt),
            "grain entry type"
        );
        assert_eq!(kind(&|x| x[1536] = 0x40), Some(Corrupt), "grain past eof");
        assert_eq!(
            kind(&|x| x[0x10 + 3] = 0x10),
            Some(Invalid),
            "capacity past the directory"
        );
    }
}

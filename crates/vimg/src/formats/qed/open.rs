//! Opening a QED image: the header, the L1 table and every L2 table checked (each table
//! inside the file, cluster-aligned, past the header, used once; every data cluster likewise;
//! QEMU's docs/interop/qed_spec.txt). `read.rs` answers `map` from memory.

use std::sync::Arc;

use super::error::QedError;
use super::header::{
    self, Header, F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE, F_MASK, HEADER_SIZE, MAGIC,
    MAX_CLUSTER_SIZE, MAX_TABLE_SIZE, MIN_CLUSTER_SIZE, ZERO_CLUSTER,
};
use super::read::QedReader;
use crate::error::Result;
use crate::formats::Format;
use crate::limits;
use crate::mapping::BackingRef;
use crate::storage::{read_exact, Storage};

/// The longest backing file name QEMU reads.
pub const MAX_BACKING_NAME: u32 = 1023;

fn field(field: &'static str, at: u64, value: u64, why: impl Into<String>) -> QedError {
    QedError::Field {
        field,
        at,
        value,
        why: why.into(),
    }
}

/// One bit per cluster of the file: which cluster is in use, to refuse double use.
struct Used {
    bits: Vec<u64>,
    who: Vec<(u64, String)>,
}

impl Used {
    fn claim(&mut self, cluster: u64, what: impl Fn() -> String) -> Result<(), QedError> {
        let (w, b) = ((cluster / 64) as usize, cluster % 64);
        let Some(word) = self.bits.get_mut(w) else {
            return Ok(());
        };
        if *word & (1 << b) != 0 {
            let first = self
                .who
                .iter()
                .find(|(c, _)| *c == cluster)
                .map(|(_, s)| s.clone())
                .unwrap_or_else(|| "another entry".into());
            return Err(QedError::Duplicate {
                first,
                second: what(),
                value: cluster,
            });
        }
        *word |= 1 << b;
        Ok(())
    }
}

impl QedReader {
    /// Opens the QED image in `storage`.
    pub fn open(storage: Arc<dyn Storage>) -> Result<QedReader> {
        let len = storage.len();
        if len < HEADER_SIZE as u64 {
            return Err(QedError::TooShort { len }.into());
        }
        let mut hb = [0u8; HEADER_SIZE];
        read_exact(&*storage, &mut hb, 0, "QED header")?;
        let h = Header::parse(&hb)?;
        if h.magic != MAGIC {
            return Err(QedError::Magic { found: h.magic }.into());
        }
        if h.features & !F_MASK != 0 {
            return Err(QedError::Features(h.features & !F_MASK).into());
        }
        let cs = h.cluster_size;
        if !cs.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cs) {
            return Err(field(
                "cluster size",
                4,
                cs.into(),
                "must be a power of two from 4 KiB to 64 MiB",
            )
            .into());
        }
        let ts = h.table_size;
        if !ts.is_power_of_two() || ts > MAX_TABLE_SIZE {
            return Err(field(
                "table size",
                8,
                ts.into(),
                "must be a power of two from 1 to 16",
            )
            .into());
        }
        let cs = u64::from(cs);
        let entries = h.table_entries();
        let max_size = entries * entries * cs;
        if !h.image_size.is_multiple_of(512) || h.image_size > max_size {
            return Err(field(
                "image size",
                0x30,
                h.image_size,
                format!("must be a multiple of 512 and at most {max_size:#x}"),
            )
            .into());
        }
        let header_bytes = u64::from(h.header_size)
            .checked_mul(cs)
            .filter(|b| *b >= HEADER_SIZE as u64 && *b <= len)
            .ok_or_else(|| {
                field(
                    "header size",
                    12,
                    h.header_size.into(),
                    "in clusters, must be at least 1 and inside the file",
                )
            })?;
        let table_bytes = u64::from(ts) * cs;
        let check = |what: String, off: u64, size: u64| -> Result<(), QedError> {
            let why = if !off.is_multiple_of(cs) {
                "not aligned to a cluster"
            } else if off < header_bytes {
                "inside the header"
            } else if off.checked_add(size).is_none_or(|e| e > len) {
                "past the end of the file"
            } else {
                return Ok(());
            };
            Err(QedError::Offset {
                what,
                value: off,
                why: why.into(),
            })
        };
        check(
            "L1 table offset (at 0x28)".into(),
            h.l1_table_offset,
            table_bytes,
        )?;
        let n = limits::check_table_bytes("QED L1 table", table_bytes)?;
        let mut raw = vec![0u8; n];
        read_exact(&*storage, &mut raw, h.l1_table_offset, "QED L1 table")?;
        let l1 = header::parse_table(&raw);
        let clusters = len.div_ceil(cs);
        let mut used = Used {
            bits: vec![0; (clusters as usize).div_ceil(64)],
            who: Vec::new(),
        };
        for c in 0..u64::from(ts) {
            used.claim(h.l1_table_offset / cs + c, || "the L1 table".into())?;
        }
        used.who
            .push((h.l1_table_offset / cs, "the L1 table".into()));
        // Only the L1 entries that cover the disk matter; entries past it are ignored.
        let l2_span = entries * cs;
        let needed = h.image_size.div_ceil(l2_span) as usize;
        let mut l2 = Vec::with_capacity(needed);
        let mut total = 0u64;
        for (i, &off) in l1.iter().enumerate().take(needed) {
            if off == 0 {
                l2.push(None);
                continue;
            }
            let what = || format!("L1 entry {i} (at {:#x})", h.l1_table_offset + 8 * i as u64);
            check(what(), off, table_bytes)?;
            for c in 0..u64::from(ts) {
                used.claim(off / cs + c, what)?;
            }
            used.who.push((off / cs, what()));
            total += table_bytes;
            limits::check_table_bytes("QED L2 tables", total)?;
            read_exact(
                &*storage,
                &mut raw,
                off,
                format_args!("QED L2 table at {off:#x}"),
            )?;
            let t = header::parse_table(&raw);
            for (j, &e) in t.iter().enumerate() {
                if e == 0 || e == ZERO_CLUSTER {
                    continue;
                }
                let what = || {
                    format!(
                        "L2 entry {j} (at {:#x}) of L1 entry {i}",
                        off + 8 * j as u64
                    )
                };
                check(what(), e, cs)?;
                used.claim(e / cs, what)?;
            }
            l2.push(Some(t));
        }
        let backing = if h.features & F_BACKING_FILE != 0 {
            check_backing_name_field(&h, header_bytes)?;
            let (o, s) = (h.backing_filename_offset, h.backing_filename_size);
            let mut name = vec![0u8; s as usize];
            read_exact(&*storage, &mut name, o.into(), "QED backing file name")?;
            Some(BackingRef {
                field: "backing_file".into(),
                name: String::from_utf8_lossy(&name).into_owned(),
                format: (h.features & F_BACKING_FORMAT_NO_PROBE != 0).then_some(Format::Raw),
                alternatives: Vec::new(),
                link: None,
            })
        } else {
            None
        };
        Ok(QedReader {
            storage,
            header: h,
            cluster_size: cs,
            l2_span,
            l1,
            l2,
            backing,
        })
    }
}

/// The backing file name's place: inside the header, 1 to [`MAX_BACKING_NAME`] bytes
/// (checked by the reader after the tables, and by the repair-only open, which skips
/// them).
pub(super) fn check_backing_name_field(h: &Header, header_bytes: u64) -> Result<()> {
    let (o, s) = (h.backing_filename_offset, h.backing_filename_size);
    if s == 0 || s > MAX_BACKING_NAME || u64::from(o) + u64::from(s) > header_bytes {
        return Err(field(
            "backing file name size",
            0x3c,
            s.into(),
            format!("with offset {o:#x}, the name must lie inside the header ({header_bytes:#x} bytes) and be 1 to {MAX_BACKING_NAME} bytes"),
        )
        .into());
    }
    Ok(())
}

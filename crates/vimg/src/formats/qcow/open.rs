//! Opening a qcow (version 1) image: the header, the backing name, the L1 table and every
//! L2 table checked, each stretch of the file claimed once (as QEMU's block/qcow.c
//! reads it). `read.rs` answers `map` from memory.

use std::fmt;
use std::sync::Arc;

use super::error::QcowError;
use super::header::{self, Header, COMPRESSED, CRYPT_AES, CRYPT_NONE, HEADER_SIZE, MAGIC, VERSION};
use super::read::{compressed, QcowReader};
use crate::error::Result;
use crate::limits;
use crate::mapping::BackingRef;
use crate::storage::{read_exact, Storage};

/// The longest backing file name QEMU reads.
pub const MAX_BACKING_NAME: u32 = 1023;

fn field(field: &'static str, at: u64, value: u64, why: impl Into<String>) -> QcowError {
    QcowError::Field {
        field,
        at,
        value,
        why: why.into(),
    }
}

/// Who claims a stretch of the file.
#[derive(Clone, Copy, Debug)]
enum Who {
    Header,
    BackingName,
    L1,
    L2(u32),
    Cluster(u32, u32),
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Who::Header => f.write_str("the header"),
            Who::BackingName => f.write_str("the backing file name"),
            Who::L1 => f.write_str("the L1 table"),
            Who::L2(i) => write!(f, "the L2 table of L1 entry {i}"),
            Who::Cluster(i, j) => write!(f, "the cluster of L2 entry {j} of L1 entry {i}"),
        }
    }
}

impl QcowReader {
    /// Opens the qcow image in `storage`.
    pub fn open(storage: Arc<dyn Storage>) -> Result<QcowReader> {
        Self::open_with(storage, false)
    }

    /// [`QcowReader::open`]; with `aes`, an AES-encrypted image opens too (mapped as a
    /// plain one: [`super::aes::reader`] decrypts).
    pub fn open_with(storage: Arc<dyn Storage>, aes: bool) -> Result<QcowReader> {
        let len = storage.len();
        if len < HEADER_SIZE as u64 {
            return Err(QcowError::TooShort { len }.into());
        }
        let mut hb = [0u8; HEADER_SIZE];
        read_exact(&*storage, &mut hb, 0, "qcow header")?;
        let h = Header::parse(&hb)?;
        if h.magic != MAGIC || h.version != VERSION {
            return Err(QcowError::Magic {
                magic: h.magic,
                version: h.version,
            }
            .into());
        }
        if h.size <= 1 {
            return Err(field(
                "size",
                0x18,
                h.size,
                "Image size is too small (must be at least 2 bytes)",
            )
            .into());
        }
        if !(9..=16).contains(&h.cluster_bits) {
            return Err(field(
                "cluster bits",
                0x20,
                h.cluster_bits.into(),
                "Cluster size must be between 512 and 64k",
            )
            .into());
        }
        if !(6..=13).contains(&h.l2_bits) {
            return Err(field(
                "L2 bits",
                0x21,
                h.l2_bits.into(),
                "L2 table size must be between 512 and 64k",
            )
            .into());
        }
        match h.crypt_method {
            CRYPT_NONE => {}
            CRYPT_AES if aes => {}
            CRYPT_AES => return Err(QcowError::Encrypted(h.crypt_method).into()),
            m => {
                return Err(field(
                    "encryption method",
                    0x24,
                    m.into(),
                    "invalid encryption method",
                )
                .into())
            }
        }
        let cluster_bits = u32::from(h.cluster_bits);
        let l2_bits = u32::from(h.l2_bits);
        let shift = cluster_bits + l2_bits;
        if h.size > u64::MAX - (1u64 << shift) {
            return Err(field("size", 0x18, h.size, "Image too large").into());
        }
        let l1_size = (h.size + (1u64 << shift) - 1) >> shift;
        if l1_size > i32::MAX as u64 / 8 {
            return Err(field("size", 0x18, h.size, "Image too large").into());
        }
        let mut claims: Vec<(u64, u64, Who)> = vec![(0, HEADER_SIZE as u64, Who::Header)];
        let inside = |what: Who, off: u64, n: u64| -> Result<(), QcowError> {
            if off.checked_add(n).is_none_or(|e| e > len) {
                return Err(QcowError::Offset {
                    what: format!("{what} offset"),
                    value: off,
                    why: format!(
                        "{n:#x} bytes from there run past the end of the file ({len:#x} bytes)"
                    ),
                });
            }
            Ok(())
        };
        let l1_bytes = l1_size * 8;
        inside(Who::L1, h.l1_table_offset, l1_bytes)?;
        claims.push((h.l1_table_offset, h.l1_table_offset + l1_bytes, Who::L1));
        let n = limits::check_table_bytes("qcow L1 table", l1_bytes)?;
        let mut raw = vec![0u8; n];
        read_exact(&*storage, &mut raw, h.l1_table_offset, "qcow L1 table")?;
        let l1 = header::parse_table(&raw);
        let cs = 1u64 << cluster_bits;
        let l2_bytes = 8u64 << l2_bits;
        let mut raw = vec![0u8; l2_bytes as usize];
        let mut l2 = Vec::with_capacity(l1.len());
        let mut total = 0u64;
        for (i, &off) in l1.iter().enumerate() {
            if off == 0 {
                l2.push(None);
                continue;
            }
            inside(Who::L2(i as u32), off, l2_bytes)?;
            claims.push((off, off + l2_bytes, Who::L2(i as u32)));
            total += l2_bytes;
            limits::check_table_bytes("qcow L2 tables", total)?;
            read_exact(
                &*storage,
                &mut raw,
                off,
                format_args!("qcow L2 table at {off:#x}"),
            )?;
            let t = header::parse_table(&raw);
            for (j, &e) in t.iter().enumerate() {
                if e == 0 {
                    continue;
                }
                let (start, n) = if e & COMPRESSED != 0 {
                    let (o, csize) = compressed(e, cluster_bits);
                    (o, csize)
                } else {
                    (e, cs)
                };
                inside(Who::Cluster(i as u32, j as u32), start, n)?;
                claims.push((start, start + n, Who::Cluster(i as u32, j as u32)));
            }
            l2.push(Some(t));
        }
        let backing = if h.backing_file_offset != 0 {
            let s = h.backing_file_size;
            if s == 0 || s > MAX_BACKING_NAME {
                return Err(field(
                    "backing file name size",
                    0x10,
                    s.into(),
                    format!("must be 1 to {MAX_BACKING_NAME} bytes"),
                )
                .into());
            }
            inside(Who::BackingName, h.backing_file_offset, s.into())?;
            claims.push((
                h.backing_file_offset,
                h.backing_file_offset + u64::from(s),
                Who::BackingName,
            ));
            let mut name = vec![0u8; s as usize];
            read_exact(
                &*storage,
                &mut name,
                h.backing_file_offset,
                "qcow backing file name",
            )?;
            Some(BackingRef {
                field: "backing_file".into(),
                name: String::from_utf8_lossy(&name).into_owned(),
                format: None,
                alternatives: Vec::new(),
                link: None,
            })
        } else {
            None
        };
        claims.sort_by_key(|c| (c.0, c.1));
        for w in claims.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(QcowError::Offset {
                    what: format!("{} offset", w[1].2),
                    value: w[1].0,
                    why: format!("it overlaps {} ({:#x}..{:#x})", w[0].2, w[0].0, w[0].1),
                }
                .into());
            }
        }
        Ok(QcowReader {
            storage,
            // QEMU counts whole sectors.
            virtual_size: h.size / 512 * 512,
            header: h,
            cluster_bits,
            l2_bits,
            l2,
            backing,
        })
    }
}

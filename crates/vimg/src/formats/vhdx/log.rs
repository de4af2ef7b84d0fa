//! The VHDX log ([MS-VHDX] §2.3): finding the active sequence and replaying it in memory.
//!
//! The log is a circular buffer of 4 KiB sectors holding entries; each entry is a header, its
//! descriptors and the data sectors they write, protected by one CRC-32C. The active
//! sequence is the run of valid entries (current log GUID, good checksum, well-formed
//! descriptors) that follow each other in the buffer with sequence numbers increasing by
//! one, ending at the entry with the highest sequence number. Its last entry's `tail` names
//! the oldest entry still needed; replay applies the entries from there, in order.
//!
//! What happens when the log cannot be used:
//! - log GUID zero, or log length zero: there is no log (qemu and Hyper-V agree).
//! - log GUID set but no valid, complete sequence (bad checksums, broken sequence numbers,
//!   a tail outside its sequence): nothing is replayed and the image is read as it is on
//!   disk, with a warning. This is what qemu does (it opens such an image read-only
//!   without complaint); following the spec we also refuse a sequence whose tail entry is
//!   missing, where qemu would replay what it found.
//! - an entry of the active sequence says the file was longer than it is
//!   (FlushedFileOffset): the file was truncated after the log was written; error, as qemu.
//! - a log larger than [`MAX_LOG_BYTES`] with a non-zero log GUID: error (unsupported); no
//!   real writer makes one (Hyper-V and qemu write 1 MiB logs).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use byteorder::{ByteOrder, LittleEndian as LE};

use super::error::VhdxError;
use super::header::{
    checksum_with_zeroed_field, Header, LogDataSector, LogDescriptor, LogEntryHeader,
    LOG_DESC_SIZE, LOG_HEADER_SIZE, LOG_SECTOR,
};
use super::overlay::LogOverlay;
use crate::error::Result;
use crate::storage::{read_exact, Storage};

/// Largest log vimg replays (it is read into memory whole).
pub const MAX_LOG_BYTES: u64 = 32 << 20;

/// What the log asks for.
pub enum LogState {
    /// No log: the log GUID (or length) is zero.
    Empty,
    /// The log GUID is set but no valid sequence was found; nothing was replayed.
    NoValidSequence {
        /// Why, for the warning.
        reason: String,
    },
    /// The active sequence, replayed into an overlay of the file.
    Replayed {
        /// The file as it reads after replay.
        overlay: LogOverlay,
        /// Entries replayed.
        entries: usize,
        /// Sequence number of the last entry.
        head_sequence: u64,
    },
}

/// One change an entry makes.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// Write a 4 KiB sector at `target`; bytes 8..4092 are in the log at `data_pos`.
    Data {
        target: u64,
        leading: [u8; 8],
        trailing: [u8; 4],
        data_pos: u64,
    },
    /// Zero `len` bytes at `target`.
    Zero { target: u64, len: u64 },
}

/// A valid log entry, as found in the buffer.
#[derive(Clone, Debug)]
struct Entry {
    pos: u64,
    header: LogEntryHeader,
    ops: Vec<Op>,
}

impl Entry {
    fn next_pos(&self, log_len: u64) -> u64 {
        (self.pos + u64::from(self.header.entry_length)) % log_len
    }
}

/// Why scanning stopped: checking more entries would exceed the checksum budget.
const BUDGET: &str =
    "the log holds more overlapping entries than vimg checks (checksum budget exhausted)";

/// The log buffer, read whole, with circular access.
struct Ring {
    buf: Vec<u8>,
}

impl Ring {
    fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    /// `len` bytes from `pos`, wrapping at the end of the buffer.
    fn copy(&self, pos: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut p = pos as usize;
        while out.len() < len {
            let n = (len - out.len()).min(self.buf.len() - p);
            out.extend_from_slice(&self.buf[p..p + n]);
            p = (p + n) % self.buf.len();
        }
        out
    }
}

/// Why a log entry is not replayed.
enum EntryError {
    /// The checksum budget is spent: the whole log is refused.
    Budget,
    /// The entry is not valid; the search for the active sequence goes on.
    Invalid(String),
}

impl From<String> for EntryError {
    fn from(why: String) -> Self {
        EntryError::Invalid(why)
    }
}

/// Checks the header of the entry at `pos` (cheap), or says why it is not a valid entry.
fn check_header(ring: &Ring, pos: u64, header: &Header) -> Result<LogEntryHeader, EntryError> {
    let log_len = ring.len();
    let start = pos as usize;
    let h = LogEntryHeader::parse(&ring.buf[start..start + LOG_HEADER_SIZE])
        .map_err(|e| e.to_string())?;
    if h.log_guid != header.log_guid {
        return Err(EntryError::Invalid(format!(
            "log GUID {} is not the header's {}",
            h.log_guid, header.log_guid
        )));
    }
    let len = u64::from(h.entry_length);
    if len == 0 || len % LOG_SECTOR != 0 || len > log_len {
        return Err(EntryError::Invalid(format!(
            "entry length {len:#x} is not a non-zero multiple of 4 KiB within the log"
        )));
    }
    if h.sequence_number == 0 {
        return Err(EntryError::Invalid("sequence number is 0".into()));
    }
    if u64::from(h.tail) % LOG_SECTOR != 0 || u64::from(h.tail) >= log_len {
        return Err(EntryError::Invalid(format!(
            "tail {:#x} is not a log sector",
            h.tail
        )));
    }
    let desc_sectors = LogEntryHeader::descriptor_sectors(h.descriptor_count);
    if desc_sectors * LOG_SECTOR > len {
        return Err(EntryError::Invalid(format!(
            "{} descriptors do not fit in an entry of {len:#x} bytes",
            h.descriptor_count
        )));
    }
    Ok(h)
}

/// Checks the checksum and descriptors of the entry at `pos` whose header is `h`, and lists
/// its operations.
fn parse_body(ring: &Ring, pos: u64, h: LogEntryHeader) -> Result<Entry, EntryError> {
    let log_len = ring.len();
    let len = u64::from(h.entry_length);
    let desc_sectors = LogEntryHeader::descriptor_sectors(h.descriptor_count);
    let bytes = ring.copy(pos, len as usize);
    let computed = checksum_with_zeroed_field(&bytes, 4);
    if !crate::checksum::checksum_matches(h.checksum, computed) {
        return Err(EntryError::Invalid(format!(
            "checksum is {:#010x}, the CRC-32C of the entry is {computed:#010x}",
            h.checksum
        )));
    }
    let mut ops = Vec::with_capacity(h.descriptor_count as usize);
    let mut data_sectors = 0u64;
    for i in 0..h.descriptor_count as usize {
        let at = LOG_HEADER_SIZE + i * LOG_DESC_SIZE;
        let d = LogDescriptor::parse(&bytes[at..at + LOG_DESC_SIZE])
            .map_err(|e| format!("descriptor {i}: {e}"))?;
        if d.sequence_number() != h.sequence_number {
            return Err(EntryError::Invalid(format!(
                "descriptor {i} has sequence number {:#x}, the entry {:#x}",
                d.sequence_number(),
                h.sequence_number
            )));
        }
        if d.file_offset() % LOG_SECTOR != 0 {
            return Err(EntryError::Invalid(format!(
                "descriptor {i} targets {:#x}, not a multiple of 4 KiB",
                d.file_offset()
            )));
        }
        match d {
            LogDescriptor::Zero {
                length,
                file_offset,
                ..
            } => {
                if length % LOG_SECTOR != 0 || file_offset.checked_add(length).is_none() {
                    return Err(EntryError::Invalid(format!(
                        "zero descriptor {i} has length {length:#x} at {file_offset:#x}"
                    )));
                }
                ops.push(Op::Zero {
                    target: file_offset,
                    len: length,
                });
            }
            LogDescriptor::Data {
                trailing_bytes,
                leading_bytes,
                file_offset,
                ..
            } => {
                if file_offset.checked_add(LOG_SECTOR).is_none() {
                    return Err(EntryError::Invalid(format!(
                        "data descriptor {i} targets {file_offset:#x}"
                    )));
                }
                let in_entry = (desc_sectors + data_sectors) * LOG_SECTOR;
                if in_entry + LOG_SECTOR > len {
                    return Err(EntryError::Invalid(format!(
                        "data descriptor {i} has no data sector inside the entry"
                    )));
                }
                let at = in_entry as usize;
                let s = LogDataSector::parse(&bytes[at..at + LOG_SECTOR as usize])
                    .map_err(|e| format!("data sector {data_sectors}: {e}"))?;
                if s.sequence_number != h.sequence_number {
                    return Err(EntryError::Invalid(format!(
                        "data sector {data_sectors} has sequence number {:#x}, the entry {:#x}",
                        s.sequence_number, h.sequence_number
                    )));
                }
                ops.push(Op::Data {
                    target: file_offset,
                    leading: leading_bytes,
                    trailing: trailing_bytes,
                    data_pos: (pos + in_entry) % log_len,
                });
                data_sectors += 1;
            }
        }
    }
    Ok(Entry {
        pos,
        header: h,
        ops,
    })
}

/// Reads the log the current `header` describes and replays its active sequence over
/// `storage`. The caller has checked the header's log fields (offset, alignment, version).
pub fn replay(storage: &Arc<dyn Storage>, header: &Header) -> Result<LogState> {
    if header.log_guid.is_zero() || header.log_length == 0 {
        return Ok(LogState::Empty);
    }
    let log_len = u64::from(header.log_length);
    let log_off = header.log_offset;
    if log_len > MAX_LOG_BYTES {
        return Err(VhdxError::Limit {
            what: format!(
                "the log at {log_off:#x} holds {log_len:#x} bytes to replay; vimg replays logs of at most {MAX_LOG_BYTES:#x} bytes"
            ),
        }
        .into());
    }
    let file_len = storage.len();
    if log_off.checked_add(log_len).is_none_or(|e| e > file_len) {
        return Err(VhdxError::Log {
            offset: log_off,
            reason: format!(
                "the log ({log_len:#x} bytes) extends past the end of the file ({file_len:#x} bytes)"
            ),
        }
        .into());
    }
    let mut ring = Ring {
        buf: vec![0u8; log_len as usize],
    };
    read_exact(&**storage, &mut ring.buf, log_off, "VHDX log")?;

    let mut budget = (4 * log_len).max(4 << 20);
    let mut valid: BTreeMap<u64, Entry> = BTreeMap::new();
    let mut last_reason = String::from("no entry carries the header's log GUID");
    for s in 0..log_len / LOG_SECTOR {
        let pos = s * LOG_SECTOR;
        if &ring.buf[pos as usize..pos as usize + 4] != b"loge" {
            continue;
        }
        let checked = check_header(&ring, pos, header).and_then(|h| {
            // Checksumming is the expensive part; a hostile log could make every sector
            // claim a whole-log entry, so the total is bounded.
            budget = budget
                .checked_sub(u64::from(h.entry_length))
                .ok_or(EntryError::Budget)?;
            parse_body(&ring, pos, h)
        });
        match checked {
            Ok(e) => {
                valid.insert(pos, e);
            }
            Err(EntryError::Budget) => {
                return Err(VhdxError::Log {
                    offset: log_off + pos,
                    reason: BUDGET.to_string(),
                }
                .into());
            }
            Err(EntryError::Invalid(r)) => {
                last_reason = format!("entry at log offset {pos:#x}: {r}")
            }
        }
    }
    if valid.is_empty() {
        return Ok(LogState::NoValidSequence {
            reason: last_reason,
        });
    }

    // Entries that continue another entry's sequence do not start a chain.
    let successor = |e: &Entry| -> Option<u64> {
        let n = e.next_pos(log_len);
        valid
            .get(&n)
            .filter(|next| next.header.sequence_number == e.header.sequence_number + 1)
            .map(|_| n)
    };
    let continued: HashSet<u64> = valid.values().filter_map(successor).collect();
    let mut best: Option<Vec<u64>> = None;
    for e in valid.values().filter(|e| !continued.contains(&e.pos)) {
        let mut chain = vec![e.pos];
        let mut cur = e;
        // Sequence numbers strictly increase along a chain, so it cannot loop; the bound
        // only guards against a mistake.
        while let Some(n) = successor(cur) {
            if chain.len() > valid.len() {
                break;
            }
            chain.push(n);
            cur = &valid[&n];
        }
        let head_seq = cur.header.sequence_number;
        let better = match &best {
            None => true,
            Some(b) => valid[&b[b.len() - 1]].header.sequence_number < head_seq,
        };
        if better {
            best = Some(chain);
        }
    }
    let Some(chain) = best else {
        return Ok(LogState::NoValidSequence {
            reason: "no entry starts a sequence".into(),
        });
    };
    let head = &valid[&chain[chain.len() - 1]];
    let tail = u64::from(head.header.tail);
    let Some(first) = chain.iter().position(|p| *p == tail) else {
        return Ok(LogState::NoValidSequence {
            reason: format!(
                "the newest entry (sequence {:#x} at log offset {:#x}) names tail {tail:#x}, which is not part of its sequence",
                head.header.sequence_number, head.pos
            ),
        });
    };

    let mut overlay = LogOverlay::new(storage.clone());
    let replayed = &chain[first..];
    for pos in replayed {
        let e = &valid[pos];
        if e.header.flushed_file_offset > file_len {
            return Err(VhdxError::Log {
                offset: log_off + e.pos,
                reason: format!(
                    "entry {:#x} says the file held {:#x} bytes when it was written, but it holds {file_len:#x}: the file was truncated",
                    e.header.sequence_number, e.header.flushed_file_offset
                ),
            }
            .into());
        }
        for op in &e.ops {
            match *op {
                Op::Zero { target, len } => overlay.write_zeroes(target, len),
                Op::Data {
                    target,
                    leading,
                    trailing,
                    data_pos,
                } => {
                    let mut sector = ring.copy(data_pos, LOG_SECTOR as usize);
                    sector[..8].copy_from_slice(&leading);
                    sector[4092..].copy_from_slice(&trailing);
                    overlay.write_sector(target, sector);
                }
            }
        }
        overlay.extend_to(e.header.last_file_offset);
    }
    Ok(LogState::Replayed {
        overlay,
        entries: replayed.len(),
        head_sequence: head.header.sequence_number,
    })
}

/// Builds one log entry (for tests and fixtures): `sectors` are `(file offset, 4 KiB)`
/// writes, `zeros` are `(file offset, length)` ranges. Returns the encoded entry.
pub fn build_entry(
    log_guid: super::header::Guid,
    sequence_number: u64,
    tail: u32,
    file_size: u64,
    sectors: &[(u64, &[u8])],
    zeros: &[(u64, u64)],
) -> Vec<u8> {
    let count = (sectors.len() + zeros.len()) as u32;
    let desc_sectors = LogEntryHeader::descriptor_sectors(count);
    let len = (desc_sectors + sectors.len() as u64) * LOG_SECTOR;
    let mut buf = vec![0u8; len as usize];
    let h = LogEntryHeader {
        checksum: 0,
        entry_length: len as u32,
        tail,
        sequence_number,
        descriptor_count: count,
        log_guid,
        flushed_file_offset: file_size,
        last_file_offset: file_size,
    };
    h.write_to(&mut buf);
    let mut at = LOG_HEADER_SIZE;
    for &(off, zlen) in zeros {
        LogDescriptor::Zero {
            length: zlen,
            file_offset: off,
            sequence_number,
        }
        .write_to(&mut buf[at..]);
        at += LOG_DESC_SIZE;
    }
    for (i, &(off, data)) in sectors.iter().enumerate() {
        let mut leading = [0u8; 8];
        leading.copy_from_slice(&data[..8]);
        let mut trailing = [0u8; 4];
        trailing.copy_from_slice(&data[4092..4096]);
        LogDescriptor::Data {
            trailing_bytes: trailing,
            leading_bytes: leading,
            file_offset: off,
            sequence_number,
        }
        .write_to(&mut buf[at..]);
        at += LOG_DESC_SIZE;
        let s = ((desc_sectors + i as u64) * LOG_SECTOR) as usize;
        LogDataSector { sequence_number }.write_to(data, &mut buf[s..s + LOG_SECTOR as usize]);
    }
    let crc = checksum_with_zeroed_field(&buf, 4);
    LE::write_u32(&mut buf[4..], crc);
    buf
}

#[cfg(test)]
mod tests {
    use super::super::header::{Guid, HEADER_VERSION, LOG_VERSION};
    use super::*;
    use crate::storage::MemStorage;

    const LOG_OFF: u64 = 1 << 20;
    const LOG_LEN: u64 = 1 << 20;

    fn header(guid: Guid) -> Header {
        Header {
            sequence_number: 1,
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            log_guid: guid,
            log_version: LOG_VERSION,
            version: HEADER_VERSION,
            log_length: LOG_LEN as u32,
            log_offset: LOG_OFF,
        }
    }

    /// A 4 MiB file whose byte at `i` is `i % 253`, with `entries` placed in the log.
    fn file(entries: &[(u64, Vec<u8>)]) -> Arc<dyn Storage> {
        let mut f: Vec<u8> = (0..4u64 << 20).map(|i| (i % 253) as u8).collect();
        f[LOG_OFF as usize..(LOG_OFF + LOG_LEN) as usize].fill(0);
        for (pos, e) in entries {
            for (i, b) in e.iter().enumerate() {
                let p = (pos + i as u64) % LOG_LEN;
                f[(LOG_OFF + p) as usize] = *b;
            }
        }
        Arc::new(MemStorage::new(f))
    }

    fn read(s: &dyn Storage, off: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        s.read_exact_at(&mut b, off).unwrap();
        b
    }

    #[test]
    fn no_log_when_guid_is_zero() {
        let s = file(&[]);
        assert!(matches!(
            replay(&s, &header(Guid::ZERO)).unwrap(),
            LogState::Empty
        ));
    }

    #[test]
    fn sequence_is_replayed_in_order() {
        let g = Guid::random();
        let a = vec![0xaau8; 4096];
        let b = vec![0xbbu8; 4096];
        // Entry 1 writes A at 3 MiB; entry 2 overwrites it with B and zeroes 8 KiB at
        // 3 MiB + 8 KiB. Both are needed (tail = entry 1).
        let e1 = build_entry(g, 10, 0, 4 << 20, &[(3 << 20, &a)], &[]);
        let e2 = build_entry(
            g,
            11,
            0,
            4 << 20,
            &[(3 << 20, &b)],
            &[((3 << 20) + 8192, 8192)],
        );
        let s = file(&[(0, e1.clone()), (e1.len() as u64, e2)]);
        let LogState::Replayed {
            overlay,
            entries,
            head_sequence,
        } = replay(&s, &header(g)).unwrap()
        else {
            panic!("not replayed")
        };
        assert_eq!((entries, head_sequence), (2, 11));
        assert_eq!(read(&overlay, 3 << 20, 4096), b);
        assert_eq!(read(&overlay, (3 << 20) + 8192, 8192), vec![0u8; 8192]);
        assert_eq!(
            read(&overlay, (3 << 20) + 4096, 4096),
            read(&*s, (3 << 20) + 4096, 4096)
        );
    }

    #[test]
    fn wrapped_entry_and_stale_entries() {
        let g = Guid::random();
        let a = vec![0x5au8; 4096];
        // The entry starts in the last sector of the log and wraps to its start.
        let pos = LOG_LEN - 4096;
        let e = build_entry(g, 3, pos as u32, 4 << 20, &[(2 << 20, &a)], &[]);
        // A stale entry of an older log GUID is ignored.
        let old = build_entry(
            Guid::random(),
            9,
            8192,
            4 << 20,
            &[(2 << 20, &[1u8; 4096])],
            &[],
        );
        let s = file(&[(pos, e), (8192, old)]);
        let LogState::Replayed { overlay, .. } = replay(&s, &header(g)).unwrap() else {
            panic!("not replayed")
        };
        assert_eq!(read(&overlay, 2 << 20, 4096), a);
    }

    #[test]
    fn bad_checksum_means_no_replay() {
        let g = Guid::random();
        let mut e = build_entry(g, 3, 0, 4 << 20, &[(2 << 20, &[1u8; 4096])], &[]);
        e[5000] ^= 1;
        let s = file(&[(0, e)]);
        match replay(&s, &header(g)).unwrap() {
            LogState::NoValidSequence { reason } => {
                assert!(reason.contains("checksum"), "{reason}")
            }
            _ => panic!("replayed a corrupt entry"),
        }
    }

    #[test]
    fn tail_outside_the_sequence_means_no_replay() {
        let g = Guid::random();
        // Tail points at 64 KiB, where no entry is.
        let e = build_entry(g, 3, 65536, 4 << 20, &[(2 << 20, &[1u8; 4096])], &[]);
        let s = file(&[(0, e)]);
        assert!(matches!(
            replay(&s, &header(g)).unwrap(),
            LogState::NoValidSequence { .. }
        ));
    }

    #[test]
    fn broken_sequence_replays_the_newest_run_only() {
        let g = Guid::random();
        let e1 = build_entry(g, 5, 0, 4 << 20, &[(2 << 20, &[1u8; 4096])], &[]);
        // Sequence 7 does not follow 5: it starts its own run (tail = itself).
        let p2 = e1.len() as u64;
        let e2 = build_entry(g, 7, p2 as u32, 4 << 20, &[(2 << 20, &[2u8; 4096])], &[]);
        let s = file(&[(0, e1), (p2, e2)]);
        let LogState::Replayed {
            overlay, entries, ..
        } = replay(&s, &header(g)).unwrap()
        else {
            panic!("not replayed")
        };
        assert_eq!(entries, 1);
        assert_eq!(read(&overlay, 2 << 20, 4096), vec![2u8; 4096]);
    }

    #[test]
    fn truncated_file_is_an_error() {
        let g = Guid::random();
        let e = build_entry(g, 1, 0, 8 << 20, &[(2 << 20, &[1u8; 4096])], &[]);
        let s = file(&[(0, e)]);
        let err = replay(&s, &header(g)).err().unwrap();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn descriptor_rules() {
        let g = Guid::random();
        // Sequence number of the descriptor differs from the entry's.
        let mut e = build_entry(g, 1, 0, 4 << 20, &[(2 << 20, &[1u8; 4096])], &[]);
        e[64 + 24] = 9;
        let crc = checksum_with_zeroed_field(&e, 4);
        e[4..8].copy_from_slice(&crc.to_le_bytes());
        let s = file(&[(0, e)]);
        match replay(&s, &header(g)).unwrap() {
            LogState::NoValidSequence { reason } => {
                assert!(reason.contains("sequence number"), "{reason}")
            }
            _ => panic!("replayed a bad descriptor"),
        }
        // Unaligned target.
        let mut e = build_entry(g, 1, 0, 4 << 20, &[((2 << 20) + 512, &[1u8; 4096])], &[]);
        let crc = checksum_with_zeroed_field(&e, 4);
        e[4..8].copy_from_slice(&crc.to_le_bytes());
        let s = file(&[(0, e)]);
        assert!(matches!(
            replay(&s, &header(g)).unwrap(),
            LogState::NoValidSequence { .. }
        ));
    }

    #[test]
    fn log_past_end_of_file_and_oversized_log() {
        let g = Guid::random();
        let s: Arc<dyn Storage> = Arc::new(MemStorage::new(vec![0u8; 1 << 20]));
        assert_eq!(
            replay(&s, &header(g)).err().unwrap().kind(),
            crate::ErrorKind::Corrupt
        );
        let mut h = header(g);
        h.log_length = 1 << 30;
        assert_eq!(
            replay(&s, &h).err().unwrap().kind(),
            crate::ErrorKind::Unsupported
        );
    }

    #[test]
    fn hostile_overlapping_entries_are_bounded() {
        // Every sector claims a whole-log entry with the right GUID and a bad checksum.
        let g = Guid::random();
        let mut f = vec![0u8; 4 << 20];
        for s in 0..(LOG_LEN / 4096) {
            let h = LogEntryHeader {
                checksum: 1,
                entry_length: LOG_LEN as u32,
                tail: 0,
                sequence_number: 1,
                descriptor_count: 0,
                log_guid: g,
                flushed_file_offset: 0,
                last_file_offset: 0,
            };
            let at = (LOG_OFF + s * 4096) as usize;
            h.write_to(&mut f[at..at + 64]);
        }
        let s: Arc<dyn Storage> = Arc::new(MemStorage::new(f));
        let start = std::time::Instant::now();
        let err = replay(&s, &header(g)).err().unwrap();
        assert!(err.to_string().contains("budget"), "{err}");
        assert!(start.elapsed().as_secs() < 5);
    }
}

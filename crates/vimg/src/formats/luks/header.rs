//! The LUKS1 partition header and its eight key slots (LUKS1 On-Disk Format Specification
//! version 1.2.3, section 2.4 "Partition header" and figure 2 "key slot layout"). All
//! integers are big-endian; lengths and offsets count 512-byte sectors.
//!
//! ```text
//! 0x000  magic            6   "LUKS\xba\xbe"
//! 0x006  version          2   1
//! 0x008  cipher-name     32   "aes"
//! 0x028  cipher-mode     32   "xts-plain64"
//! 0x048  hash-spec       32   "sha256"
//! 0x068  payload-offset   4   first sector of the encrypted payload
//! 0x06c  key-bytes        4   volume key length
//! 0x070  mk-digest       20   PBKDF2(volume key, mk-digest-salt, mk-digest-iter)
//! 0x084  mk-digest-salt  32
//! 0x0a4  mk-digest-iter   4
//! 0x0a8  uuid            40   text, NUL-padded
//! 0x0d0  key slots     8x48   active, iterations, salt[32], key-material-offset, stripes
//! ```
//!
//! LUKS2 (its own spec, section 2) starts with the same magic and version 2; QEMU reads
//! version 1 only, and so does vimg: a LUKS2 header is refused by name.

use super::error::LuksError;
use crate::escape::escape_control;

/// Most PBKDF2 iterations vimg runs for one key slot or for the master-key digest (2^28).
pub const MAX_ITERATIONS: u32 = 1 << 28;
/// Most PBKDF2 iterations trying every active key slot may cost (2^29).
pub const MAX_TOTAL_ITERATIONS: u64 = 1 << 29;

/// "LUKS\xba\xbe": the partition header magic.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Bytes of the LUKS1 partition header with its key slots.
pub const HEADER_LEN: usize = 592;
/// Key slots in a LUKS1 header.
pub const SLOTS: usize = 8;
/// Offset of the first key slot.
pub(crate) const SLOT_AT: usize = 0xd0;
/// Bytes of one key slot.
pub(crate) const SLOT_LEN: usize = 48;
/// Key slot `active` value of an enabled slot.
pub const SLOT_ENABLED: u32 = 0x00ac_71f3;
/// Key slot `active` value of a disabled slot.
pub const SLOT_DISABLED: u32 = 0x0000_dead;
/// Salt length (LUKS_SALTSIZE).
pub const SALT_LEN: usize = 32;
/// Master key digest length (LUKS_DIGESTSIZE).
pub const DIGEST_LEN: usize = 20;
/// The stripes every LUKS1 writer uses; QEMU refuses any other count, and so does vimg,
/// which also bounds the key material a slot can make vimg read and merge.
pub const STRIPES: u32 = 4000;
/// Longest volume key accepted (AES-256-XTS: two 32-byte keys).
pub const MAX_KEY_BYTES: u32 = 64;
/// Bytes of the UUID field.
pub const UUID_LEN: usize = 40;
/// Bytes in a LUKS sector.
pub const SECTOR: u64 = 512;

/// One key slot (LUKS1 spec section 2.4, "key slot").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlot {
    /// [`SLOT_ENABLED`] or [`SLOT_DISABLED`].
    pub active: u32,
    /// PBKDF2 iterations of the passphrase.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// First sector of the slot's key material.
    pub key_offset: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

impl KeySlot {
    /// True for an enabled slot.
    pub fn is_active(&self) -> bool {
        self.active == SLOT_ENABLED
    }
}

/// The LUKS1 partition header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Header version (1).
    pub version: u16,
    /// `cipher-name`, e.g. "aes".
    pub cipher_name: String,
    /// `cipher-mode`, e.g. "xts-plain64".
    pub cipher_mode: String,
    /// `hash-spec`, e.g. "sha256".
    pub hash_spec: String,
    /// First sector of the payload.
    pub payload_offset: u32,
    /// Volume key bytes.
    pub key_bytes: u32,
    /// Digest of the volume key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Salt of that digest.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// PBKDF2 iterations of that digest.
    pub mk_digest_iter: u32,
    /// The UUID text, NUL-padded, as stored (see [`Header::uuid_text`]).
    pub uuid: [u8; UUID_LEN],
    /// The key slots.
    pub slots: Vec<KeySlot>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn name(b: &[u8], at: usize, len: usize, field: &'static str) -> Result<String, LuksError> {
    let f = &b[at..at + len];
    let end = f.iter().position(|c| *c == 0).ok_or(LuksError::BadName {
        field,
        at: at as u64,
    })?;
    let s = std::str::from_utf8(&f[..end]).map_err(|_| LuksError::BadName {
        field,
        at: at as u64,
    })?;
    Ok(s.to_string())
}

fn put_name(out: &mut [u8], at: usize, len: usize, s: &str) {
    let f = &mut out[at..at + len];
    f.fill(0);
    let n = s.len().min(len - 1);
    f[..n].copy_from_slice(&s.as_bytes()[..n]);
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes of a LUKS1 volume. Checks the magic, the
    /// version and that the names are NUL-terminated text; the numbers are judged by
    /// [`Header::validate`], which needs the file length.
    pub fn parse(b: &[u8]) -> Result<Header, LuksError> {
        if b.len() < HEADER_LEN {
            return Err(LuksError::TooShort {
                len: b.len() as u64,
                need: HEADER_LEN as u64,
            });
        }
        if b[..6] != MAGIC {
            return Err(LuksError::Magic);
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(LuksError::Version(version));
        }
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[0x70..0x84]);
        let mut mk_digest_salt = [0u8; SALT_LEN];
        mk_digest_salt.copy_from_slice(&b[0x84..0xa4]);
        let mut uuid = [0u8; UUID_LEN];
        uuid.copy_from_slice(&b[0xa8..0xd0]);
        let slots = (0..SLOTS)
            .map(|i| {
                let at = SLOT_AT + i * SLOT_LEN;
                let mut salt = [0u8; SALT_LEN];
                salt.copy_from_slice(&b[at + 8..at + 40]);
                KeySlot {
                    active: be32(b, at),
                    iterations: be32(b, at + 4),
                    salt,
                    key_offset: be32(b, at + 40),
                    stripes: be32(b, at + 44),
                }
            })
            .collect();
        Ok(Header {
            version,
            cipher_name: name(b, 0x08, 32, "cipher-name")?,
            cipher_mode: name(b, 0x28, 32, "cipher-mode")?,
            hash_spec: name(b, 0x48, 32, "hash-spec")?,
            payload_offset: be32(b, 0x68),
            key_bytes: be32(b, 0x6c),
            mk_digest,
            mk_digest_salt,
            mk_digest_iter: be32(b, 0xa4),
            uuid,
            slots,
        })
    }

    /// Writes the header into `out` (at least [`HEADER_LEN`] bytes).
    pub fn write_to(&self, out: &mut [u8]) {
        out[..HEADER_LEN].fill(0);
        out[..6].copy_from_slice(&MAGIC);
        out[6..8].copy_from_slice(&self.version.to_be_bytes());
        put_name(out, 0x08, 32, &self.cipher_name);
        put_name(out, 0x28, 32, &self.cipher_mode);
        put_name(out, 0x48, 32, &self.hash_spec);
        out[0x68..0x6c].copy_from_slice(&self.payload_offset.to_be_bytes());
        out[0x6c..0x70].copy_from_slice(&self.key_bytes.to_be_bytes());
        out[0x70..0x84].copy_from_slice(&self.mk_digest);
        out[0x84..0xa4].copy_from_slice(&self.mk_digest_salt);
        out[0xa4..0xa8].copy_from_slice(&self.mk_digest_iter.to_be_bytes());
        out[0xa8..0xd0].copy_from_slice(&self.uuid);
        for (i, s) in self.slots.iter().enumerate().take(SLOTS) {
            let at = SLOT_AT + i * SLOT_LEN;
            out[at..at + 4].copy_from_slice(&s.active.to_be_bytes());
            out[at + 4..at + 8].copy_from_slice(&s.iterations.to_be_bytes());
            out[at + 8..at + 40].copy_from_slice(&s.salt);
            out[at + 40..at + 44].copy_from_slice(&s.key_offset.to_be_bytes());
            out[at + 44..at + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
    }

    /// The UUID as qemu-img shows it: the text up to the first NUL, control characters
    /// escaped (it comes from the image).
    pub fn uuid_text(&self) -> String {
        let end = self.uuid.iter().position(|c| *c == 0).unwrap_or(UUID_LEN);
        escape_control(&String::from_utf8_lossy(&self.uuid[..end])).into_owned()
    }

    /// Byte offset of the payload.
    pub fn payload_bytes(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR
    }

    /// Bytes of one slot's key material area: `key-bytes * 4000`, rounded up to whole
    /// sectors (cryptsetup encrypts the area in whole sectors).
    pub fn material_len(&self) -> u64 {
        (u64::from(self.key_bytes) * u64::from(STRIPES)).div_ceil(SECTOR) * SECTOR
    }

    /// Checks every number against the file length `len` and the bounds above, as QEMU's
    /// header check does and more: the key length, the stripes, the slot states, each
    /// slot's key material inside the file, after the header, before the payload and apart
    /// from the other slots', and the iteration counts (see [`MAX_ITERATIONS`]).
    pub fn validate(&self, len: u64) -> Result<(), LuksError> {
        let field = |name: &str, at: u64, value: u64, why: &str| LuksError::Field {
            field: name.to_string(),
            at,
            value,
            why: why.to_string(),
        };
        if self.key_bytes == 0 || self.key_bytes > MAX_KEY_BYTES {
            return Err(field(
                "key-bytes",
                0x6c,
                self.key_bytes.into(),
                &format!("must be 1..={MAX_KEY_BYTES}"),
            ));
        }
        let payload = self.payload_bytes();
        if payload < HEADER_LEN as u64 {
            return Err(field(
                "payload-offset",
                0x68,
                self.payload_offset.into(),
                "the payload overlaps the LUKS header",
            ));
        }
        if payload > len {
            return Err(field(
                "payload-offset",
                0x68,
                self.payload_offset.into(),
                &format!("the payload starts past the end of the file ({len:#x} bytes)"),
            ));
        }
        if self.mk_digest_iter == 0 || self.mk_digest_iter > MAX_ITERATIONS {
            return Err(field(
                "mk-digest-iter",
                0xa4,
                self.mk_digest_iter.into(),
                &format!("must be 1..={} (vimg's bound)", MAX_ITERATIONS),
            ));
        }
        let mut budget: u64 = 0;
        let mut spans: Vec<(usize, u64, u64)> = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let at = (SLOT_AT + i * SLOT_LEN) as u64;
            let name = |f: &str| format!("key slot {i} {f}");
            if s.active != SLOT_ENABLED && s.active != SLOT_DISABLED {
                return Err(field(
                    &name("active"),
                    at,
                    s.active.into(),
                    "is neither enabled (0xac71f3) nor disabled (0xdead)",
                ));
            }
            if s.stripes != STRIPES {
                return Err(field(
                    &name("stripes"),
                    at + 44,
                    s.stripes.into(),
                    &format!("must be {STRIPES}"),
                ));
            }
            let start = u64::from(s.key_offset) * SECTOR;
            let end = start + self.material_len();
            if start < HEADER_LEN as u64 {
                return Err(LuksError::SlotPlacement {
                    slot: i,
                    start,
                    end,
                    why: "overlaps the LUKS header".into(),
                });
            }
            if end > payload {
                return Err(LuksError::SlotPlacement {
                    slot: i,
                    start,
                    end,
                    why: format!("overlaps the payload at {payload:#x}"),
                });
            }
            if let Some((j, ..)) = spans.iter().find(|(_, a, b)| start < *b && *a < end) {
                return Err(LuksError::SlotPlacement {
                    slot: i,
                    start,
                    end,
                    why: format!("overlaps key slot {j}'s"),
                });
            }
            spans.push((i, start, end));
            if s.is_active() {
                if s.iterations == 0 || s.iterations > MAX_ITERATIONS {
                    return Err(field(
                        &name("iterations"),
                        at + 4,
                        s.iterations.into(),
                        &format!("must be 1..={} (vimg's bound)", MAX_ITERATIONS),
                    ));
                }
                budget += u64::from(s.iterations) + u64::from(self.mk_digest_iter);
            }
        }
        if budget > MAX_TOTAL_ITERATIONS {
            return Err(field(
                "key slot iterations",
                SLOT_AT as u64,
                budget,
                &format!(
                    "trying every active slot would take more than {} PBKDF2 iterations (vimg's bound)",
                    MAX_TOTAL_ITERATIONS
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header as qemu-img 10.0 writes it for `-o iter-time=10` (slot 0 active, the rest
    /// disabled, key material 4 KiB-aligned after the header).
    fn qemu_like() -> Header {
        Header {
            version: 1,                                             // 0x006
            cipher_name: "aes".into(),                              // 0x008
            cipher_mode: "xts-plain64".into(),                      // 0x028
            hash_spec: "sha256".into(),                             // 0x048
            payload_offset: 4040,                                   // 0x068: 8 + 8 * 504 sectors
            key_bytes: 64,                                          // 0x06c: two AES-256 keys
            mk_digest: [1; DIGEST_LEN],                             // 0x070
            mk_digest_salt: [2; SALT_LEN],                          // 0x084
            mk_digest_iter: 1000,                                   // 0x0a4
            uuid: *b"379dcd5a-8326-4a15-8bfc-6e501fc85ded\0\0\0\0", // 0x0a8
            slots: (0..SLOTS as u32)
                .map(|i| KeySlot {
                    active: if i == 0 { SLOT_ENABLED } else { SLOT_DISABLED },
                    iterations: if i == 0 { 2000 } else { 0 },
                    salt: [if i == 0 { 3 } else { 0 }; SALT_LEN],
                    key_offset: 8 + i * 504,
                    stripes: STRIPES,
                })
                .collect(),
        }
    }

    #[test]
    fn round_trip() {
        let h = qemu_like();
        let mut b = vec![0u8; HEADER_LEN];
        h.write_to(&mut b);
        assert_eq!(&b[..8], b"LUKS\xba\xbe\x00\x01");
        assert_eq!(&b[0x68..0x70], &[0, 0, 0x0f, 0xc8, 0, 0, 0, 0x40]);
        assert_eq!(&b[0xd0..0xd4], &[0, 0xac, 0x71, 0xf3]);
        let p = Header::parse(&b).unwrap();
        assert_eq!(p, h);
        p.validate(p.payload_bytes()).unwrap();
        let mut c = vec![0u8; HEADER_LEN];
        p.write_to(&mut c);
        assert_eq!(b, c);
    }

    fn invalid(f: impl Fn(&mut Header), len: u64) -> String {
        let mut h = qemu_like();
        f(&mut h);
        h.validate(len).unwrap_err().to_string()
    }

    #[test]
    fn each_rule() {
        let len = 4040 * 512;
        assert!(invalid(|h| h.key_bytes = 0, len).contains("key-bytes"));
        assert!(invalid(|h| h.key_bytes = 65, len).contains("key-bytes"));
        assert!(invalid(|h| h.payload_offset = 0, len).contains("overlaps the LUKS header"));
        assert!(invalid(|_| {}, len - 1).contains("past the end"));
        assert!(invalid(|h| h.mk_digest_iter = 0, len).contains("mk-digest-iter"));
        assert!(invalid(|h| h.mk_digest_iter = u32::MAX, len).contains("vimg's bound"));
        assert!(invalid(|h| h.slots[1].active = 7, len).contains("neither enabled"));
        assert!(invalid(|h| h.slots[0].stripes = 4001, len).contains("stripes"));
        assert!(invalid(|h| h.slots[0].key_offset = 0, len).contains("LUKS header"));
        assert!(invalid(|h| h.slots[7].key_offset = 4000, len).contains("payload"));
        assert!(invalid(|h| h.slots[2].key_offset = 9, len).contains("slot 0"));
        assert!(invalid(|h| h.slots[0].iterations = u32::MAX, len).contains("iterations"));
        let many = invalid(
            |h| {
                for s in &mut h.slots {
                    s.active = SLOT_ENABLED;
                    s.iterations = super::MAX_ITERATIONS;
                }
            },
            len,
        );
        assert!(many.contains("every active slot"), "{many}");
    }

    #[test]
    fn parse_rejects() {
        let mut b = vec![0u8; HEADER_LEN];
        qemu_like().write_to(&mut b);
        assert!(matches!(
            Header::parse(&b[..100]),
            Err(LuksError::TooShort { .. })
        ));
        let mut v2 = b.clone();
        v2[7] = 2;
        assert!(matches!(Header::parse(&v2), Err(LuksError::Version(2))));
        let mut bad = b.clone();
        bad[0x08..0x28].fill(b'a');
        assert!(matches!(
            Header::parse(&bad),
            Err(LuksError::BadName { .. })
        ));
        bad = b.clone();
        bad[0] = b'X';
        assert!(matches!(Header::parse(&bad), Err(LuksError::Magic)));
    }
}

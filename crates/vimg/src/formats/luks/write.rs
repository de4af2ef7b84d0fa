//! Creating a LUKS1 volume as `qemu-img create -f luks` does (LUKS1 spec section 2.3,
//! "Initialisation", with QEMU's layout): a random volume key; its PBKDF2 digest with an
//! iteration count of one eighth of `iter-time`; key slot 0 active with the passphrase's
//! PBKDF2 over `iter-time`, the other seven disabled; each slot's 4000-stripe key material
//! in its own 4 KiB-aligned area after the 4 KiB header sector; the payload after the
//! eighth area. A converted volume has every payload sector written encrypted, zeros
//! included, so it reads back as the source on any reader (a hole would decrypt to noise).
//! A volume `create` makes is left as qemu-img leaves it: the payload unwritten (a hole in
//! a new file, reading as the decryption of zeros; no old data can show through, the file
//! is new or a zeroed device), `preallocation=falloc` reserves it, `full` writes plain
//! zeros over it (`metadata` is accepted and means `off`: a LUKS volume has none).
//!
//! Options (`-o`), with qemu-img's defaults: `cipher-alg` (aes-256; aes-128, aes-192),
//! `cipher-mode` (xts; cbc, ecb), `ivgen-alg` (plain64; plain, essiv), `ivgen-hash-alg`
//! (sha256, for essiv), `hash-alg` (sha256; sha1, sha224, sha384, sha512), `iter-time`
//! (2000 ms), `key-secret` (required). `detached-header=on` is refused.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::crypto::{af_split, random, CipherSpec, Hash, IvGen, Mode, SectorCipher, SECTOR};
use super::header::{
    Header, KeySlot, DIGEST_LEN, HEADER_LEN, SALT_LEN, SLOTS, SLOT_DISABLED, SLOT_ENABLED, STRIPES,
};
use crate::error::{Error, Result};
use crate::options::CreateOptions;
use crate::output::{OutFile, Output, OutputMode};
use crate::writer::{EncodedUnit, ImageWriter, WriterCaps};

/// Fewest PBKDF2 iterations QEMU writes for a key slot or the master-key digest.
const MIN_ITERATIONS: u64 = 1000;
/// Sectors before the first key slot (the header, padded to 4 KiB).
const FIRST_SLOT_SECTOR: u32 = 8;
/// Key material areas are aligned to this many sectors (4 KiB).
const SLOT_ALIGN_SECTORS: u32 = 8;

/// `-o preallocation` of a LUKS volume: QEMU's file-protocol modes, and `metadata`,
/// which QEMU's crypto driver takes as `off`.
const PREALLOCATION: crate::formats::Choice = crate::formats::Choice {
    option: "preallocation",
    values: &["off", "metadata", "falloc", "full"],
    default: "off",
    refusal: crate::formats::ChoiceRefusal::InvalidValue,
};

/// What `create` does with a new volume's payload (`-o preallocation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prealloc {
    /// Left unwritten.
    Off,
    /// Reserved (`fallocate`).
    Falloc,
    /// Plain zeros written.
    Full,
}

/// What `-o` asked for.
struct Choice {
    spec: CipherSpec,
    hash: Hash,
    iter_time: u64,
}

/// Reads the LUKS options from `opts`, each under `prefix` (`""` for a luks volume,
/// `"encrypt."` for qcow2).
fn parse_options(opts: &CreateOptions, prefix: &str) -> Result<Choice> {
    let key = |k: &str| format!("{prefix}{k}");
    let get = |k: &str| opts.get_str(&key(k));
    if opts.get_bool(&key("detached-header"), false)? {
        return Err(Error::unsupported(
            "vimg does not create LUKS volumes with a detached header",
        ));
    }
    let aes_key = match get("cipher-alg").unwrap_or("aes-256") {
        "aes-128" => 16,
        "aes-192" => 24,
        "aes-256" => 32,
        other => {
            return Err(Error::invalid_argument(format!(
                "Parameter 'cipher-alg' does not accept value '{other}' (vimg encrypts with aes-128, aes-192 or aes-256)"
            )))
        }
    };
    let mode = Mode::from_name(get("cipher-mode").unwrap_or("xts"))
        .map_err(|e| Error::invalid_argument(e.to_string()))?;
    let ivgen = match get("ivgen-alg").unwrap_or("plain64") {
        "plain" => IvGen::Plain,
        "plain64" => IvGen::Plain64,
        "essiv" => IvGen::Essiv(
            Hash::from_name(get("ivgen-hash-alg").unwrap_or("sha256"))
                .map_err(|e| Error::invalid_argument(e.to_string()))?,
        ),
        other => {
            return Err(Error::invalid_argument(format!(
                "Parameter 'ivgen-alg' does not accept value '{other}'"
            )))
        }
    };
    let hash = Hash::from_name(get("hash-alg").unwrap_or("sha256"))
        .map_err(|e| Error::invalid_argument(e.to_string()))?;
    let key_bytes = if mode == Mode::Xts {
        aes_key * 2
    } else {
        aes_key
    };
    let spec = CipherSpec::new("aes", key_bytes, mode, ivgen)
        .map_err(|e| Error::invalid_argument(e.to_string()))?;
    if !(key_bytes * STRIPES as usize).is_multiple_of(SECTOR) {
        // qemu-img aborts on these (its key material is not whole sectors): a volume no
        // qemu could open is refused rather than written.
        return Err(Error::unsupported(format!(
            "a {}-byte {} key makes key material of {} bytes, not whole sectors; qemu-img cannot create or open such LUKS volumes",
            key_bytes,
            mode.name(),
            key_bytes * STRIPES as usize
        )));
    }
    let iter_time = opts.get_number(&key("iter-time"))?.unwrap_or(2000);
    if iter_time == 0 {
        return Err(Error::invalid_argument("iter-time must be at least 1 ms"));
    }
    Ok(Choice {
        spec,
        hash,
        iter_time,
    })
}

/// Sectors of one key slot's material area for a `key_bytes` key: 4000 stripes, rounded
/// up to 4 KiB.
pub(crate) fn slot_sectors(key_bytes: usize) -> u32 {
    let split_len = key_bytes * STRIPES as usize;
    (split_len.div_ceil(SECTOR) as u32).div_ceil(SLOT_ALIGN_SECTORS) * SLOT_ALIGN_SECTORS
}

/// `measure`: a volume of `size` bytes with `opts` needs its header area (header and eight
/// key slot areas) plus the payload, all of it allocated (every sector is written
/// encrypted).
pub fn measure(size: u64, opts: &CreateOptions) -> Result<crate::formats::Measure> {
    let header = header_area_len(opts, "")?;
    let total = header
        .checked_add(size)
        .ok_or_else(|| Error::invalid_argument("LUKS volume size too large"))?;
    Ok(crate::formats::Measure {
        required: total,
        fully_allocated: total,
        bitmaps: None,
    })
}

/// Bytes of the header area (header and eight key slot areas) a volume made with `opts`
/// (under `prefix`) has; checks the options and that the secret exists.
pub(crate) fn header_area_len(opts: &CreateOptions, prefix: &'static str) -> Result<u64> {
    let c = parse_options(opts, prefix)?;
    super::open::secret_passphrase(opts.get_str(&format!("{prefix}key-secret")), prefix)?;
    Ok(
        u64::from(FIRST_SLOT_SECTOR + slot_sectors(c.spec.key_bytes) * SLOTS as u32)
            * SECTOR as u64,
    )
}

/// A new LUKS1 header area: what [`new_volume`] makes.
pub(crate) struct NewVolume {
    /// The header area (header, key slots, slot 0's key material), `payload` bytes.
    pub head: Zeroizing<Vec<u8>>,
    /// The ranges of `head` that hold anything (the rest is zeros).
    pub used: [(usize, usize); 2],
    /// Where the payload starts: the header area's length.
    pub payload: u64,
    /// The volume key's sector cipher.
    pub cipher: SectorCipher,
}

/// Makes a LUKS1 header area as QEMU does (a random volume key, key slot 0 unlocked by the
/// passphrase of the secret `{prefix}key-secret`), from the options under `prefix`.
pub(crate) fn new_volume(opts: &CreateOptions, prefix: &'static str) -> Result<NewVolume> {
    let c = parse_options(opts, prefix)?;
    let (id, secret) =
        super::open::secret_passphrase(opts.get_str(&format!("{prefix}key-secret")), prefix)?;
    let password = super::open::passphrase(&id, &secret)?;
    let kb = c.spec.key_bytes;

    let mut master = Zeroizing::new(vec![0u8; kb]);
    random(&mut master)?;
    let mut mk_digest_salt = [0u8; SALT_LEN];
    random(&mut mk_digest_salt)?;
    let mk_iter = ((u64::from(iterations_for(c.hash, &master, DIGEST_LEN, c.iter_time))) / 8)
        .max(MIN_ITERATIONS) as u32;
    let mut mk_digest = [0u8; DIGEST_LEN];
    c.hash
        .pbkdf2(&master, &mk_digest_salt, mk_iter, &mut mk_digest);

    let slot_sectors = slot_sectors(kb);
    let mut salt = [0u8; SALT_LEN];
    random(&mut salt)?;
    let slot_iter = iterations_for(c.hash, password, kb, c.iter_time);
    let slots: Vec<KeySlot> = (0..SLOTS as u32)
        .map(|i| KeySlot {
            active: if i == 0 { SLOT_ENABLED } else { SLOT_DISABLED },
            iterations: if i == 0 { slot_iter } else { 0 },
            salt: if i == 0 { salt } else { [0; SALT_LEN] },
            key_offset: FIRST_SLOT_SECTOR + slot_sectors * i,
            stripes: STRIPES,
        })
        .collect();
    let payload_offset = FIRST_SLOT_SECTOR + slot_sectors * SLOTS as u32;
    let header = Header {
        version: 1,
        cipher_name: "aes".into(),
        cipher_mode: c.spec.mode_spec(),
        hash_spec: c.hash.name().into(),
        payload_offset,
        key_bytes: kb as u32,
        mk_digest,
        mk_digest_salt,
        mk_digest_iter: mk_iter,
        uuid: {
            let mut u = [0u8; super::header::UUID_LEN];
            let t = uuid::Uuid::new_v4().hyphenated().to_string();
            u[..t.len()].copy_from_slice(t.as_bytes());
            u
        },
        slots,
    };
    let payload = header.payload_bytes();

    // Header, key slots and slot 0's material, in one buffer.
    let mut head = Zeroizing::new(vec![0u8; payload as usize]);
    header.write_to(&mut head[..HEADER_LEN]);
    let mut slot_key = Zeroizing::new(vec![0u8; kb]);
    c.hash.pbkdf2(password, &salt, slot_iter, &mut slot_key);
    let mut split = af_split(c.hash, &master, STRIPES as usize)?;
    SectorCipher::new(c.spec, &slot_key).apply(0, &mut split, true);
    let at = FIRST_SLOT_SECTOR as usize * SECTOR;
    head[at..at + split.len()].copy_from_slice(&split);
    Ok(NewVolume {
        head,
        used: [(0, HEADER_LEN), (at, at + split.len())],
        payload,
        cipher: SectorCipher::new(c.spec, &master),
    })
}

/// PBKDF2 iterations `hash` runs in `ms` milliseconds here (QEMU's
/// `qcrypto_pbkdf2_count_iters`, with a shorter measurement for short `iter-time`s), at
/// least [`MIN_ITERATIONS`] and at most the bound vimg reads ([`super::header::MAX_ITERATIONS`]).
pub(crate) fn iterations_for(hash: Hash, key: &[u8], out_len: usize, ms: u64) -> u32 {
    let probe = Duration::from_millis((ms / 4).clamp(5, 250));
    let salt = [0u8; SALT_LEN];
    let mut out = Zeroizing::new(vec![0u8; out_len]);
    let mut n: u64 = 0;
    let mut batch: u32 = 1 << 10;
    let start = Instant::now();
    while start.elapsed() < probe {
        hash.pbkdf2(key, &salt, batch, &mut out);
        n += u64::from(batch);
        batch = batch.saturating_mul(2).min(1 << 20);
    }
    let elapsed = start.elapsed().as_micros().max(1) as u64;
    let iters = n.saturating_mul(ms).saturating_mul(1000) / elapsed;
    iters.clamp(MIN_ITERATIONS, u64::from(super::header::MAX_ITERATIONS)) as u32
}

/// Writes a LUKS1 volume.
pub struct LuksWriter {
    file: OutFile,
    payload: u64,
    size: u64,
    cipher: SectorCipher,
    /// Guest ranges written, merged: start -> end.
    written: Mutex<BTreeMap<u64, u64>>,
    /// Streams: the next guest offset expected (gaps are filled in order).
    next: Mutex<u64>,
    /// `-o preallocation`, for [`ImageWriter::finish_new`].
    prealloc: Prealloc,
}

impl LuksWriter {
    /// Creates a volume of `size` bytes in `out`.
    pub fn create(out: &Output, size: u64, opts: &CreateOptions) -> Result<LuksWriter> {
        if opts.compress {
            return Err(Error::invalid_argument(
                "Compression not supported for this file format",
            ));
        }
        if out.mode() == OutputMode::InPlace {
            return Err(Error::unsupported(
                "vimg does not write into an existing LUKS volume (-n)",
            ));
        }
        if !size.is_multiple_of(SECTOR as u64) {
            return Err(Error::invalid_argument(format!(
                "LUKS volume size {size} is not a multiple of 512 bytes (vimg writes whole encrypted sectors)"
            )));
        }
        let prealloc = match PREALLOCATION.value(opts)? {
            "falloc" => Prealloc::Falloc,
            "full" => Prealloc::Full,
            _ => Prealloc::Off,
        };
        let NewVolume {
            head,
            used,
            payload,
            cipher,
        } = new_volume(opts, "")?;
        let file = out.create_main()?;
        let total = payload
            .checked_add(size)
            .ok_or_else(|| Error::invalid_argument("LUKS volume size too large"))?;
        if !file.is_stream() {
            file.set_len(total)?;
        }
        if file.is_stream() {
            file.write_all_at(&head, 0)?;
        } else {
            // The gaps stay holes, as qemu-img leaves them.
            for (s, e) in used {
                file.write_all_at(&head[s..e], s as u64)?;
            }
        }
        Ok(LuksWriter {
            file,
            payload,
            size,
            cipher,
            written: Mutex::new(BTreeMap::new()),
            next: Mutex::new(0),
            prealloc,
        })
    }

    fn put(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut buf = data.to_vec();
        self.cipher.apply(offset / SECTOR as u64, &mut buf, true);
        self.file.write_all_at(&buf, self.payload + offset)
    }

    fn put_zeros(&self, mut offset: u64, end: u64) -> Result<()> {
        let chunk = vec![0u8; 1 << 20];
        while offset < end {
            let n = (end - offset).min(chunk.len() as u64) as usize;
            self.put(offset, &chunk[..n])?;
            offset += n as u64;
        }
        Ok(())
    }

    fn record(&self, start: u64, end: u64) {
        let mut w = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let (mut s, mut e) = (start, end);
        if let Some((&ps, &pe)) = w.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
            }
        }
        let after: Vec<(u64, u64)> = w.range(s..=e).map(|(a, b)| (*a, *b)).collect();
        for (a, b) in after {
            w.remove(&a);
            e = e.max(b);
        }
        w.insert(s, e);
    }
}

impl ImageWriter for LuksWriter {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            unit: SECTOR as u64,
            ordered: self.file.is_stream(),
            encodes: false,
        }
    }

    fn allocate(&self, _offset: u64, _len: u64) -> Result<bool> {
        Ok(!self.file.is_stream())
    }

    fn write(&self, offset: u64, data: &[u8], _encoded: &[EncodedUnit]) -> Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| {
                *e <= self.size
                    && offset.is_multiple_of(SECTOR as u64)
                    && data.len().is_multiple_of(SECTOR)
            })
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "write of {} bytes at {offset:#x} is not whole sectors inside the LUKS volume",
                    data.len()
                ))
            })?;
        if self.file.is_stream() {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            if offset > *next {
                self.put_zeros(*next, offset)?;
            }
            self.put(offset, data)?;
            *next = (*next).max(end);
            return Ok(());
        }
        self.put(offset, data)?;
        self.record(offset, end);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.saturating_add(len).min(self.size);
        let mut pos = offset;
        let chunk = vec![0u8; 1 << 20];
        while pos < end {
            let n = (end - pos).min(chunk.len() as u64) as usize;
            self.write(pos, &chunk[..n], &[])?;
            pos += n as u64;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        if self.file.is_stream() {
            let next = *self.next.lock().unwrap_or_else(|e| e.into_inner());
            return self.put_zeros(next, self.size);
        }
        let w = std::mem::take(&mut *self.written.lock().unwrap_or_else(|e| e.into_inner()));
        let mut pos = 0;
        for (s, e) in w {
            if s > pos {
                self.put_zeros(pos, s)?;
            }
            pos = pos.max(e);
        }
        self.put_zeros(pos, self.size)
    }

    fn finish_new(self: Box<Self>) -> Result<()> {
        let written = !self
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if self.file.is_stream() || written {
            return self.finish();
        }
        // The payload stays as the new file (or zeroed device) has it, as qemu-img leaves it.
        match self.prealloc {
            Prealloc::Off => Ok(()),
            Prealloc::Falloc if self.size > 0 => self.file.allocate(self.payload, self.size),
            Prealloc::Falloc => Ok(()),
            Prealloc::Full => {
                let zeros = vec![0u8; 1 << 20];
                let mut pos = 0;
                while pos < self.size {
                    let n = (self.size - pos).min(zeros.len() as u64) as usize;
                    self.file.write_all_at(&zeros[..n], self.payload + pos)?;
                    pos += n as u64;
                }
                Ok(())
            }
        }
    }
}

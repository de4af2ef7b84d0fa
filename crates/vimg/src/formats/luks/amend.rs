//! Key slot management in place: `qemu-img amend -o state=active|inactive,...` on a LUKS1
//! volume, or with the `encrypt.` prefix on the LUKS header inside a qcow2 image (LUKS1 On-Disk
//! Format Specification 1.2.3, section 2.4 "key slot" and section 2.6 "Key revocation"), with
//! QEMU's rules and words (its `qcrypto_block_luks_amend_options`):
//!
//! - `state=active`: `new-secret` is stored in `keyslot` (or the first inactive slot), unlocked
//!   by the volume key that the image's own `key-secret` opens; an active slot is only
//!   overwritten with `--force`. `iter-time` (ms, default 2000) sizes the slot's PBKDF2.
//! - `state=inactive`: erases `keyslot`, or every slot `old-secret` opens; erasing the last
//!   active slot (which loses the data for good) needs `--force`.
//!
//! # Crash safety
//! A slot turns on and off through its 4-byte `active` word alone, written by itself (an
//! aligned 4-byte write never tears), with a flush on each side:
//! - adding: the encrypted key material first, flushed; then the slot's iterations and salt
//!   with the slot still disabled, flushed; then `active` = enabled, flushed. A crash leaves
//!   the slot either disabled or complete. (QEMU writes the material, then the whole header;
//!   the result on disk is the same. Overwriting an active slot with `--force` disables it
//!   first, so a crash never leaves an enabled slot over half-written material.)
//! - erasing: `active` = disabled first, flushed; then the iterations and salt cleared; then
//!   the key material overwritten with random bytes 40 times, as QEMU does, and flushed. A
//!   crash leaves the slot enabled and intact, or disabled.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::crypto::{af_split, random, SectorCipher, SECTOR};
use super::error::LuksError;
use super::header::{
    HEADER_LEN, SALT_LEN, SLOTS, SLOT_AT, SLOT_DISABLED, SLOT_ENABLED, SLOT_LEN, STRIPES,
};
use super::open::{passphrase, secret_passphrase, try_slot, unlock};
use super::read::Parsed;
use crate::error::{Error, Result};
use crate::formats::qcow2::update::CrashHook;
use crate::storage::{FileStorage, SliceStorage, Storage};

/// qemu-img's default PBKDF2 time for a new key slot, in milliseconds.
const DEFAULT_ITER_TIME: u64 = 2000;
/// Passes of random bytes over an erased slot's key material (QEMU's count).
const ERASE_PASSES: usize = 40;

/// `state=`: what the amended key slots become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyslotState {
    /// Add a passphrase.
    Active,
    /// Erase passphrases.
    Inactive,
}

/// The key slot options of `qemu-img amend` (`state`, `new-secret`, `old-secret`, `keyslot`,
/// `iter-time`), without their prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyslotAmend {
    /// `state`: required.
    pub state: Option<KeyslotState>,
    /// `new-secret`: the secret id of the passphrase to add.
    pub new_secret: Option<String>,
    /// `old-secret`: the secret id of the passphrase whose slots are erased.
    pub old_secret: Option<String>,
    /// `keyslot`: the slot to add to or erase.
    pub keyslot: Option<i64>,
    /// `iter-time`: milliseconds of PBKDF2 for a new slot.
    pub iter_time: Option<u64>,
}

/// The option names [`KeyslotAmend::set`] takes (without prefix).
pub const AMEND_OPTIONS: &[&str] = &["state", "new-secret", "old-secret", "keyslot", "iter-time"];

/// A number as QEMU's option parser reads it (`strtoull` after blanks: decimal, `0x` hex,
/// leading `0` octal; a leading `-` wraps around as strtoull does).
fn number(prefix: &str, key: &str, v: &str) -> Result<u64> {
    let t = v.trim_start();
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let parsed = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8)
    } else {
        t.parse::<u64>()
    };
    let n = parsed.map_err(|_| {
        Error::invalid_argument(format!("Parameter '{prefix}{key}' expects a number"))
    })?;
    Ok(if neg { n.wrapping_neg() } else { n })
}

impl KeyslotAmend {
    /// Takes option `key` (already stripped of `prefix`) with `value`; `Ok(false)` for an
    /// option that is not a key slot option.
    pub fn set(&mut self, prefix: &str, key: &str, value: &str) -> Result<bool> {
        match key {
            "state" => {
                self.state = Some(match value {
                    "active" => KeyslotState::Active,
                    "inactive" => KeyslotState::Inactive,
                    _ => {
                        return Err(Error::invalid_argument(format!(
                            "Parameter '{prefix}state' does not accept value '{value}'"
                        )))
                    }
                })
            }
            "new-secret" => self.new_secret = Some(value.to_string()),
            "old-secret" => self.old_secret = Some(value.to_string()),
            "keyslot" => {
                // QAPI's int: the 64 bits as a signed number (`-1` stays -1).
                self.keyslot = Some(number(prefix, key, value)? as i64)
            }
            "iter-time" => self.iter_time = Some(number(prefix, key, value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// True when no key slot option was given.
    pub fn is_empty(&self) -> bool {
        *self == KeyslotAmend::default()
    }
}

fn refuse(msg: impl Into<String>) -> Error {
    Error::invalid_argument(msg)
}

/// A LUKS1 header area open for key slot changes: the volume key unlocked with the image's
/// `key-secret`, as qemu-img's open does before it amends.
pub struct KeyslotEditor {
    file: File,
    /// Where the header area starts in the file (0 for a luks volume).
    base: u64,
    /// The header area as a storage (for unlocking slots).
    window: Arc<dyn Storage>,
    parsed: Parsed,
    master: Zeroizing<Vec<u8>>,
    /// The kill-at-any-point tests' hook (before each write).
    hook: CrashHook,
}

impl std::fmt::Debug for KeyslotEditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("KeyslotEditor")
            .field("base", &self.base)
            .finish()
    }
}

impl KeyslotEditor {
    /// Opens the LUKS header area `[base, base + len)` of `path` (`len` `None`: to the end of
    /// the file) for writing and unlocks it with the secret `key_secret`. `prefix` is the
    /// option prefix qemu names in its messages (`encrypt.` for qcow2).
    pub fn open(
        path: &Path,
        base: u64,
        len: Option<u64>,
        key_secret: Option<&str>,
        prefix: &'static str,
    ) -> Result<KeyslotEditor> {
        let (id, secret) = secret_passphrase(key_secret, prefix)?;
        let pw = passphrase(&id, &secret)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open for writing", e))?;
        let whole: Arc<dyn Storage> = Arc::new(
            FileStorage::from_file(
                file.try_clone()
                    .map_err(|e| Error::io("open for writing", e))?,
                path,
            )
            .map_err(|e| Error::io("open", e))?,
        );
        let len = len.unwrap_or_else(|| whole.len().saturating_sub(base));
        let window: Arc<dyn Storage> = Arc::new(
            SliceStorage::new(whole, base, len, "LUKS header").map_err(|_| {
                Error::corrupt(format!(
                    "LUKS header area {base:#x}+{len:#x} lies past the end of the file"
                ))
            })?,
        );
        let parsed = Parsed::read(&*window)?;
        let master = unlock(&parsed.header, parsed.spec, parsed.hash, &*window, pw)?;
        Ok(KeyslotEditor {
            file,
            base,
            window,
            parsed,
            master,
            hook: CrashHook::from_env(),
        })
    }

    /// Slots that are active now.
    pub fn active_slots(&self) -> Vec<usize> {
        (0..SLOTS)
            .filter(|i| self.parsed.header.slots[*i].is_active())
            .collect()
    }

    /// Applies `a` (QEMU's rules; `force` is `--force`).
    pub fn amend(&mut self, a: &KeyslotAmend, force: bool) -> Result<()> {
        match a.state {
            None => Err(refuse("Parameter 'state' is missing")),
            Some(KeyslotState::Active) => self.add(a, force),
            Some(KeyslotState::Inactive) => self.erase(a, force),
        }
    }

    fn add(&mut self, a: &KeyslotAmend, force: bool) -> Result<()> {
        let Some(new_secret) = &a.new_secret else {
            return Err(refuse("'new-secret' is required to activate a keyslot"));
        };
        if a.old_secret.is_some() {
            return Err(refuse(
                "'old-secret' must not be given when activating keyslots",
            ));
        }
        // QEMU keeps the slot in a C int (the 64-bit option truncated).
        let slot = match a.keyslot.map(|k| k as i32) {
            // QEMU prints the slot as an unsigned int here.
            Some(k) if !(0..SLOTS as i32).contains(&k) => {
                return Err(refuse(format!(
                    "Invalid keyslot {} specified, must be between 0 and {}",
                    k as u32,
                    SLOTS - 1
                )))
            }
            Some(k) => k as usize,
            None => (0..SLOTS)
                .find(|i| !self.parsed.header.slots[*i].is_active())
                .ok_or_else(|| refuse("Can't add a keyslot - all keyslots are in use"))?,
        };
        if !force && self.parsed.header.slots[slot].is_active() {
            return Err(refuse(format!(
                "Refusing to overwrite active keyslot {slot} - please erase it first"
            )));
        }
        let s = crate::secret::lookup(new_secret)
            .ok_or_else(|| LuksError::UnknownSecret(new_secret.clone()))?;
        let pw = passphrase(new_secret, &s)?;
        self.store_key(slot, pw, a.iter_time.unwrap_or(DEFAULT_ITER_TIME))
    }

    fn erase(&mut self, a: &KeyslotAmend, force: bool) -> Result<()> {
        if a.new_secret.is_some() {
            return Err(refuse(
                "'new-secret' must not be given when erasing keyslots",
            ));
        }
        if a.iter_time.is_some() {
            return Err(refuse(
                "'iter-time' must not be given when erasing keyslots",
            ));
        }
        let old = match &a.old_secret {
            Some(id) => {
                let s = crate::secret::lookup(id)
                    .ok_or_else(|| LuksError::UnknownSecret(id.clone()))?;
                passphrase(id, &s)?;
                Some((id.clone(), s))
            }
            None => None,
        };
        let opens = |ed: &Self, i: usize| -> Result<bool> {
            let Some((id, s)) = &old else {
                return Ok(false);
            };
            let pw = passphrase(id, s)?;
            let p = &ed.parsed;
            Ok(try_slot(&p.header, p.spec, p.hash, &*ed.window, i, pw)?.is_some())
        };
        let active = self.active_slots().len();
        if let Some(k) = a.keyslot.map(|k| k as i32) {
            if !(0..SLOTS as i32).contains(&k) {
                // ... and as a signed int here.
                return Err(refuse(format!(
                    "Invalid keyslot {} specified, must be between 0 and {}",
                    k,
                    SLOTS - 1
                )));
            }
            let k = k as usize;
            if old.is_some() && !opens(self, k)? {
                return Err(refuse(format!(
                    "Given keyslot {k} doesn't contain the given old password for erase operation"
                )));
            }
            let is_active = self.parsed.header.slots[k].is_active();
            if !force && !is_active {
                return Err(refuse(format!(
                    "Given keyslot {k} is already erased (inactive) "
                )));
            }
            if !force && is_active && active == 1 {
                return Err(refuse(format!(
                    "Attempt to erase the only active keyslot {k} which will erase all the data in the image irreversibly - refusing operation"
                )));
            }
            return self.erase_key(k);
        }
        if old.is_none() {
            return Err(refuse(
                "To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given",
            ));
        }
        let mut matching = Vec::new();
        for i in 0..SLOTS {
            if opens(self, i)? {
                matching.push(i);
            }
        }
        if matching.is_empty() {
            return Err(refuse(
                "No keyslots match given (old) password for erase operation",
            ));
        }
        if !force && matching.len() == active {
            return Err(refuse(
                "All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation",
            ));
        }
        for i in matching {
            self.erase_key(i)?;
        }
        Ok(())
    }

    fn write(&mut self, buf: &[u8], at: u64, what: &str) -> Result<()> {
        self.hook.point();
        self.file
            .write_all_at(buf, self.base + at)
            .map_err(|e| Error::io(format_args!("write {what} at {:#x}", self.base + at), e))
    }

    fn flush(&mut self) -> Result<()> {
        self.hook.point();
        self.file
            .sync_data()
            .map_err(|e| Error::io("flush the LUKS header", e))
    }

    /// The on-disk bytes of key slot `i` as the in-memory header has it.
    fn slot_bytes(&self, i: usize) -> [u8; SLOT_LEN] {
        let mut b = [0u8; HEADER_LEN];
        self.parsed.header.write_to(&mut b);
        let at = SLOT_AT + i * SLOT_LEN;
        let mut out = [0u8; SLOT_LEN];
        out.copy_from_slice(&b[at..at + SLOT_LEN]);
        out
    }

    fn set_active(&mut self, i: usize, active: u32) -> Result<()> {
        self.parsed.header.slots[i].active = active;
        self.write(
            &active.to_be_bytes(),
            (SLOT_AT + i * SLOT_LEN) as u64,
            &format!("key slot {i}'s state"),
        )?;
        self.flush()
    }

    /// Writes the slot's fields after `active` (iterations, salt, key offset, stripes).
    fn write_slot_fields(&mut self, i: usize) -> Result<()> {
        let b = self.slot_bytes(i);
        self.write(
            &b[4..],
            (SLOT_AT + i * SLOT_LEN + 4) as u64,
            &format!("key slot {i}"),
        )?;
        self.flush()
    }

    /// QEMU's `qcrypto_block_luks_store_key`: `password` in slot `i`, PBKDF2 sized by
    /// `iter_time` ms.
    fn store_key(&mut self, i: usize, password: &[u8], iter_time: u64) -> Result<()> {
        let (spec, hash) = (self.parsed.spec, self.parsed.hash);
        let kb = spec.key_bytes;
        let split_len = kb * STRIPES as usize;
        if !split_len.is_multiple_of(SECTOR) {
            return Err(Error::unsupported(format!(
                "a {kb}-byte key makes key material of {split_len} bytes, not whole sectors; qemu-img cannot write such key slots"
            )));
        }
        if iter_time == 0 {
            return Err(refuse("iter-time must be at least 1 ms"));
        }
        let mut salt = [0u8; SALT_LEN];
        random(&mut salt)?;
        let iterations = super::write::iterations_for(hash, password, kb, iter_time);
        let mut slot_key = Zeroizing::new(vec![0u8; kb]);
        hash.pbkdf2(password, &salt, iterations, &mut slot_key);
        let mut split = af_split(hash, &self.master, STRIPES as usize)?;
        SectorCipher::new(spec, &slot_key).apply(0, &mut split, true);

        if self.parsed.header.slots[i].is_active() {
            // --force over an active slot: off first, so no crash leaves it enabled over
            // half-written material.
            self.set_active(i, SLOT_DISABLED)?;
        }
        let at = u64::from(self.parsed.header.slots[i].key_offset) * SECTOR as u64;
        self.write(&split, at, &format!("key slot {i}'s key material"))?;
        self.flush()?;
        let slot = &mut self.parsed.header.slots[i];
        slot.iterations = iterations;
        slot.salt = salt;
        slot.stripes = STRIPES;
        self.write_slot_fields(i)?;
        self.set_active(i, SLOT_ENABLED)
    }

    /// QEMU's `qcrypto_block_luks_erase_key`: slot `i` disabled, then its key material
    /// overwritten.
    fn erase_key(&mut self, i: usize) -> Result<()> {
        self.set_active(i, SLOT_DISABLED)?;
        let slot = &mut self.parsed.header.slots[i];
        slot.iterations = 0;
        slot.salt = [0; SALT_LEN];
        self.write_slot_fields(i)?;
        let len = self.parsed.spec.key_bytes * STRIPES as usize;
        let at = u64::from(self.parsed.header.slots[i].key_offset) * SECTOR as u64;
        let mut garbage = vec![0u8; len];
        for _ in 0..ERASE_PASSES {
            random(&mut garbage)?;
            self.write(&garbage, at, &format!("key slot {i}'s key material"))?;
        }
        self.flush()
    }
}

/// Where the LUKS header inside the qcow2 image `path` lies (crypt_method 2, full disk
/// encryption header pointer extension), for [`KeyslotEditor::open`] with the `encrypt.`
/// prefix; qemu-img's refusals for a qcow2 image without encryption or with legacy AES.
pub fn qcow2_header_area(path: &Path) -> Result<(u64, u64)> {
    let st = FileStorage::open(path).map_err(|e| Error::io("open", e))?;
    let mut head = vec![0u8; st.len().min(4096) as usize];
    st.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io("read the qcow2 header", e))?;
    let h = crate::formats::qcow2::header::Header::parse(&head)?;
    match h.crypt_method {
        0 => {
            return Err(refuse(
                "Can't amend encryption options - encryption not present",
            ))
        }
        super::qcow2::CRYPT_LUKS => {}
        _ => {
            return Err(Error::unsupported(
                "Only LUKS encryption options can be amended",
            ))
        }
    }
    super::qcow2::luks_header_location(&st)?
        .ok_or_else(|| Error::invalid("Missing CRYPTO header for crypt method 2"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1 MiB volume as vimg creates it (key slot 0: secret `t0`), written with std::fs.
    fn volume(dir: &Path, t0: &str) -> std::path::PathBuf {
        let mut o = crate::options::CreateOptions::new();
        o.parse_into(&format!("key-secret={t0},iter-time=1"))
            .unwrap();
        let v = super::super::write::new_volume(&o, "").unwrap();
        let path = dir.join("v.luks");
        let mut bytes = v.head.to_vec();
        bytes.resize(v.payload as usize + (1 << 20), 0);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn opens(path: &Path, id: &str) -> bool {
        KeyslotEditor::open(path, 0, None, Some(id), "").is_ok()
    }

    #[test]
    fn add_write_erase_round_trip() {
        crate::secret::define("amend-t0", b"pass zero");
        crate::secret::define("amend-t1", b"pass one");
        crate::secret::define("amend-t2", b"pass two");
        let dir = tempfile::tempdir().unwrap();
        let path = volume(dir.path(), "amend-t0");
        let add = |slot: Option<i64>, new: &str| KeyslotAmend {
            state: Some(KeyslotState::Active),
            new_secret: Some(new.into()),
            iter_time: Some(1),
            keyslot: slot,
            ..KeyslotAmend::default()
        };
        let mut ed = KeyslotEditor::open(&path, 0, None, Some("amend-t0"), "").unwrap();
        ed.amend(&add(None, "amend-t1"), false).unwrap();
        ed.amend(&add(Some(5), "amend-t2"), false).unwrap();
        assert_eq!(ed.active_slots(), [0, 1, 5]);
        let e = ed.amend(&add(Some(5), "amend-t1"), false).unwrap_err();
        assert!(e
            .to_string()
            .contains("Refusing to overwrite active keyslot 5"));
        drop(ed);
        assert!(opens(&path, "amend-t1") && opens(&path, "amend-t2"));

        // Data written with the volume key reads back through the reader with any key.
        let up = super::super::update::LuksUpdate::open(&path, Some("amend-t2")).unwrap();
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        up.write_at(8192, &data).unwrap();
        up.flush().unwrap();
        drop(up);
        let st: Arc<dyn Storage> = Arc::new(FileStorage::open(&path).unwrap());
        let r = super::super::read::LuksReader::open(st, Some(b"pass one")).unwrap();
        let mut back = vec![0u8; 4096];
        crate::mapping::ImageReader::file(&r, crate::mapping::FileId(1))
            .unwrap()
            .read_exact_at(&mut back, 8192)
            .unwrap();
        assert_eq!(back, data);

        // Erasing by passphrase wipes the material; the last slot needs force.
        let slot0_at = {
            let p = Parsed::read(&FileStorage::open(&path).unwrap()).unwrap();
            u64::from(p.header.slots[0].key_offset) * SECTOR as u64
        };
        let before = std::fs::read(&path).unwrap();
        let mut ed = KeyslotEditor::open(&path, 0, None, Some("amend-t1"), "").unwrap();
        let erase = |old: Option<&str>, slot: Option<i64>| KeyslotAmend {
            state: Some(KeyslotState::Inactive),
            old_secret: old.map(String::from),
            keyslot: slot,
            ..KeyslotAmend::default()
        };
        ed.amend(&erase(Some("amend-t0"), None), false).unwrap();
        ed.amend(&erase(None, Some(5)), false).unwrap();
        assert_eq!(ed.active_slots(), [1]);
        let e = ed.amend(&erase(Some("amend-t1"), None), false).unwrap_err();
        assert!(e.to_string().contains("All the active keyslots match"));
        let e = ed.amend(&erase(None, Some(1)), false).unwrap_err();
        assert!(e.to_string().contains("only active keyslot 1"));
        drop(ed);
        let after = std::fs::read(&path).unwrap();
        let a = slot0_at as usize;
        assert_ne!(before[a..a + 4096], after[a..a + 4096]);
        assert!(!opens(&path, "amend-t0") && !opens(&path, "amend-t2"));
        assert!(opens(&path, "amend-t1"));

        let mut up = super::super::update::LuksUpdate::open(&path, Some("amend-t1")).unwrap();
        up.resize(2 << 20, crate::formats::qcow2::Prealloc::Off)
            .unwrap();
        assert!(up
            .resize(1000, crate::formats::qcow2::Prealloc::Off)
            .is_err());
        assert_eq!(up.virtual_size(), 2 << 20);
    }

    #[test]
    fn options_parse() {
        let mut a = KeyslotAmend::default();
        assert!(a.is_empty());
        assert!(a.set("", "state", "active").unwrap());
        assert!(a.set("", "keyslot", "3").unwrap());
        assert!(a.set("", "iter-time", "0x10").unwrap());
        assert!(!a.set("", "cipher-alg", "aes").unwrap());
        assert_eq!(a.state, Some(KeyslotState::Active));
        assert_eq!(a.keyslot, Some(3));
        assert_eq!(a.iter_time, Some(16));
        assert!(a
            .set("encrypt.", "state", "on")
            .unwrap_err()
            .to_string()
            .contains("encrypt.state"));
        assert!(a.set("", "keyslot", "x").is_err());
    }
}

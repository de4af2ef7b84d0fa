//! Secrets the user defined (qemu-img's `--object secret,id=...`), looked up by id when an
//! image names one (`key-secret=sec0`, `encrypt.key-secret=sec0`).
//!
//! Like QEMU's object tree, the store is per process: the command line defines secrets once
//! at start, and any image opened or created later may name them. Values are wiped when the
//! process forgets them and are never printed.

use std::sync::{Arc, RwLock};

use zeroize::Zeroizing;

type Entry = (String, Arc<Zeroizing<Vec<u8>>>);

static SECRETS: RwLock<Vec<Entry>> = RwLock::new(Vec::new());

/// Defines (or replaces) the secret `id`.
pub fn define(id: &str, data: &[u8]) {
    let v = Arc::new(Zeroizing::new(data.to_vec()));
    let mut s = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    s.retain(|(k, _)| k != id);
    s.push((id.to_string(), v));
}

/// Forgets every secret.
pub fn clear() {
    SECRETS.write().unwrap_or_else(|e| e.into_inner()).clear();
}

/// The secret defined as `id`.
pub fn lookup(id: &str) -> Option<Arc<Zeroizing<Vec<u8>>>> {
    SECRETS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(k, _)| k == id)
        .map(|(_, v)| v.clone())
}

/// Files the user's command line opens with a key: (device, inode) and the secret id
/// (`encrypt.key-secret`, `key-secret`, `backing.encrypt.key-secret` in `--image-opts`
/// or `json:` names). Bound by file identity, so that every open of the same file in the
/// same command (the image read, its backing chain, the updater that writes it) finds the
/// key the user gave for it, however its name is spelled.
static FILE_KEYS: RwLock<Vec<((u64, u64), String)>> = RwLock::new(Vec::new());

/// Binds secret `id` to the file at `path` (the user named both); a file that cannot be
/// read is left alone (its open reports it).
pub fn bind_file(path: &std::path::Path, id: &str) {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(path) else {
        return;
    };
    let key = (m.dev(), m.ino());
    let mut s = FILE_KEYS.write().unwrap_or_else(|e| e.into_inner());
    s.retain(|(k, _)| *k != key);
    s.push((key, id.to_string()));
}

/// The secret id the user bound to the file with this (device, inode).
pub fn file_key(identity: (u64, u64)) -> Option<String> {
    FILE_KEYS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(k, _)| *k == identity)
        .map(|(_, v)| v.clone())
}

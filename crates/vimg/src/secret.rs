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

//! External data files the user names on the command line: qcow2's `data-file.filename`
//! in `--image-opts` or `json:` names (QEMU's `data-file` child of the qcow2 node).
//!
//! The user's name replaces the one the image stores (qemu-img opens the given file and
//! still shows the stored name), and is how an image whose header names no data file, or
//! one that does not exist here, is opened at all (iotest 061). Like the secrets a command
//! line binds ([`crate::secret::bind_file`]), the binding is by the image file's identity
//! (device, inode), so every open of that image in the same command (the read, the check,
//! the updater) finds it however the image's name is spelled. Only the command line binds
//! names here; a name read from an image never does.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

static BOUND: RwLock<Vec<((u64, u64), PathBuf)>> = RwLock::new(Vec::new());

/// Binds `data_file` as the external data file of the image at `image`; an image that
/// cannot be read is left alone (its open reports it).
pub fn bind(image: &Path, data_file: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(image) else {
        return;
    };
    let key = (m.dev(), m.ino());
    let mut b = BOUND.write().unwrap_or_else(|e| e.into_inner());
    b.retain(|(k, _)| *k != key);
    b.push((key, data_file.to_path_buf()));
}

/// The data file the user bound to the image with this (device, inode).
pub fn lookup(identity: (u64, u64)) -> Option<PathBuf> {
    BOUND
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(k, _)| *k == identity)
        .map(|(_, v)| v.clone())
}

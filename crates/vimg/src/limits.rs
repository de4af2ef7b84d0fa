//! Limits on what an image's metadata may make vimg allocate or loop over. Every size,
//! count and offset read from disk is checked against these (or a tighter format-specific
//! limit) before it sizes an allocation or a loop. QEMU's own limits are the floor: an image
//! QEMU opens, vimg opens too.

/// Largest single metadata table read whole into memory (qcow2 L1 and refcount tables,
/// VMDK grain directories, VHD/VHDX BATs, VDI block maps). QEMU caps the qcow2 L1 at 32 MiB.
pub const MAX_TABLE_BYTES: u64 = 32 << 20;

/// Total metadata memory an opened image may hold (tables kept resident plus caches).
pub const MAX_METADATA_BYTES: u64 = 256 << 20;

/// Largest virtual disk vimg accepts (qemu's limit for most formats is lower; qcow2 allows
/// 2^61 - 1 bytes but nothing real comes close to 2^56).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;

/// Bytes of table-entry cache (qcow2 L2, VMDK grain tables) per open image. Memory must not
/// grow with image size.
pub const TABLE_CACHE_BYTES: u64 = 16 << 20;

/// Returns `Ok(n)` when `n` bytes of metadata fit [`MAX_TABLE_BYTES`], else an error that
/// names `what`.
pub fn check_table_bytes(what: &str, n: u64) -> crate::Result<usize> {
    if n > MAX_TABLE_BYTES {
        return Err(crate::Error::unsupported(format!(
            "{what} is too large ({n} bytes; the limit is {MAX_TABLE_BYTES})"
        )));
    }
    usize::try_from(n).map_err(|_| crate::Error::unsupported(format!("{what} is too large")))
}

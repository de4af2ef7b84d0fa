//! Everything that can be wrong with a LUKS volume or its secret, each variant carrying the
//! offending value and where it was found. The secret's own bytes never appear in a message.

use crate::error::{ErrorKind, FormatError};

/// A LUKS-specific error.
#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    /// The file is shorter than the LUKS1 partition header.
    #[error("file is {len} bytes, too short for a LUKS header ({need} bytes)")]
    TooShort {
        /// File length.
        len: u64,
        /// Bytes the header needs.
        need: u64,
    },
    /// Not a LUKS header at all.
    #[error("Volume is not in LUKS format")]
    Magic,
    /// A LUKS version vimg does not read.
    #[error("LUKS version {0} is not supported by vimg (QEMU reads LUKS version 1 only)")]
    Version(u16),
    /// A text field that is not a NUL-terminated ASCII name.
    #[error("LUKS header: {field} at {at:#x} is not a NUL-terminated name")]
    BadName {
        /// The field.
        field: &'static str,
        /// Its offset.
        at: u64,
    },
    /// A cipher, mode, IV generator or hash qemu-img (or vimg) does not provide.
    #[error("{what} '{name}' is not supported")]
    Algorithm {
        /// What kind of algorithm (`Cipher`, `Cipher mode`, `IV generator`, `Hash`).
        what: &'static str,
        /// As spelled in the header or the options (escaped).
        name: String,
    },
    /// A numeric header field out of range.
    #[error("LUKS header: {field} at {at:#x} is {value:#x}: {why}")]
    Field {
        /// The field.
        field: String,
        /// Its offset in the header.
        at: u64,
        /// Its value.
        value: u64,
        /// What is wrong.
        why: String,
    },
    /// A key slot's material overlaps the header, another slot or the payload, or lies
    /// past the end of the file.
    #[error("LUKS key slot {slot}: key material {start:#x}..{end:#x} {why}")]
    SlotPlacement {
        /// Slot index.
        slot: usize,
        /// First byte of the key material.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// What it collides with.
        why: String,
    },
    /// No key-secret was given for an operation that decrypts or encrypts.
    #[error("Parameter '{prefix}key-secret' is required for cipher")]
    NoSecret {
        /// `encrypt.` for qcow2, empty for luks.
        prefix: &'static str,
    },
    /// The key-secret names no `--object secret`.
    #[error("No secret with id '{0}'")]
    UnknownSecret(String),
    /// The secret is not UTF-8 (qemu reads the passphrase as a UTF-8 string).
    #[error("Data from secret {0} is not valid UTF-8")]
    SecretNotUtf8(String),
    /// No active key slot opened with the passphrase.
    #[error("Invalid password, cannot unlock any keyslot")]
    BadPassword,
}

impl FormatError for LuksError {
    fn kind(&self) -> ErrorKind {
        use LuksError::*;
        match self {
            TooShort { .. } | Magic | BadName { .. } | Field { .. } => ErrorKind::Invalid,
            SlotPlacement { .. } => ErrorKind::Corrupt,
            Version(_) | Algorithm { .. } => ErrorKind::Unsupported,
            NoSecret { .. } | UnknownSecret(_) | SecretNotUtf8(_) | BadPassword => {
                ErrorKind::InvalidArgument
            }
        }
    }
}

crate::impl_from_format_error!(LuksError);

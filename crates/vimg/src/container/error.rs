//! Why decoding a container failed.

use std::io;

use super::kind::Compression;
use crate::error::{ErrorKind, FormatError};

/// Why decoding failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The decoder rejected the data.
    #[error("{compression} container '{name}': corrupt data near compressed offset {compressed:#x} (decoded offset {decoded:#x}): {detail}")]
    Corrupt {
        /// The compression.
        compression: Compression,
        /// The container's name.
        name: String,
        /// How far the decoder had consumed the compressed bytes.
        compressed: u64,
        /// How many bytes it had produced.
        decoded: u64,
        /// What the decoder said.
        detail: String,
    },
    /// The compressed stream ended before its end marker.
    #[error("{compression} container '{name}' is truncated: the compressed data ends at offset {compressed:#x} (decoded offset {decoded:#x}) before the stream's end")]
    Truncated {
        /// The compression.
        compression: Compression,
        /// The container's name.
        name: String,
        /// Bytes of compressed input there were.
        compressed: u64,
        /// Bytes decoded before the end.
        decoded: u64,
    },
    /// The decoded stream is shorter or longer than its declared size.
    #[error("{what} '{name}' decodes to {got} bytes, but {expected} were expected ({why})")]
    SizeMismatch {
        /// "xz container", "stdin stream", ...
        what: String,
        /// The container's name.
        name: String,
        /// Bytes decoded (a lower bound when longer).
        got: String,
        /// Declared size.
        expected: u64,
        /// Where the declared size came from.
        why: String,
    },
    /// A container inside a container.
    #[error("{outer} container '{name}' holds a {inner} container: nested compression is not supported; decompress the outer layer first")]
    Nested {
        /// The outer compression.
        outer: Compression,
        /// The inner compression.
        inner: Compression,
        /// The container's name.
        name: String,
    },
    /// Data after the end of the last stream that is not another stream.
    #[error("{compression} container '{name}': unexpected data after the end of the stream at compressed offset {offset:#x}")]
    Trailing {
        /// The compression.
        compression: Compression,
        /// The container's name.
        name: String,
        /// Where the extra data starts.
        offset: u64,
    },
    /// The metadata used to learn the decoded size (xz index, zstd frame headers) is bad.
    #[error("{compression} container '{name}': {what} at offset {offset:#x} is invalid: {detail}")]
    BadMetadata {
        /// The compression.
        compression: Compression,
        /// The container's name.
        name: String,
        /// The structure.
        what: &'static str,
        /// Where it is.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// A read behind the window of a stream.
    #[error("'{name}' is read as a stream, in order; a read at decoded offset {offset:#x} is behind what is still kept ({kept:#x}): this image needs random access")]
    NotSequential {
        /// The source's name.
        name: String,
        /// The offset asked for.
        offset: u64,
        /// First offset still available.
        kept: u64,
    },
}

impl FormatError for ContainerError {
    fn kind(&self) -> ErrorKind {
        match self {
            ContainerError::Nested { .. } => ErrorKind::Unsupported,
            ContainerError::NotSequential { .. } => ErrorKind::Unsupported,
            _ => ErrorKind::Corrupt,
        }
    }
}
crate::impl_from_format_error!(ContainerError);

impl ContainerError {
    /// As an `io::Error`, to travel through
    /// [`Storage::read_at`](crate::storage::Storage::read_at); the message is kept.
    pub fn into_io(self) -> io::Error {
        let kind = match self {
            ContainerError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            ContainerError::NotSequential { .. } => io::ErrorKind::Unsupported,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}

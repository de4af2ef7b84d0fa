//! Compressed containers around an image: xz, gzip and zstd, recognised by their magic bytes
//! (never by the file name) and decoded on the fly.
//!
//! The decoded bytes reach the image readers as a [`Storage`](crate::storage::Storage) of one
//! of two kinds:
//!
//! - [`StreamStorage`]: no temporary file. It serves reads in ascending order from a window
//!   of the most recently decoded bytes (plus the first 64 KiB, kept for probing) and fails
//!   clearly on a read behind the window. Raw images are streamed this way, because the copy
//!   engine reads a raw image front to back.
//! - [`SpoolStorage`]: the decoded bytes go into a sparse, already unlinked temporary file in
//!   `$TMPDIR` (zero runs of 4 KiB and more are left as holes) as far as the readers ask,
//!   so formats that need random access (qcow2 inside xz) work, and `info` decodes only the
//!   header it reads when the decoded size is known in advance. The probe of the whole
//!   decoded image (the polyglot rule) needs its end; `convert` defers it to
//!   [`crate::storage::Storage::settle`] before its output becomes visible, so its copy
//!   starts while the rest is still being decoded.
//!
//! The decoded size must be known before an image can be opened. It comes from the xz index
//! (read from the end of a seekable file), from zstd frame headers, from the caller
//! ([`crate::source::SourceOptions::stream_size`]), or else from decoding the whole stream once.
//!
//! Memory is bounded: the stream window is [`STREAM_WINDOW`] bytes; the xz decoder may use
//! up to [`XZ_MEMLIMIT_THREADING`] across its threads (it uses fewer threads beyond that) and
//! never more than [`XZ_MEMLIMIT_STOP`]; zstd frames whose window exceeds 128 MiB are
//! refused (zstd's default limit); gzip needs 32 KiB.
//!
//! Errors name the container, the compressed offset the decoder had reached and the decoded
//! offset: "xz container 'disk.raw.xz': corrupt data near compressed offset 0x1f400
//! (decoded offset 0x3200000): ...".

mod decode;
mod encode;
mod error;
mod kind;
mod size;
mod spool;
mod stream;

use serde::Serialize;

pub(crate) use decode::not_built;
pub use decode::{Decoder, StorageReader, XZ_MEMLIMIT_STOP, XZ_MEMLIMIT_THREADING};
pub use encode::{CompressedSink, OutputCompression};
pub use error::ContainerError;
pub use kind::{detect, is_bzip2, Compression};
pub use size::{xz_decoded_size, zstd_decoded_size, zstd_size_from_head};
pub use spool::{SpoolLimits, SpoolStorage};
pub use stream::{OuterFile, StreamStorage, STREAM_WINDOW};

/// Bytes of the decoded stream read up front to probe the inner format.
pub const HEAD_BYTES: usize = 64 * 1024;

/// What `info` says about a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ContainerInfo {
    /// The compression.
    pub compression: Compression,
    /// Bytes of the compressed file, when it is a file (not a pipe).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed_size: Option<u64>,
    /// Bytes of the decoded stream.
    pub decoded_size: u64,
    /// How the decoded bytes are served: `stream` (in order, no temporary file) or
    /// `temporary-file` (a sparse, unlinked file in the temporary folder).
    pub access: Access,
}

/// How a container's decoded bytes reach the readers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Decoded in order as the reads come, no temporary file.
    Stream,
    /// Decoded into a sparse temporary file as far as the reads need.
    TemporaryFile,
}

#[cfg(test)]
mod tests;

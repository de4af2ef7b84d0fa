//! The crate-level error: a small [`ErrorKind`] that callers (the CLI) map to messages and exit
//! codes, the file it concerns, and the detailed cause (usually a per-format error enum that
//! names the structure, the offset and the bad value).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

// `Error::structure` and `Error::offset`: where in the image, as data.
mod location;

/// What went wrong, coarsely. The CLI maps these to exit codes; details live in the source.
///
/// ```
/// use vimg::{ErrorKind, Image, OpenOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("bad.qcow2");
/// # let mut h = vec![0u8; 512];
/// # h[..8].copy_from_slice(b"QFI\xfb\0\0\0\x09"); // qcow2 magic, version 9
/// # std::fs::write(&path, &h)?;
/// let e = Image::open(&path, &OpenOptions::default()).unwrap_err();
/// match e.kind() {
///     ErrorKind::Invalid | ErrorKind::Unsupported => eprintln!("refused: {e}"),
///     other => return Err(format!("{other:?}: {e}").into()),
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller asked for something impossible (bad option, size, combination).
    InvalidArgument,
    /// The image is malformed: a header field out of range, a bad magic, a bad checksum.
    Invalid,
    /// The image parses but its tables contradict themselves or the file (entry past EOF,
    /// overlapping clusters, decompression that does not yield one cluster).
    Corrupt,
    /// A valid feature vimg does not implement (encryption, an unknown incompatible bit).
    Unsupported,
    /// The image names a file outside what the external-file policy allows.
    UnsafeReference,
    /// The operation was interrupted (signal, cancel flag).
    Cancelled,
    /// An operating-system I/O error.
    Io,
}

impl ErrorKind {
    /// A short lower-case name, used in JSON output and test expectations.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::UnsafeReference => "unsafe-reference",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Io => "io",
        }
    }
}

/// The error type of every fallible vimg operation: an [`ErrorKind`], the file it
/// concerns, and the cause. `Display` names the file first; [`Error::message`] leaves it
/// out.
///
/// ```
/// let e = vimg::Image::open("missing.qcow2", &vimg::OpenOptions::default()).unwrap_err();
/// assert_eq!(e.path(), Some(std::path::Path::new("missing.qcow2")));
/// assert_eq!(e.io_kind(), Some(std::io::ErrorKind::NotFound));
/// assert!(e.to_string().starts_with("missing.qcow2: "));
/// ```
pub struct Error {
    kind: ErrorKind,
    path: Option<PathBuf>,
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A plain message used as an error source.
#[derive(Debug)]
struct Message(String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}

/// A request refused in qemu-img's own words, which qemu-img prints as they are (before any
/// output exists, without the target's name): see [`Error::refusal`].
#[derive(Debug)]
struct Refusal(String);

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

impl Error {
    /// A refusal of what was asked, in qemu-img's words, that a command line prints as it
    /// is (qemu-img names no file in it); [`Error::is_refusal`] tells it apart.
    pub fn refusal(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error::new(kind, Refusal(message.into()))
    }

    /// True for an [`Error::refusal`].
    pub fn is_refusal(&self) -> bool {
        self.source.downcast_ref::<Refusal>().is_some()
    }
}

impl Error {
    /// An error of `kind` wrapping any cause.
    pub fn new<E>(kind: ErrorKind, source: E) -> Self
    where
        E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    {
        Error {
            kind,
            path: None,
            source: source.into(),
        }
    }

    /// An error of `kind` with a plain message.
    pub fn msg(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error::new(kind, Message(message.into()))
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`] with a message.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Error::msg(ErrorKind::InvalidArgument, message)
    }

    /// Shorthand for [`ErrorKind::Unsupported`] with a message.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::msg(ErrorKind::Unsupported, message)
    }

    /// Shorthand for [`ErrorKind::Invalid`] with a message.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::msg(ErrorKind::Invalid, message)
    }

    /// Shorthand for [`ErrorKind::Corrupt`] with a message.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::msg(ErrorKind::Corrupt, message)
    }

    /// An I/O error with what was being done ("read L2 table at 0x30000").
    pub fn io(what: impl fmt::Display, err: io::Error) -> Self {
        let kind = if err.kind() == io::ErrorKind::UnexpectedEof {
            // A short read of metadata means the file is shorter than its tables claim.
            ErrorKind::Corrupt
        } else {
            ErrorKind::Io
        };
        Error::new(
            kind,
            IoContext {
                what: what.to_string(),
                err,
            },
        )
    }

    /// The coarse kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What went wrong, without the file name that [`Display`](fmt::Display) puts first:
    /// for a caller that words its own message around the name, as qemu-img does
    /// (`Could not open 'FILE': MESSAGE`).
    ///
    /// ```
    /// let e = vimg::Image::open("/nonexistent/disk.img", &vimg::OpenOptions::default())
    ///     .unwrap_err();
    /// assert_eq!(e.kind(), vimg::ErrorKind::Io);
    /// assert!(e.to_string().starts_with("/nonexistent/disk.img: "));
    /// assert!(!e.message().to_string().contains("disk.img"));
    /// ```
    pub fn message(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// The file this error concerns, when known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Records the file this error concerns, unless an inner layer already did.
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        if self.path.is_none() {
            self.path = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// Wraps this error with a leading explanation, keeping kind and path.
    pub fn context(self, what: impl Into<String>) -> Self {
        let kind = self.kind;
        let path = self.path.clone();
        Error {
            kind,
            path,
            source: Box::new(Context {
                what: what.into(),
                inner: self,
            }),
        }
    }

    /// The underlying I/O error kind, if this is (or wraps) an I/O error.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&*self.source);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                return Some(io.kind());
            }
            if let Some(io) = e.downcast_ref::<IoContext>() {
                return Some(io.err.kind());
            }
            if let Some(inner) = e.downcast_ref::<Context>() {
                cur = Some(&inner.inner as &(dyn std::error::Error + 'static));
                continue;
            }
            if let Some(inner) = e.downcast_ref::<Error>() {
                cur = Some(&*inner.source);
                continue;
            }
            cur = e.source();
        }
        None
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("path", &self.path)
            .field("message", &self.source.to_string())
            .finish()
    }
}

/// Names the file first when the error concerns one (`disk.qcow2: L2 table ...`); see
/// [`Error::message`] for the text alone.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => {
                let name = p.to_string_lossy();
                write!(
                    f,
                    "{}: {}",
                    crate::escape::escape_control(&name),
                    self.source
                )
            }
            None => fmt::Display::fmt(&self.source, f),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.source()
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Error::new(ErrorKind::Io, err)
    }
}

/// "while doing X: `<io error>`"
#[derive(Debug)]
struct IoContext {
    what: String,
    err: io::Error,
}

impl fmt::Display for IoContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A bare end-of-file means a short file; one with its own message says more.
        if self.err.kind() == io::ErrorKind::UnexpectedEof && self.err.get_ref().is_none() {
            write!(f, "{}: file is too short", self.what)
        } else {
            write!(f, "{}: {}", self.what, self.err)
        }
    }
}

impl std::error::Error for IoContext {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.err)
    }
}

#[derive(Debug)]
struct Context {
    what: String,
    inner: Error,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The file, if any, is the outer error's (it keeps the inner one's).
        write!(f, "{}: {}", self.what, self.inner.message())
    }
}

impl std::error::Error for Context {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.inner)
    }
}

/// Implemented by each per-format error enum so it rolls into [`Error`] with the right kind.
pub trait FormatError: std::error::Error + Send + Sync + 'static {
    /// The coarse kind of this error.
    fn kind(&self) -> ErrorKind;
}

/// Implements `From<$ty> for Error` for a per-format error enum that implements
/// [`FormatError`].
#[macro_export]
#[doc(hidden)]
macro_rules! impl_from_format_error {
    ($ty:ty) => {
        impl From<$ty> for $crate::Error {
            fn from(e: $ty) -> Self {
                let kind = $crate::error::FormatError::kind(&e);
                $crate::Error::new(kind, e)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_kind_and_path() {
        let e = Error::corrupt("L2 entry 3 past end of file").with_path("a.qcow2");
        let e = e.context("Could not open backing file");
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(e.path(), Some(Path::new("a.qcow2")));
        assert_eq!(
            e.message().to_string(),
            "Could not open backing file: L2 entry 3 past end of file"
        );
        assert_eq!(
            e.to_string(),
            "a.qcow2: Could not open backing file: L2 entry 3 past end of file"
        );
    }

    #[test]
    fn display_names_the_file() {
        let e = Error::new(ErrorKind::Io, io::Error::from(io::ErrorKind::NotFound));
        let bare = e.to_string();
        let e = e.with_path("/images/disk.img");
        assert_eq!(e.to_string(), format!("/images/disk.img: {bare}"));
        assert_eq!(e.message().to_string(), bare);
    }

    #[test]
    fn short_read_is_corrupt() {
        let e = Error::io(
            "read L1 table at 0x30000",
            io::Error::from(io::ErrorKind::UnexpectedEof),
        );
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(e.io_kind(), Some(io::ErrorKind::UnexpectedEof));
        assert!(e.to_string().contains("file is too short"));
    }
}

//! The one policy for files an image names: qcow2 backing files and external data files,
//! VMDK extents and parent hints, VHD and VHDX parent locators.
//!
//! An image is untrusted input, and the names inside it are too. By default
//! ([`ExternalPolicy::SameFolder`]) a name is opened only when it is a relative path that,
//! after every symlink is resolved, lands inside the folder of the image that names it, on a
//! regular file. Absolute paths, `..` escapes, devices, FIFOs and protocol pseudo-paths
//! (`json:`, `nbd:`, `http:`...) are refused with an error that names the field and the name.
//! [`ExternalPolicy::Allow`] lifts the folder rule for trusted input; protocol paths and
//! non-regular files stay refused because vimg cannot open them safely anyway.

use std::fs::{self, File};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, ErrorKind, FormatError, Result};

/// What an image may name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExternalPolicy {
    /// Only relative names that resolve inside the image's own folder (the default).
    #[default]
    SameFolder,
    /// Any regular file, relative to the image's folder or absolute (trusted input only).
    Allow,
    /// No external file at all, not even next to the image.
    Deny,
}

/// Why the gate refused a name.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The image named a file while it has no folder (e.g. it was read from a pipe).
    #[error("{field} names '{name}', but the image has no folder to resolve it in")]
    NoFolder {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
    },
    /// External files are disabled entirely.
    #[error("{field} names '{name}': external files are not allowed")]
    Denied {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
    },
    /// An empty name, or one with a NUL byte.
    #[error("{field} holds an invalid file name {name:?}")]
    BadName {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
    },
    /// A `json:`, `nbd:`-style protocol path.
    #[error("{field} names '{name}': protocol paths are refused")]
    Protocol {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
    },
    /// An absolute path under the same-folder policy.
    #[error("{field} names '{name}': absolute paths are refused (use --allow-external for trusted images)")]
    Absolute {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
    },
    /// The name resolves outside the image's folder.
    #[error("{field} names '{name}', which resolves to '{}', outside the image's folder '{}' (use --allow-external for trusted images)", resolved.display(), folder.display())]
    Escape {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
        /// Where it resolved to.
        resolved: PathBuf,
        /// The image's folder.
        folder: PathBuf,
    },
    /// The file does not exist or cannot be examined.
    #[error("{field} names '{name}', which cannot be opened: {err}")]
    Missing {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
        /// The OS error.
        err: std::io::Error,
    },
    /// Not a regular file (device, FIFO, socket, directory).
    #[error("{field} names '{name}', which is not a regular file")]
    NotRegular {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
    },
}

impl FormatError for GateError {
    fn kind(&self) -> ErrorKind {
        match self {
            GateError::Missing { .. } => ErrorKind::Io,
            _ => ErrorKind::UnsafeReference,
        }
    }
}
crate::impl_from_format_error!(GateError);

/// True for names like `json:{...}`, `nbd://host`, `http://x`, `file:foo`: a scheme of
/// letters, digits, `+`, `-` or `.` followed by a colon, before any slash.
pub fn is_protocol_path(name: &str) -> bool {
    let Some(colon) = name.find(':') else {
        return false;
    };
    let scheme = &name[..colon];
    !scheme.is_empty()
        && !scheme.contains('/')
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_'))
        // A Windows drive letter ("C:\x") is not a protocol; it is refused as absolute.
        && scheme.len() > 1
}

/// Resolves `name`, found in `field` of the image at `image_path`, under `policy`.
/// Returns the path to open.
pub fn resolve(
    image_path: Option<&Path>,
    field: &str,
    name: &str,
    policy: ExternalPolicy,
) -> Result<PathBuf> {
    let err_field = || field.to_string();
    let err_name = || name.to_string();
    if name.is_empty() || name.contains('\0') {
        return Err(GateError::BadName {
            field: err_field(),
            name: err_name(),
        }
        .into());
    }
    if policy == ExternalPolicy::Deny {
        return Err(GateError::Denied {
            field: err_field(),
            name: err_name(),
        }
        .into());
    }
    if is_protocol_path(name) {
        return Err(GateError::Protocol {
            field: err_field(),
            name: err_name(),
        }
        .into());
    }
    let named = Path::new(name);
    let windows_absolute = name.starts_with('\\') || name.as_bytes().get(1) == Some(&b':');
    if policy == ExternalPolicy::SameFolder && (named.is_absolute() || windows_absolute) {
        return Err(GateError::Absolute {
            field: err_field(),
            name: err_name(),
        }
        .into());
    }
    let Some(image_path) = image_path else {
        return Err(GateError::NoFolder {
            field: err_field(),
            name: err_name(),
        }
        .into());
    };
    let folder = match image_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let joined = folder.join(named);
    let missing = |err| {
        Error::from(GateError::Missing {
            field: err_field(),
            name: err_name(),
            err,
        })
    };
    let resolved = fs::canonicalize(&joined).map_err(missing)?;
    if policy == ExternalPolicy::SameFolder {
        let canon_folder = fs::canonicalize(&folder).map_err(missing)?;
        // Only plain components may appear in a stored name; even a `..` that comes back
        // inside the folder is refused, so the rule is easy to state.
        let escapes_lexically = named
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
        if escapes_lexically || !resolved.starts_with(&canon_folder) {
            return Err(GateError::Escape {
                field: err_field(),
                name: err_name(),
                resolved,
                folder: canon_folder,
            }
            .into());
        }
    }
    let meta = fs::metadata(&resolved).map_err(missing)?;
    if !meta.file_type().is_file() {
        return Err(GateError::NotRegular {
            field: err_field(),
            name: err_name(),
        }
        .into());
    }
    Ok(resolved)
}

/// Opens a path [`resolve`] returned, read-only, and checks again what it checked: the last
/// component must not have become a symlink since (`O_NOFOLLOW`), and the opened file must
/// still be a regular file (`O_NONBLOCK`: a FIFO swapped in is not waited on).
pub fn open_resolved(path: &Path, field: &str, name: &str) -> Result<File> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            Error::io(
                format_args!("open '{}' named by {field}", path.display()),
                e,
            )
        })?;
    let regular = file.metadata().map(|m| m.file_type().is_file());
    if !matches!(regular, Ok(true)) {
        return Err(GateError::NotRegular {
            field: field.to_string(),
            name: name.to_string(),
        }
        .into());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn protocol_paths() {
        for p in [
            "json:{}",
            "nbd://h/x",
            "http://a",
            "file:x",
            "nbd+unix:///x",
        ] {
            assert!(is_protocol_path(p), "{p}");
        }
        for p in ["a.qcow2", "dir/a:b", "C:\\x.vhd", "./x"] {
            assert!(!is_protocol_path(p), "{p}");
        }
    }

    #[test]
    fn same_folder_rules() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir(d.join("img")).unwrap();
        fs::write(d.join("img/base.raw"), b"x").unwrap();
        fs::write(d.join("secret"), b"s").unwrap();
        fs::create_dir(d.join("img/sub")).unwrap();
        fs::write(d.join("img/sub/inner.raw"), b"x").unwrap();
        symlink(d.join("secret"), d.join("img/link")).unwrap();
        symlink("base.raw", d.join("img/goodlink")).unwrap();
        let image = d.join("img/top.qcow2");
        let ok = |n: &str| resolve(Some(&image), "backing_file", n, ExternalPolicy::SameFolder);
        assert!(ok("base.raw").is_ok());
        assert!(ok("./base.raw").is_ok());
        assert!(ok("sub/inner.raw").is_ok());
        assert!(ok("goodlink").is_ok());
        for bad in [
            "../secret",
            "link",
            "/etc/passwd",
            "sub/../../secret",
            "json:{}",
            "sub",
        ] {
            let e = ok(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{bad}: {e}");
            assert!(e.to_string().contains("backing_file"), "{e}");
        }
        assert_eq!(ok("nope").unwrap_err().kind(), ErrorKind::Io);
        let allow = |n: &str| resolve(Some(&image), "f", n, ExternalPolicy::Allow);
        assert!(allow("../secret").is_ok());
        assert!(allow(d.join("secret").to_str().unwrap()).is_ok());
        assert!(allow("/dev/null").is_err());
        assert!(allow("json:{}").is_err());
        assert!(resolve(Some(&image), "f", "base.raw", ExternalPolicy::Deny).is_err());
        assert!(resolve(None, "f", "base.raw", ExternalPolicy::SameFolder).is_err());
    }

    #[test]
    fn open_resolved_checks_again() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("base.raw"), b"x").unwrap();
        assert!(open_resolved(&d.join("base.raw"), "f", "base.raw").is_ok());
        // Swapped for a symlink, a FIFO or a folder after resolve: refused, not followed,
        // not waited on.
        symlink(d.join("base.raw"), d.join("link")).unwrap();
        assert!(open_resolved(&d.join("link"), "f", "link").is_err());
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_resolved(&fifo, "f", "fifo").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{e}");
        let e = open_resolved(d, "f", "dir").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{e}");
    }
}

//! The one policy for files an image names: qcow2 backing files and external data files,
//! VMDK extents and parent hints, VHD and VHDX parent locators.
//!
//! An image is untrusted input, and the names inside it are too; the command line is trusted,
//! so nothing here judges a name the user typed. A name from an image is judged by where it
//! *resolves*, never by how it is spelled. By default ([`ExternalPolicy::SameFolder`]) it is
//! opened only when, after every symlink is resolved, it lands on a regular file inside the
//! folder of the image that names it — whether it was spelled `base.qcow2`, `./base.qcow2` or
//! `/srv/images/base.qcow2`. [`ExternalPolicy::Scoped`] also lets it land under folders the
//! operator named (`--allow-external=DIR`, e.g. Nova's `_base`); [`ExternalPolicy::Allow`] lets
//! it land anywhere (trusted images, and `qemu-img` compatibility mode).
//!
//! What a refusal reveals: nothing about the host. A name that does not resolve into the
//! allowed folders is refused with one message that quotes the name *as the image spelled it*
//! (control characters escaped) and the rule it broke — never the resolved path, and the same
//! text whether the target exists, is missing, is unreadable or is a dangling symlink. Only a
//! name whose place is inside the image's own folder (its parent resolves there and it is not
//! a symlink) may be reported as missing.
//!
//! Hard links: a regular file inside the folder whose link count is above one may be a second
//! name for a file elsewhere (a hard link cannot be told from the original), so it is refused
//! unless the file lies under a folder the operator allowed or the policy is
//! [`ExternalPolicy::Allow`]. Protocol pseudo-paths (`json:`, `nbd:`, `http:`...) and
//! non-regular files stay refused under every policy: vimg cannot open them safely anyway.

use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, ErrorKind, FormatError, Result};
use crate::escape::escape_control;

/// What an image may name.
///
/// The type is `Copy` so every reader's context stays cheap to pass around; the folder list of
/// [`ExternalPolicy::Scoped`] is therefore built once per process by [`ExternalPolicy::scoped`]
/// and lives as long as the process (a handful of paths).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExternalPolicy {
    /// Only names that resolve to a regular file inside the image's own folder (the default).
    #[default]
    SameFolder,
    /// As [`ExternalPolicy::SameFolder`], and also names that resolve to a regular file under
    /// one of these folders (canonical paths, see [`ExternalPolicy::scoped`]).
    Scoped(&'static [PathBuf]),
    /// Any regular file, relative to the image's folder or absolute (trusted input only).
    Allow,
    /// No external file at all, not even next to the image.
    Deny,
}

impl ExternalPolicy {
    /// A scoped policy trusting `dirs` (and the image's own folder). Each folder is resolved
    /// now (symlinks, `..`); entries that are not existing folders are dropped. With no folder
    /// left this is [`ExternalPolicy::SameFolder`].
    pub fn scoped<I, P>(dirs: I) -> ExternalPolicy
    where
        I: IntoIterator<Item = P>,
        P: AsRef<Path>,
    {
        let mut v: Vec<PathBuf> = dirs
            .into_iter()
            .filter_map(|d| fs::canonicalize(d.as_ref()).ok())
            .filter(|d| d.is_dir())
            .collect();
        v.sort();
        v.dedup();
        if v.is_empty() {
            ExternalPolicy::SameFolder
        } else {
            ExternalPolicy::Scoped(Box::leak(v.into_boxed_slice()))
        }
    }

    /// The folders an operator allowed besides the image's own (empty unless scoped).
    pub fn allowed_folders(&self) -> &[PathBuf] {
        match self {
            ExternalPolicy::Scoped(d) => d,
            _ => &[],
        }
    }
}

/// How a name is shown in a message: as the image spelled it, control characters escaped.
fn shown(name: &str) -> std::borrow::Cow<'_, str> {
    escape_control(name)
}

/// Why the gate refused a name. Every message quotes the name as the image spelled it (with
/// control characters escaped) and never a path the gate resolved.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The image named a file while it has no folder (e.g. it was read from a pipe).
    #[error(
        "{field} names '{}', but the image has no folder to resolve it in",
        shown(name)
    )]
    NoFolder {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
    },
    /// External files are disabled entirely.
    #[error("{field} names '{}': external files are not allowed", shown(name))]
    Denied {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
    },
    /// An empty name, or one with a NUL byte.
    #[error("{field} holds an invalid file name '{}'", shown(name))]
    BadName {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
    },
    /// A `json:`, `nbd:`-style protocol path.
    #[error(
        "{field} names '{}': protocol paths in an image are refused",
        shown(name)
    )]
    Protocol {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
    },
    /// The name does not resolve to a file inside the folders the policy allows. The same
    /// message whatever lies (or does not lie) at the place it points to.
    #[error(
        "{field} names '{}', which does not resolve to a file inside the image's folder{} \
         (a name from an image may not lead outside it, by absolute path, '..' or symlink: \
         use --allow-external=DIR to trust a folder, or --allow-external for trusted images)",
        shown(name),
        if *scoped { " or an allowed folder" } else { "" }
    )]
    Outside {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
        /// Whether folders besides the image's own were allowed.
        scoped: bool,
    },
    /// The file does not exist or cannot be examined (only said of a name whose place is
    /// inside the allowed folders, or under a trusting policy).
    #[error(
        "{field} names '{}', which cannot be opened: {}",
        shown(name),
        io_reason(err)
    )]
    Missing {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
        /// The OS error.
        err: std::io::Error,
    },
    /// Not a regular file (device, FIFO, socket, directory).
    #[error("{field} names '{}', which is not a regular file", shown(name))]
    NotRegular {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
    },
    /// A regular file in the image's folder with more than one hard link.
    #[error(
        "{field} names '{}', a file with {links} hard links: a hard link can make a file from \
         outside the image's folder appear inside it, so it is refused (use --allow-external=DIR \
         for a folder you trust, or --allow-external for trusted images)",
        shown(name)
    )]
    HardLink {
        /// The field that named the file.
        field: String,
        /// The name as stored.
        name: String,
        /// The file's link count.
        links: u64,
    },
}

/// An OS error as qemu-img words it: the description without Rust's "(os error N)".
fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
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

/// True for a Windows spelling that cannot name a file inside the folder here: a drive letter
/// (`C:\x`, `C:x`), a UNC or device path (`\\server\x`, `\\?\Volume{..}\x`), a leading
/// backslash, or a `..` between backslashes (`sub\..\..\x`). On this host such a name would be
/// one odd file name; it is refused as the escape it was written as.
fn windows_escape(name: &str) -> bool {
    let b = name.as_bytes();
    let drive = b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':';
    drive
        || name.starts_with('\\')
        || (name.contains('\\') && name.split(['\\', '/']).any(|c| c == ".."))
}

/// Where a name led, as [`resolve`] found it.
struct Resolved {
    path: PathBuf,
    /// Device and inode found at resolve time; the opened file must be the same one.
    id: (u64, u64),
    /// Whether the file must have a single link (it is trusted only by being in the folder).
    single_link: bool,
}

/// Resolves `name`, found in `field` of the image at `image_path`, under `policy`.
/// Returns the path to open (pass it to [`open_resolved`], or use [`open`] for both steps).
pub fn resolve(
    image_path: Option<&Path>,
    field: &str,
    name: &str,
    policy: ExternalPolicy,
) -> Result<PathBuf> {
    resolve_inner(image_path, field, name, policy).map(|r| r.path)
}

fn resolve_inner(
    image_path: Option<&Path>,
    field: &str,
    name: &str,
    policy: ExternalPolicy,
) -> Result<Resolved> {
    let field_s = || field.to_string();
    let name_s = || name.to_string();
    if name.is_empty() || name.contains('\0') {
        return Err(GateError::BadName {
            field: field_s(),
            name: name_s(),
        }
        .into());
    }
    if policy == ExternalPolicy::Deny {
        return Err(GateError::Denied {
            field: field_s(),
            name: name_s(),
        }
        .into());
    }
    if is_protocol_path(name) {
        return Err(GateError::Protocol {
            field: field_s(),
            name: name_s(),
        }
        .into());
    }
    let Some(image_path) = image_path else {
        return Err(GateError::NoFolder {
            field: field_s(),
            name: name_s(),
        }
        .into());
    };
    let folder = match image_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let named = Path::new(name);
    // An absolute name replaces the folder: it is judged by where it leads like any other.
    let joined = folder.join(named);
    let missing = |err| {
        Error::from(GateError::Missing {
            field: field_s(),
            name: name_s(),
            err,
        })
    };
    let not_regular = || {
        Error::from(GateError::NotRegular {
            field: field_s(),
            name: name_s(),
        })
    };
    if policy == ExternalPolicy::Allow {
        let path = fs::canonicalize(&joined).map_err(missing)?;
        let meta = fs::metadata(&path).map_err(missing)?;
        if !meta.file_type().is_file() {
            return Err(not_regular());
        }
        return Ok(Resolved {
            path,
            id: (meta.dev(), meta.ino()),
            single_link: false,
        });
    }
    // SameFolder or Scoped: nothing below may report where the name led or whether anything
    // is there, unless the place is inside the allowed folders.
    let allowed = policy.allowed_folders();
    let outside = || {
        Error::from(GateError::Outside {
            field: field_s(),
            name: name_s(),
            scoped: !allowed.is_empty(),
        })
    };
    if windows_escape(name) {
        return Err(outside());
    }
    let Ok(canon_folder) = fs::canonicalize(&folder) else {
        return Err(outside());
    };
    let in_scope = |p: &Path| allowed.iter().any(|d| p.starts_with(d));
    let in_folder = |p: &Path| p.starts_with(&canon_folder);
    match fs::canonicalize(&joined) {
        Ok(path) => {
            let trusted = in_scope(&path);
            if !trusted && !in_folder(&path) {
                return Err(outside());
            }
            let meta = fs::metadata(&path).map_err(missing)?;
            if !meta.file_type().is_file() {
                return Err(not_regular());
            }
            if !trusted && meta.nlink() > 1 {
                return Err(GateError::HardLink {
                    field: field_s(),
                    name: name_s(),
                    links: meta.nlink(),
                }
                .into());
            }
            Ok(Resolved {
                path,
                id: (meta.dev(), meta.ino()),
                single_link: !trusted,
            })
        }
        Err(err) => {
            // Missing or unreachable. Say so only when the name's place is inside: its last
            // component is a plain name, not a symlink, in a folder that resolves inside.
            let plain_last = matches!(named.components().next_back(), Some(Component::Normal(_)));
            let not_symlink = match fs::symlink_metadata(&joined) {
                Ok(m) => !m.file_type().is_symlink(),
                Err(_) => true,
            };
            let parent_inside = joined
                .parent()
                .and_then(|p| fs::canonicalize(p).ok())
                .is_some_and(|p| in_scope(&p) || in_folder(&p));
            if plain_last && not_symlink && parent_inside {
                Err(missing(err))
            } else {
                Err(outside())
            }
        }
    }
}

/// Resolves `name` and opens it read-only in one step, checking on the opened file what
/// [`resolve`] checked on the path: the same file (device and inode), still a regular file,
/// and still a single link where the policy requires it.
pub fn open(
    image_path: Option<&Path>,
    field: &str,
    name: &str,
    policy: ExternalPolicy,
) -> Result<(PathBuf, File)> {
    let r = resolve_inner(image_path, field, name, policy)?;
    let file = open_resolved(&r.path, field, name)?;
    let meta = file.metadata().map_err(|e| {
        Error::from(GateError::Missing {
            field: field.to_string(),
            name: name.to_string(),
            err: e,
        })
    })?;
    if (meta.dev(), meta.ino()) != r.id {
        return Err(Error::msg(
            ErrorKind::UnsafeReference,
            format!(
                "{field} names '{}', which changed while it was being opened",
                shown(name)
            ),
        ));
    }
    if r.single_link && meta.nlink() > 1 {
        return Err(GateError::HardLink {
            field: field.to_string(),
            name: name.to_string(),
            links: meta.nlink(),
        }
        .into());
    }
    Ok((r.path, file))
}

/// Opens a path [`resolve`] returned, read-only, and checks again what it checked: the last
/// component must not have become a symlink since (`O_NOFOLLOW`), and the opened file must
/// still be a regular file (`O_NONBLOCK`: a FIFO swapped in is not waited on). Errors quote
/// `name` (as the image spelled it), not `path`.
pub fn open_resolved(path: &Path, field: &str, name: &str) -> Result<File> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            Error::from(GateError::Missing {
                field: field.to_string(),
                name: name.to_string(),
                err: e,
            })
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
    fn windows_spellings() {
        for p in [
            "C:\\x",
            "c:x",
            "\\\\srv\\x",
            "\\x",
            "sub\\..\\..\\x",
            "sub/..\\x",
        ] {
            assert!(windows_escape(p), "{p}");
        }
        for p in ["a.vhd", ".\\a.vhd", "sub\\a.vhd", "a..b"] {
            assert!(!windows_escape(p), "{p}");
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
        // Judged by where it leads, not by its spelling.
        assert!(ok(d.join("img/base.raw").to_str().unwrap()).is_ok());
        assert!(ok(d.join("img/sub/../goodlink").to_str().unwrap()).is_ok());
        assert!(ok("sub/../base.raw").is_ok());
        for bad in [
            "../secret",
            "link",
            "/etc/passwd",
            "sub/../../secret",
            "json:{}",
            "sub",
            "../nope",
            "/nonexistent/x",
        ] {
            let e = ok(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{bad}: {e}");
            assert!(e.to_string().contains("backing_file"), "{e}");
        }
        assert_eq!(ok("nope").unwrap_err().kind(), ErrorKind::Io);
        assert_eq!(ok("sub/nope").unwrap_err().kind(), ErrorKind::Io);
        let allow = |n: &str| resolve(Some(&image), "f", n, ExternalPolicy::Allow);
        assert!(allow("../secret").is_ok());
        assert!(allow(d.join("secret").to_str().unwrap()).is_ok());
        assert!(allow("/dev/null").is_err());
        assert!(allow("json:{}").is_err());
        assert!(resolve(Some(&image), "f", "base.raw", ExternalPolicy::Deny).is_err());
        assert!(resolve(None, "f", "base.raw", ExternalPolicy::SameFolder).is_err());
    }

    #[test]
    fn refusals_reveal_nothing_about_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir(d.join("img")).unwrap();
        fs::write(d.join("exists"), b"s").unwrap();
        fs::create_dir(d.join("locked")).unwrap();
        symlink(d.join("exists"), d.join("img/to-existing")).unwrap();
        symlink(d.join("missing"), d.join("img/to-missing")).unwrap();
        let image = d.join("img/top.qcow2");
        let deep = "../../../../../../../../../../../..";
        let names = [
            format!("{deep}/proc/self/cwd"),
            format!("{deep}/proc/self/exe"),
            format!("{deep}/proc/self/fd/0"),
            format!("{deep}/etc/shadow"),
            format!("{deep}/etc/no-such-file-here"),
            "/proc/self/cwd".to_string(),
            "/proc/self/fd/0".to_string(),
            "/etc/shadow".to_string(),
            "/etc/no-such-file-here".to_string(),
            "/no-such-dir/x".to_string(),
            "../exists".to_string(),
            "../missing".to_string(),
            "../locked/x".to_string(),
            "to-existing".to_string(),
            "to-missing".to_string(),
            "sub\\..\\..\\x".to_string(),
        ];
        let cwd = std::env::current_dir().unwrap();
        let exe = std::env::current_exe().unwrap();
        for n in &names {
            let e =
                resolve(Some(&image), "backing_file", n, ExternalPolicy::SameFolder).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{n}: {e}");
            let text = e.to_string();
            let generic = text.replace(&*escape_control(n), "NAME");
            let expected = GateError::Outside {
                field: "backing_file".into(),
                name: "NAME".into(),
                scoped: false,
            }
            .to_string();
            assert_eq!(generic, expected, "{n}");
            for leak in [
                cwd.to_str().unwrap(),
                exe.to_str().unwrap(),
                d.to_str().unwrap(),
            ] {
                assert!(!text.contains(leak), "{n}: {text}");
            }
        }
    }

    #[test]
    fn control_characters_are_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("top.qcow2");
        let e = resolve(
            Some(&image),
            "backing_file",
            "/x\x1b[2K\rsafe\x07",
            ExternalPolicy::SameFolder,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("'/x\\x1b[2K\\x0dsafe\\x07'"), "{e}");
        assert!(!e.chars().any(|c| c.is_control()), "{e:?}");
        let e = resolve(Some(&image), "f", "json:\x1b", ExternalPolicy::Allow)
            .unwrap_err()
            .to_string();
        assert!(e.contains("json:\\x1b"), "{e}");
    }

    #[test]
    fn scoped_folders() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("instances/_base")).unwrap();
        fs::create_dir_all(d.join("instances/uuid")).unwrap();
        fs::write(d.join("instances/_base/base.qcow2"), b"x").unwrap();
        fs::write(d.join("instances/other"), b"x").unwrap();
        let image = d.join("instances/uuid/disk");
        let base = d.join("instances/_base/base.qcow2");
        let base = base.to_str().unwrap();
        let e = resolve(Some(&image), "b", base, ExternalPolicy::SameFolder).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsafeReference);
        // The folder may be given through a symlink or with `..`: it is resolved once.
        symlink(d.join("instances/_base"), d.join("base-link")).unwrap();
        let p = ExternalPolicy::scoped([d.join("base-link"), d.join("does-not-exist")]);
        assert_eq!(p.allowed_folders().len(), 1);
        assert!(resolve(Some(&image), "b", base, p).is_ok());
        assert!(resolve(Some(&image), "b", "../_base/base.qcow2", p).is_ok());
        let e = resolve(Some(&image), "b", "../other", p).unwrap_err();
        assert!(e.to_string().contains("or an allowed folder"), "{e}");
        // Missing under an allowed folder may be said; outside it, not.
        assert_eq!(
            resolve(Some(&image), "b", "../_base/nope", p)
                .unwrap_err()
                .kind(),
            ErrorKind::Io
        );
        assert_eq!(
            resolve(Some(&image), "b", "../nope", p).unwrap_err().kind(),
            ErrorKind::UnsafeReference
        );
        assert_eq!(
            ExternalPolicy::scoped(Vec::<PathBuf>::new()),
            ExternalPolicy::SameFolder
        );
    }

    #[test]
    fn hard_links_need_trust() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir(d.join("img")).unwrap();
        fs::create_dir(d.join("outside")).unwrap();
        fs::write(d.join("outside/secret"), b"s").unwrap();
        fs::hard_link(d.join("outside/secret"), d.join("img/link")).unwrap();
        let image = d.join("img/top.qcow2");
        let e = resolve(Some(&image), "b", "link", ExternalPolicy::SameFolder).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsafeReference);
        assert!(e.to_string().contains("2 hard links"), "{e}");
        assert!(!e.to_string().contains("outside/secret"), "{e}");
        assert!(open(Some(&image), "b", "link", ExternalPolicy::SameFolder).is_err());
        assert!(open(Some(&image), "b", "link", ExternalPolicy::Allow).is_ok());
        let p = ExternalPolicy::scoped([d.join("img")]);
        assert!(open(Some(&image), "b", "link", p).is_ok());
        // A single link opens.
        fs::write(d.join("img/base"), b"b").unwrap();
        assert!(open(Some(&image), "b", "base", ExternalPolicy::SameFolder).is_ok());
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

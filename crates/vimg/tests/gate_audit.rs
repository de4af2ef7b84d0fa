//! Every place the library opens a file, audited: files an image names (backing files,
//! extents, data files, parent locators) are opened only through the gate
//! (`gate::open_resolved` after `gate::resolve`); every other open is of a file the caller
//! named (the top image, an output, a temporary file). A new open anywhere in `src/` fails
//! this test until it is added to [`ALLOWED`] with the reason it is safe.

use std::fs;
use std::path::Path;

/// Calls that open (or create, or map) a file by name or wrap an opened one.
const OPENERS: &[&str] = &[
    "File::open(",
    "File::create(",
    "FileStorage::open(",
    "FileStorage::from_file(",
    "OpenOptions::new()",
    "fs::read(",
    "fs::read_to_string(",
    "Mmap::map(",
    "MmapOptions::new(",
];

/// `(file under src/, opener, count, why it is not an image's say-so)`.
const ALLOWED: &[(&str, &str, usize, &str)] = &[
    (
        "formats/qcow2/open.rs",
        "FileStorage::open(",
        1,
        "the external data file the user named on the command line (`data-file.filename` in --image-opts or json:, bound by crate::user_data_file from cmdline::bind_keys only); the name the image stores still goes through the gate",
    ),
    (
        "image/filter.rs",
        "FileStorage::open(",
        2,
        "image::filter::open: the file of a blkdebug name the user typed; image::filter::open_file: a quorum child's file the user typed in a quorum name (Image::open_source parses only the top image's name; backing names and extents go through the gate, which refuses protocol names)",
    ),
    (
        "blkdebug/open.rs",
        "fs::read_to_string(",
        1,
        "blkdebug::read_config_file: the config file a user's blkdebug name or `config` option names",
    ),
    (
        "formats/qcow2/update.rs",
        "OpenOptions::new()",
        1,
        "Qcow2Update::open: the image the user named on the command line, opened read-write, or a commit base the gate resolved, checked by inode against the gate's file (inplace::commit)",
    ),
    (
        "formats/qcow2/update.rs",
        "FileStorage::from_file(",
        3,
        "Qcow2Update: wraps a duplicate of the user's own image file for the reader and the check (and again for `check -r all` after extending it over a snapshot table that runs past its end)",
    ),
    (
        "formats/inplace_file.rs",
        "OpenOptions::new()",
        1,
        "UpdateFile::open (raw, qed, vdi, vpc, parallels, vhdx updaters): the image the user named on the command line, opened read-write, or a commit base the gate resolved, checked by inode against the gate's file (inplace::commit)",
    ),
    (
        "formats/inplace_file.rs",
        "FileStorage::from_file(",
        1,
        "UpdateFile::open: wraps a duplicate of the user's own image file for the format's reader",
    ),
    (
        "formats/vmdk/update.rs",
        "OpenOptions::new()",
        1,
        "VmdkUpdate: an extent file the gate resolved (OpenContext::resolve), opened read-write with O_NOFOLLOW and checked by inode against the file the gate let the reader open",
    ),
    (
        "formats/raw/update.rs",
        "OpenOptions::new()",
        1,
        "raw resize: the image the user named on the command line (RawUpdate::open goes through formats/inplace_file.rs)",
    ),
    (
        "formats/qcow2/update_data.rs",
        "FileStorage::from_file(",
        1,
        "DataWriter: wraps a duplicate of the file open for writing, to read a partly written cluster",
    ),
    (
        "formats/qcow2/update/bitmap.rs",
        "FileStorage::open(",
        1,
        "bitmap --merge -b SOURCE_FILE: the source image the user named on the command line, opened read-only with external names denied",
    ),
    (
        "convert/bitmaps.rs",
        "FileStorage::open(",
        1,
        "convert --bitmaps: the qcow2 source the user named on the command line (the opened image's own path), reopened read-only with external names denied to list its bitmaps",
    ),
    (
        "formats/qcow2/update/shadow.rs",
        "FileStorage::from_file(",
        1,
        "Qcow2Update::references (the shadow switch, snapshot -c/-d in QEMU's layout, the dirty refcount rebuild): wraps a duplicate of the user's own image file to count its references, external names denied",
    ),
    (
        "gate.rs",
        "OpenOptions::new()",
        1,
        "the gate's own open of a resolved name",
    ),
    (
        "formats/mod.rs",
        "FileStorage::from_file(",
        1,
        "OpenContext::open_external: wraps the gate's file",
    ),
    (
        "image.rs",
        "FileStorage::from_file(",
        1,
        "backing files: wraps the gate's file",
    ),
    (
        "image.rs",
        "FileStorage::open(",
        2,
        "the top image of a raw window (the user's driver=raw,offset=,size=), named by the caller; \
         the file a user's backing.file.filename option names, opened only to compare its \
         identity with the backing file the image names (never read)",
    ),
    (
        "formats/luks/amend.rs",
        "OpenOptions::new()",
        1,
        "amend of LUKS keyslots: the volume (or qcow2 image) the user named, opened for writing",
    ),
    (
        "formats/luks/amend.rs",
        "FileStorage::from_file(",
        1,
        "amend of LUKS keyslots: wraps the user's file opened above",
    ),
    (
        "formats/luks/amend.rs",
        "FileStorage::open(",
        1,
        "amend of a LUKS-encrypted qcow2: the user's image, for the header extension locating its LUKS header",
    ),
    (
        "formats/luks/update.rs",
        "OpenOptions::new()",
        1,
        "writes into and resize of a LUKS volume: the volume the user named, opened for writing",
    ),
    (
        "formats/luks/update.rs",
        "FileStorage::from_file(",
        1,
        "writes into and resize of a LUKS volume: wraps the user's file opened above",
    ),
    (
        "source.rs",
        "File::open(",
        1,
        "the top image, named by the caller",
    ),
    (
        "source.rs",
        "FileStorage::from_file(",
        2,
        "the top image and stdin",
    ),
    ("storage.rs", "File::open(", 1, "FileStorage::open itself"),
    (
        "storage.rs",
        "FileStorage::from_file(",
        1,
        "FileStorage::open itself",
    ),
    (
        "formats/qcow2/check_snapshots.rs",
        "FileStorage::open(",
        1,
        "check_failure: the image the user names to `check`, read again to say why its snapshot table cannot be read",
    ),
    (
        "checksum.rs",
        "FileStorage::open(",
        1,
        "hash_file: a file the caller names",
    ),
    (
        "output.rs",
        "OpenOptions::new()",
        6,
        "output files: temporaries, -n's existing target, a device, character device or \
         FIFO destination, /dev/stdout's file, the in-place fallback (all named by the caller)",
    ),
    (
        "output.rs",
        "FileStorage::open(",
        1,
        "reading back a device destination for its checksum",
    ),
    (
        "output.rs",
        "fs::read_to_string(",
        1,
        "/proc/PID/stat, to tell a live process's temporaries from stale ones",
    ),
    (
        "convert.rs",
        "File::open(",
        1,
        "the destination device, named by the caller, for its size",
    ),
    (
        "output.rs",
        "File::open(",
        1,
        "the output folder, for fsync",
    ),
    (
        "output.rs",
        "FileStorage::from_file(",
        2,
        "reading back an output file for its checksum",
    ),
    (
        "container/spool.rs",
        "OpenOptions::new()",
        2,
        "unlinked temporary files for decoded containers",
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Occurrences of `pat` in the non-test part of `text` (a test module starts at the first
/// `#[cfg(test)]`, at the end of a file as everywhere in this crate; `tests.rs` files are
/// tests), not preceded by an identifier character (`SparseFile::create(` is no open).
fn count(text: &str, pat: &str) -> usize {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    code.match_indices(pat)
        .filter(|(i, _)| {
            code[..*i]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
        })
        .count()
}

#[test]
fn files_are_opened_only_where_audited() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        if rel.ends_with("tests.rs") {
            continue;
        }
        let text = fs::read_to_string(&f).unwrap();
        for pat in OPENERS {
            let n = count(&text, pat);
            if n > 0 {
                found.push((rel.clone(), *pat, n));
            }
        }
    }
    let mut problems = Vec::new();
    for (file, pat, n) in &found {
        match ALLOWED.iter().find(|a| a.0 == file && a.1 == *pat) {
            Some(a) if a.2 == *n => {}
            Some(a) => problems.push(format!(
                "{file}: {pat} {n} times, audited {} ({})",
                a.2, a.3
            )),
            None => problems.push(format!("{file}: {pat} {n} times, not audited")),
        }
    }
    for a in ALLOWED {
        if !found.iter().any(|f| f.0 == a.0 && f.1 == a.1) {
            problems.push(format!("{}: {} is audited but gone", a.0, a.1));
        }
    }
    assert!(
        problems.is_empty(),
        "files opened outside the audited places (names an image gives must go through the gate):\n{}",
        problems.join("\n")
    );
}

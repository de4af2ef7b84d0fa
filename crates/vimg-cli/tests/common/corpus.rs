//! The shared corpus and committed fixtures: corpus rows and their expected answers, sparse
//! decompression, the corpus's cheap digest computed by walking an image's mapping, and
//! truncation.

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use super::*;

/// One row of the corpus MANIFEST.tsv.
#[derive(Clone, Debug)]
pub struct Row {
    /// The primary file, relative to the corpus folder.
    pub file: String,
    /// qemu-img's format (or ERROR).
    pub format: String,
    /// qemu-img's virtual size, when it opened the file.
    pub virtual_size: Option<u64>,
    /// The sha256 of qemu-img's raw output, when there is one.
    pub sha256: Option<String>,
    /// The expected-answer column as written.
    pub answer: String,
    /// The notes column.
    pub notes: String,
}

/// The manifest rows whose file name ends with one of `suffixes` (after the compression
/// suffix is removed).
pub fn corpus_rows(corpus: &Path, suffixes: &[&str]) -> Vec<Row> {
    let text = fs::read_to_string(corpus.join("MANIFEST.tsv")).unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            if c.len() < 8 {
                return None;
            }
            let plain = strip_compression(c[0]);
            if !suffixes.iter().any(|s| plain.ends_with(s)) {
                return None;
            }
            let answer = c[6].to_string();
            let sha = answer
                .get(..64)
                .filter(|h| h.chars().all(|x| x.is_ascii_hexdigit()))
                .map(str::to_string);
            Some(Row {
                file: c[0].to_string(),
                format: c[3].to_string(),
                virtual_size: c[5].parse().ok(),
                sha256: sha,
                answer,
                notes: c[7].to_string(),
            })
        })
        .collect()
}

/// The digest column of DIGESTS.tsv for `file`.
pub fn corpus_digest(corpus: &Path, file: &str) -> Option<String> {
    let text = fs::read_to_string(corpus.join("DIGESTS.tsv")).ok()?;
    text.lines()
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .find(|c| c.len() >= 2 && c[0] == file)
        .map(|c| c[1].to_string())
}

/// `name` without its `.bz2` / `.xz` / `.gz` suffix.
pub fn strip_compression(name: &str) -> &str {
    for s in [".bz2", ".xz", ".gz"] {
        if let Some(p) = name.strip_suffix(s) {
            return p;
        }
    }
    name
}

/// Decompresses `src` (by its suffix) into `dst`, leaving all-zero 64 KiB blocks as holes
/// so that big sparse images cost no disk space.
pub fn decompress_sparse(src: &Path, dst: &Path) {
    let name = src.to_string_lossy();
    let tool = if name.ends_with(".bz2") {
        "bzip2"
    } else if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        fs::copy(src, dst).unwrap();
        return;
    };
    let mut child = Command::new(tool)
        .arg("-dc")
        .arg(src)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let f = fs::File::create(dst).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut pos = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let r = out.read(&mut buf[n..]).unwrap();
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            f.write_all_at(&buf[..n], pos).unwrap();
        }
        pos += n as u64;
        if n < buf.len() {
            break;
        }
    }
    f.set_len(pos).unwrap();
    assert!(child.wait().unwrap().success(), "{tool} -dc {name} failed");
}

/// Decompresses a corpus file and its companions (named in the notes as
/// `needs companions: a.xz, b.xz`) into `dir`; returns the primary file's path.
pub fn corpus_file(corpus: &Path, row: &Row, dir: &Path) -> PathBuf {
    let src = corpus.join(&row.file);
    let folder = src.parent().unwrap().to_path_buf();
    if let Some(rest) = row.notes.split("needs companions: ").nth(1) {
        let list = rest.split(" (").next().unwrap_or("");
        for c in list.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            let c = c.trim_end_matches(';');
            let from = folder.join(c);
            if from.is_file() {
                decompress_sparse(&from, &dir.join(strip_compression(c)));
            }
        }
    }
    let name = Path::new(strip_compression(&row.file))
        .file_name()
        .unwrap()
        .to_owned();
    let dst = dir.join(name);
    decompress_sparse(&src, &dst);
    dst
}

/// The corpus digest of an image as vimg reads it: sha256 over each non-zero 64 KiB block's
/// index (u64 big-endian) and bytes, then the length (u64 big-endian). Walks the mapping,
/// so unallocated terabytes cost nothing.
pub fn image_digest(img: &vimg::Image) -> String {
    const B: u64 = 1 << 16;
    let size = img.virtual_size();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; B as usize];
    let mut pos = 0u64;
    while pos < size {
        // Skip to the next byte that a layer holds as data.
        let (e, _, _) = img.map_flat(pos, size - pos).unwrap();
        if !e.kind.has_data() {
            pos = e.end();
            continue;
        }
        let block = pos / B;
        let start = block * B;
        let end = (start + B).min(size);
        let n = (end - start) as usize;
        img.read_at(&mut buf[..n], start).unwrap();
        if buf[..n].iter().any(|b| *b != 0) {
            h.update(block.to_be_bytes());
            h.update(&buf[..n]);
        }
        pos = end;
    }
    h.update(size.to_be_bytes());
    hex(&h.finalize())
}

/// Opens `path` with vimg (probing unless `format` is given).
pub fn open_image(path: &Path, format: Option<&str>) -> vimg::Result<vimg::Image> {
    let opts = vimg::OpenOptions::with_format(format.map(|f| f.parse().unwrap()));
    vimg::Image::open(path, &opts)
}

/// A committed fixture from testdata/, decompressed into `dir`.
pub fn fixture(name: &str, dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata");
    let src = root.join(format!("{name}.xz"));
    let dst = dir.join(name);
    decompress_sparse(&src, &dst);
    dst
}

/// The sha256 every raw conversion of the `small.*` fixtures must have.
pub fn small_raw_sha256() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata");
    fs::read_to_string(root.join("small.raw.sha256"))
        .unwrap()
        .trim()
        .to_string()
}

/// The sha256 of vimg's raw conversion of `img`.
pub fn vimg_raw_sha256(img: &Path, format: Option<&str>, dir: &Path) -> String {
    let out = dir.join("vimg-sha.raw");
    let _ = fs::remove_file(&out);
    let mut args = vec!["convert"];
    if let Some(f) = format {
        args.extend(["-f", f]);
    }
    args.extend(["-O", "raw", s(img), s(&out)]);
    vimg(&args);
    let h = sha256_file(&out);
    let _ = fs::remove_file(&out);
    h
}

/// Cuts `img` at each of `cuts` bytes (a copy named `cut-NAME`, keeping the extension so a
/// probe failure is not hidden behind raw) and converts the cut copy to raw with `-f fmt`.
/// vimg must fail cleanly (exit 1, no panic, nothing left at the output), or — when `want`
/// is given and the cut removed only bytes the image reads as zero anyway (QEMU, like vimg,
/// sees a file as whole sectors with a zero tail), padding, or a footer that has a copy —
/// read exactly the content whose sha256 is `want`.
pub fn assert_cuts_fail_or_read(img: &Path, fmt: &str, cuts: &[u64], want: Option<&str>) {
    let data = fs::read(img).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let name = img.file_name().unwrap().to_string_lossy();
    let t = dir.path().join(format!("cut-{name}"));
    let out = dir.path().join("out.raw");
    for &cut in cuts {
        let cut = (cut as usize).min(data.len().saturating_sub(1));
        fs::write(&t, &data[..cut]).unwrap();
        let r = vimg_raw(&["convert", "-f", fmt, "-O", "raw", s(&t), s(&out)]);
        let err = String::from_utf8_lossy(&r.stderr);
        let what = format!("{name} cut at {cut} of {}", data.len());
        assert!(!err.contains("panicked"), "{what}: {err}");
        match (r.status.code(), want) {
            (Some(1), _) => assert!(!out.exists(), "{what}: failed but left the output"),
            (Some(0), Some(want)) => {
                assert_eq!(sha256_file(&out), want, "{what}: read, but not the content")
            }
            (other, _) => panic!("{what}: exit {other:?}: {err}"),
        }
        let _ = fs::remove_file(&out);
    }
}

/// Runs `vimg ARGS` and asserts it failed cleanly (exit 1, a message, no panic).
pub fn assert_vimg_fails(args: &[&str]) -> String {
    let out = vimg_raw(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "vimg {args:?} should fail with exit 1; stderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "vimg {args:?} panicked:\n{err}");
    assert!(err.starts_with("vimg: "), "{err}");
    err
}

/// True when `tool` can be run (for the corpus decompressors).
pub fn can_run(tool: &str) -> bool {
    have(tool)
}

//! Every committed fixture in testdata/: whole, it converts to raw with the content recorded
//! beside it (`*.sha256` of the raw content); truncated at ten points, it gives an error or
//! (when the cut removed only unused bytes) exactly the recorded content — never a panic,
//! never different content.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

/// Image fixtures: every file that is not a script, a checksum or a text note.
fn fixtures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(testdata())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            p.is_file()
                && !name.ends_with(".sh")
                && !name.ends_with(".sha256")
                && !name.ends_with(".md")
                && !name.ends_with(".txt")
                && !name.ends_with(".json")
        })
        .collect();
    v.sort();
    v
}

/// The expected sha256 of a fixture's raw content: `NAME.sha256` next to it, or the one of
/// the raw image it was made from (`small.*` → `small.raw.sha256`).
fn expected_sha(p: &Path) -> Option<String> {
    let name = p.file_name()?.to_string_lossy().into_owned();
    let own = p.with_file_name(format!("{name}.sha256"));
    let stem = name.split(['.', '-']).next()?.to_string();
    let shared = p.with_file_name(format!("{stem}.raw.sha256"));
    let f = if own.exists() { own } else { shared };
    fs::read_to_string(f)
        .ok()
        .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
}

/// The format of the image inside a fixture, probed on the decompressed bytes: a fixed VHD
/// inside xz is only recognisable by its footer, which a streamed probe does not see.
fn inner_format(f: &Path, tmp: &Path) -> String {
    let name = f.file_name().unwrap().to_string_lossy().into_owned();
    let plain = if let Some(tool) = [(".xz", "xz"), (".gz", "gzip"), (".zst", "zstd")]
        .iter()
        .find(|(ext, _)| name.ends_with(ext))
        .map(|(_, tool)| *tool)
    {
        let out = run_cmd(tool, &["-dc", s(f)]);
        assert!(out.status.success(), "{tool} -dc {name}");
        let p = tmp.join(format!("plain-{name}"));
        fs::write(&p, &out.stdout).unwrap();
        p
    } else {
        f.to_path_buf()
    };
    let info = vimg_raw(&["info", "--output=json", s(&plain)]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    v["format"].as_str().unwrap().to_string()
}

#[test]
fn fixtures_convert_to_their_recorded_content() {
    let dir = tempfile::tempdir().unwrap();
    let list = fixtures();
    assert!(!list.is_empty(), "no fixtures in testdata/");
    for f in list {
        let Some(sha) = expected_sha(&f) else {
            panic!("{} has no recorded content (.sha256)", f.display());
        };
        let out = dir.path().join("out.raw");
        let fmt = inner_format(&f, dir.path());
        vimg(&["convert", "-f", &fmt, "-O", "raw", s(&f), s(&out)]);
        assert_eq!(sha256_file(&out), sha, "{}", f.display());
    }
}

#[test]
fn truncated_fixtures_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for f in fixtures() {
        let len = fs::metadata(&f).unwrap().len();
        let cuts: Vec<u64> = (0..10).map(|k| len * k / 10).collect();
        let fmt = inner_format(&f, dir.path());
        assert_cuts_fail_or_read(&f, &fmt, &cuts, expected_sha(&f).as_deref());
    }
}

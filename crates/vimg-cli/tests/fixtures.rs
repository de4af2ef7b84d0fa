//! Every committed fixture in testdata/: whole, it converts to raw with the content recorded
//! beside it (`*.sha256` of the raw content); truncated at ten points, it gives an error —
//! never a panic, never a silent success.

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
        vimg(&["convert", "-O", "raw", s(&f), s(&out)]);
        assert_eq!(sha256_file(&out), sha, "{}", f.display());
    }
}

#[test]
fn truncated_fixtures_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for f in fixtures() {
        let data = fs::read(&f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        for k in 0..10u64 {
            let cut = (data.len() as u64 * k / 10) as usize;
            // Keep the extension so a probe failure is not hidden behind raw.
            let t = dir.path().join(format!("cut{k}-{name}"));
            fs::write(&t, &data[..cut]).unwrap();
            let fmt = vimg_raw(&["info", "--output=json", s(&f)]);
            let fmt: serde_json::Value = serde_json::from_slice(&fmt.stdout).unwrap();
            let fmt = fmt["format"].as_str().unwrap().to_string();
            let out = dir.path().join("out.raw");
            let r = vimg_raw(&["convert", "-f", &fmt, "-O", "raw", s(&t), s(&out)]);
            let err = String::from_utf8_lossy(&r.stderr);
            assert!(!err.contains("panicked"), "{name} cut at {cut}: {err}");
            assert_eq!(
                r.status.code(),
                Some(1),
                "{name} cut at {cut} of {} should fail: {err}",
                data.len()
            );
            let _ = fs::remove_file(&t);
        }
    }
}

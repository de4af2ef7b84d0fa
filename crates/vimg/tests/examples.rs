//! Runs the logic of every program in `examples/`, so they stay correct as the library
//! changes (`cargo build --examples` only proves they compile).

#[path = "../examples/check_refs.rs"]
mod check_refs;
#[path = "../examples/convert.rs"]
mod convert;
#[path = "../examples/decompress.rs"]
mod decompress;
#[path = "../examples/info.rs"]
mod info;

use std::io::Write;

fn sample(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("disk.img");
    let mut data = vec![0u8; 3 << 20];
    data[..4096].fill(0x5a);
    data[2 << 20..(2 << 20) + 100].fill(0xa5);
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn info_example() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path());
    let text = info::run(p.to_str().unwrap()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["info"]["format"], "raw");
    assert_eq!(v["image-service"]["min_disk"], 1);
}

#[test]
fn convert_example() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path());
    let out = dir.path().join("out.raw");
    let last = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = last.clone();
    let progress = move |pr: vimg::Progress| *seen.lock().unwrap() = Some(pr);
    let sum = convert::run(
        p.to_str().unwrap(),
        out.to_str().unwrap(),
        vimg::Format::Raw,
        progress,
    )
    .unwrap();
    let want: String = sha2::Sha256::digest(std::fs::read(&p).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(sum, want);
    let pr = last.lock().unwrap().unwrap();
    assert_eq!(pr.done, pr.total);
}

#[test]
fn check_refs_example() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path());
    let verdict = check_refs::run(p.to_str().unwrap()).unwrap();
    assert!(verdict.unwrap().contains("self-contained"));
}

#[test]
fn decompress_example() {
    let dir = tempfile::tempdir().unwrap();
    let p = sample(dir.path());
    let data = std::fs::read(&p).unwrap();
    let gz = dir.path().join("disk.img.gz");
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&data).unwrap();
    std::fs::write(&gz, e.finish().unwrap()).unwrap();
    let out = dir.path().join("out.raw");
    let text = decompress::run(gz.to_str().unwrap(), out.to_str().unwrap()).unwrap();
    assert!(text.contains("raw inside gzip"), "{text}");
    assert!(text.contains("os_hash_value="), "{text}");
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

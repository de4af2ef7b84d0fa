//! A deterministic mutation run over the formats added for issue 13 (parallels, qed, qcow,
//! bochs, cloop, dmg): valid images, from qemu-img or the corpus, with bytes of their
//! headers and tables changed, must open or be refused, map in range and read without a
//! panic, and within a time bound (the property of the `probe` fuzz target, run here on
//! every `cargo test` because cargo-fuzz is not always at hand).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Mutates `base` `rounds` times (1-4 changes each, mostly in the first 8 KiB and the
/// last 1 KiB, where headers, tables and trailers live) and runs the open/map/read
/// property on each, as `format` and probed.
fn mutate(base: &[u8], format: vimg::Format, rounds: usize, seed: u64) {
    let mut rng = Rng(seed | 1);
    let n = base.len();
    for r in 0..rounds {
        let mut d = base.to_vec();
        for _ in 0..1 + rng.next() % 4 {
            let at = match rng.next() % 4 {
                0 | 1 => (rng.next() % 8192.min(n as u64)) as usize,
                2 => n - 1 - (rng.next() % 1024.min(n as u64)) as usize,
                _ => (rng.next() % n as u64) as usize,
            };
            d[at] = match rng.next() % 5 {
                0 => 0,
                1 => 0xff,
                2 => d[at] ^ (1 << (rng.next() % 8)),
                3 => d[at].wrapping_add(1),
                _ => rng.next() as u8,
            };
        }
        let t = Instant::now();
        vimg::fuzzing::open_and_read_all(&d, Some(format));
        vimg::fuzzing::open_and_read_all(&d, None);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{format} mutation {r} (seed {seed}) took {:?}",
            t.elapsed()
        );
    }
}

fn qemu_image(dir: &Path, fmt: &str, opts: &str) -> PathBuf {
    let img = dir.join(format!("m.{fmt}"));
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&img), "4M"]);
    qemu_img(&args);
    qemu_io(
        fmt,
        &img,
        &[
            "write -P 0xaa 0 8k",
            "write -P 0xbb 1M 4k",
            "write -P 0xcc 3M 64k",
        ],
    );
    img
}

#[test]
fn qemu_made_images_survive_mutations() {
    if !qemu_available("qemu_made_images_survive_mutations") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (fmt, opts, f) in [
        ("parallels", "cluster_size=4k", vimg::Format::Parallels),
        ("qed", "cluster_size=4k,table_size=2", vimg::Format::Qed),
        ("qcow", "", vimg::Format::Qcow),
    ] {
        let img = qemu_image(dir.path(), fmt, opts);
        let base = fs::read(&img).unwrap();
        mutate(&base, f, 1000, 0x13 + base.len() as u64);
    }
}

#[test]
fn corpus_samples_survive_mutations() {
    let Some(corpus) = corpus_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    for row in corpus_rows(&corpus, &[""]) {
        let f = match row.format.as_str() {
            "parallels" => vimg::Format::Parallels,
            "bochs" => vimg::Format::Bochs,
            "cloop" => vimg::Format::Cloop,
            "dmg" => vimg::Format::Dmg,
            _ => continue,
        };
        let img = corpus_file(&corpus, &row, dir.path());
        let base = fs::read(&img).unwrap();
        mutate(&base, f, 1000, 0x5eed ^ base.len() as u64);
        let _ = fs::remove_file(&img);
    }
}

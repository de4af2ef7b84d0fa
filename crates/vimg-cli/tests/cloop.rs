//! cloop images: the corpus sample gives its digest, images built here read
//! byte-identically to qemu-img, and hostile offset tables or blocks are refused before
//! anything is written.

mod common;

use std::fs;
use std::path::Path;

use common::*;

const MAGIC: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

/// A cloop image of `blocks` (each `block_size` bytes, zlib-compressed).
fn cloop_image(path: &Path, block_size: u32, blocks: &[Vec<u8>]) {
    let mut b = vec![0u8; 136];
    b[..MAGIC.len()].copy_from_slice(MAGIC);
    b[128..132].copy_from_slice(&block_size.to_be_bytes());
    b[132..136].copy_from_slice(&(blocks.len() as u32).to_be_bytes());
    let z: Vec<Vec<u8>> = blocks
        .iter()
        .map(|x| vimg::codec::zlib_compress(x, 6, x.len() * 2 + 64).unwrap())
        .collect();
    let mut o = 136 + 8 * (blocks.len() as u64 + 1);
    b.extend_from_slice(&o.to_be_bytes());
    for x in &z {
        o += x.len() as u64;
        b.extend_from_slice(&o.to_be_bytes());
    }
    for x in &z {
        b.extend_from_slice(x);
    }
    fs::write(path, b).unwrap();
}

fn blocks(bs: usize, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| match i % 3 {
            0 => pattern(bs, i as u64 + 1),
            1 => vec![0u8; bs],
            _ => vec![i as u8; bs],
        })
        .collect()
}

#[test]
fn corpus_sample_gives_its_digest() {
    let Some(corpus) = corpus_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<Row> = corpus_rows(&corpus, &[""])
        .into_iter()
        .filter(|r| r.format == "cloop")
        .collect();
    assert!(!rows.is_empty());
    for row in rows {
        let img = corpus_file(&corpus, &row, dir.path());
        let image = open_image(&img, None).unwrap();
        assert_eq!(image.format(), vimg::Format::Cloop);
        assert_eq!(Some(image.virtual_size()), row.virtual_size);
        assert_eq!(
            image_digest(&image),
            corpus_digest(&corpus, &row.file).unwrap()
        );
        if let Some(sha) = &row.sha256 {
            assert_eq!(&vimg_raw_sha256(&img, None, dir.path()), sha);
        }
    }
}

#[test]
fn reads_like_qemu() {
    if !qemu_available("cloop reads_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.cloop");
    for (bs, n) in [(512usize, 7usize), (65536, 5), (1 << 20, 3)] {
        cloop_image(&img, bs as u32, &blocks(bs, n));
        assert_reads_like_qemu(&img, "cloop", dir.path());
    }
}

#[test]
fn hostile_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("h.cloop");
    let out = d.join("out.raw");
    let good = || cloop_image(&img, 4096, &blocks(4096, 4));
    let patch = |at: usize, v: &[u8]| {
        good();
        let mut b = fs::read(&img).unwrap();
        b[at..at + v.len()].copy_from_slice(v);
        fs::write(&img, b).unwrap();
    };
    let cases: Vec<(usize, Vec<u8>)> = vec![
        (128, 1000u32.to_be_bytes().to_vec()), // block size not a multiple of 512
        (132, 100_000u32.to_be_bytes().to_vec()), // offsets table past EOF
        (136, 8u64.to_be_bytes().to_vec()),    // offset inside the table
        (144, 0u64.to_be_bytes().to_vec()),    // offsets going backwards
        (160, (1u64 << 40).to_be_bytes().to_vec()), // offset past EOF
    ];
    for (at, v) in cases {
        patch(at, &v);
        let err = assert_vimg_fails(&["convert", "-O", "raw", s(&img), s(&out)]);
        assert!(err.contains("cloop"), "{err}");
        assert!(!out.exists());
    }
    // A block whose zlib stream is damaged: refused when read, nothing left behind.
    good();
    let mut b = fs::read(&img).unwrap();
    let first = u64::from_be_bytes(b[136..144].try_into().unwrap()) as usize;
    for x in &mut b[first + 2..first + 40] {
        *x ^= 0x55;
    }
    fs::write(&img, b).unwrap();
    assert_vimg_fails(&["convert", "-O", "raw", s(&img), s(&out)]);
    assert!(!out.exists());
    assert_vimg_fails(&["create", "-f", "cloop", s(&d.join("new.cloop")), "1M"]);
}

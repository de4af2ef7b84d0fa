//! Bochs growing images: the corpus sample gives its digest, images built here (with data
//! in some sectors of some extents) read byte-identically to qemu-img, and hostile
//! catalogs are refused before anything is written.

mod common;

use std::fs;
use std::path::Path;

use common::*;

/// A version 2 Bochs image of `extents` extents of `extent` bytes; `data` lists
/// `(extent index, sector in extent, fill byte)`. Extents are allocated in the order
/// they first appear.
fn bochs_image(path: &Path, extents: u32, extent: u32, data: &[(u32, u32, u8)]) {
    let sectors = extent / 512;
    let bitmap = sectors.div_ceil(8);
    let bitmap_bytes = bitmap.div_ceil(512) * 512;
    let mut b = vec![0u8; 512];
    b[..22].copy_from_slice(b"Bochs Virtual HD Image");
    b[32..39].copy_from_slice(b"Redolog");
    b[48..55].copy_from_slice(b"Growing");
    b[0x40..0x44].copy_from_slice(&0x0002_0000u32.to_le_bytes());
    b[0x44..0x48].copy_from_slice(&512u32.to_le_bytes());
    b[0x48..0x4c].copy_from_slice(&extents.to_le_bytes());
    b[0x4c..0x50].copy_from_slice(&bitmap.to_le_bytes());
    b[0x50..0x54].copy_from_slice(&extent.to_le_bytes());
    b[0x58..0x60].copy_from_slice(&(u64::from(extents) * u64::from(extent)).to_le_bytes());
    let mut catalog = vec![u32::MAX; extents as usize];
    let mut slots: Vec<Vec<u8>> = Vec::new();
    for &(e, s, fill) in data {
        let slot = match catalog[e as usize] {
            u32::MAX => {
                catalog[e as usize] = slots.len() as u32;
                slots.push(vec![0u8; (bitmap_bytes + extent) as usize]);
                slots.len() - 1
            }
            v => v as usize,
        };
        let x = &mut slots[slot];
        x[(s / 8) as usize] |= 1 << (s % 8);
        let at = (bitmap_bytes + s * 512) as usize;
        x[at..at + 512].fill(fill);
    }
    for c in &catalog {
        b.extend_from_slice(&c.to_le_bytes());
    }
    for x in slots {
        b.extend_from_slice(&x);
    }
    fs::write(path, b).unwrap();
}

#[test]
fn corpus_sample_gives_its_digest() {
    let Some(corpus) = corpus_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<Row> = corpus_rows(&corpus, &[""])
        .into_iter()
        .filter(|r| r.format == "bochs")
        .collect();
    assert!(!rows.is_empty());
    for row in rows {
        let img = corpus_file(&corpus, &row, dir.path());
        let image = open_image(&img, None).unwrap();
        assert_eq!(image.format(), vimg::Format::Bochs);
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
    if !qemu_available("bochs reads_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.bochs");
    // 4 KiB and 64 KiB extents; data in scattered sectors, an extent allocated but empty
    // of set bits is not expressible here, so every allocated extent has some.
    bochs_image(
        &img,
        64,
        4096,
        &[
            (0, 0, 0xaa),
            (0, 7, 0xbb),
            (3, 2, 0xcc),
            (63, 5, 0xdd),
            (2, 0, 0xee),
        ],
    );
    assert_reads_like_qemu(&img, "bochs", dir.path());
    bochs_image(
        &img,
        16,
        65536,
        &[(1, 0, 1), (1, 127, 2), (15, 64, 3), (0, 9, 4)],
    );
    assert_reads_like_qemu(&img, "bochs", dir.path());
    let info: serde_json::Value =
        serde_json::from_str(&vimg(&["info", "--output=json", s(&img)])).unwrap();
    assert_eq!(info["format"], "bochs");
    assert_eq!(info["virtual-size"], 16 * 65536);
}

#[test]
fn hostile_catalogs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("h.bochs");
    let out = d.join("out.raw");
    let patch = |at: usize, v: u32| {
        bochs_image(&img, 8, 4096, &[(0, 0, 1), (1, 1, 2)]);
        let mut b = fs::read(&img).unwrap();
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        fs::write(&img, b).unwrap();
    };
    // Entry past the end of the file, entries naming one extent, a catalog past EOF, an
    // extent size QEMU refuses, a bitmap too small for the extent.
    for (at, v) in [
        (512 + 4, 9),
        (512 + 4, 0),
        (0x48, 100_000),
        (0x50, 1000),
        (0x4c, 0),
    ] {
        patch(at, v);
        let err = assert_vimg_fails(&["convert", "-O", "raw", s(&img), s(&out)]);
        assert!(err.contains("Bochs"), "{err}");
        assert!(!out.exists());
    }
    assert_vimg_fails(&["create", "-f", "bochs", s(&d.join("new.bochs")), "1M"]);
}

//! Errors found while an opened image is read (not when it is opened) name the file, as
//! open errors do: in the library (`Error::path`, `Display`, `ImageReadSeek`'s I/O errors)
//! and in `convert`'s message, and a failed convert leaves no output behind.

mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use common::*;
use vimg::{GuestOffset, Image, ImageReadSeek, MapKind, OpenOptions};

const MIB: u64 = 1 << 20;

/// 2 MiB that deflate shrinks well (every sector one repeated byte).
fn compressible_raw(dir: &Path) -> PathBuf {
    let raw = dir.join("in.raw");
    let data: Vec<u8> = (0..4096u32)
        .flat_map(|i| std::iter::repeat_n((i % 251) as u8, 512))
        .collect();
    fs::write(&raw, data).unwrap();
    raw
}

/// A compressed qcow2 of [`compressible_raw`] and the host offset of its first unit.
fn compressed_qcow2(dir: &Path) -> (PathBuf, u64) {
    let raw = compressible_raw(dir);
    let img = dir.join("c.qcow2");
    vimg(&["convert", "-c", "-O", "qcow2", s(&raw), s(&img)]);
    let image = Image::open(&img, &OpenOptions::default()).unwrap();
    let e = image.reader().map(GuestOffset(0), 64 << 10).unwrap();
    let MapKind::Compressed { offset, .. } = e.kind else {
        panic!("cluster 0 is not compressed: {e:?}");
    };
    (img, offset.get())
}

fn open(p: &Path) -> Image {
    Image::open(p, &OpenOptions::default()).unwrap()
}

#[test]
fn corrupt_compressed_cluster_found_while_reading_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (img, unit) = compressed_qcow2(dir.path());
    patch(&img, unit, &[0xff; 200]);

    // The library: the open succeeds (the data is not read), the read fails naming the file.
    let image = open(&img);
    let mut buf = vec![0u8; 64 << 10];
    let e = image.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.kind(), vimg::ErrorKind::Corrupt, "{e}");
    assert_eq!(e.path(), Some(img.as_path()), "{e}");
    assert!(
        e.to_string().starts_with(&format!("{}: ", img.display())),
        "{e}"
    );
    assert!(!e.message().to_string().contains("c.qcow2"), "{e}");

    // Read + Seek: the I/O error carries the same message.
    let mut rs = ImageReadSeek::new(open(&img));
    let io = rs.read_exact(&mut buf).unwrap_err();
    assert!(
        io.to_string().starts_with(&format!("{}: ", img.display())),
        "{io}"
    );

    // The CLI: qemu-img says "error while reading at byte 0"; vimg names the file and
    // leaves nothing behind.
    let out = dir.path().join("out.raw");
    let r = vimg_raw(&["convert", "-O", "raw", s(&img), s(&out)]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.starts_with(&format!(
            "vimg: error while reading '{}': compressed unit for guest 0x0 at host {unit:#x}: ",
            img.display()
        )),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn file_cut_short_after_open_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("in.raw");
    write_sparse_raw(&raw, 4 * MIB, &[(MIB, &pattern(MIB as usize, 7))]);
    let img = dir.path().join("q.qcow2");
    vimg(&["convert", "-O", "qcow2", s(&raw), s(&img)]);
    let image = open(&img);
    let e = image.reader().map(GuestOffset(MIB), 64 << 10).unwrap();
    let MapKind::Data { offset, .. } = e.kind else {
        panic!("{e:?}");
    };
    // The data clusters go away under the open image.
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(offset.get())
        .unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let e = image.read_at(&mut buf, MIB).unwrap_err();
    assert_eq!(e.path(), Some(img.as_path()), "{e}");
    assert!(
        e.to_string().starts_with(&format!("{}: ", img.display())),
        "{e}"
    );
    assert!(e.to_string().contains("file is too short"), "{e}");
}

#[test]
fn backing_file_errors_name_the_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let (base, unit) = compressed_qcow2(dir.path());
    patch(&base, unit, &[0xff; 200]);
    let top = dir.path().join("top.qcow2");
    vimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "c.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    let image = open(&top);
    let mut buf = vec![0u8; 4096];
    let e = image.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(
        e.path().and_then(Path::file_name),
        Some(std::ffi::OsStr::new("c.qcow2")),
        "{e}"
    );
    let out = dir.path().join("out.raw");
    let r = vimg_raw(&["convert", "-O", "raw", s(&top), s(&out)]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.starts_with("vimg: error while reading '"), "{err}");
    assert!(err.contains("c.qcow2': compressed unit"), "{err}");
    assert!(!out.exists());
}

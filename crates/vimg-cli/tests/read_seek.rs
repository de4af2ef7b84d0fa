//! `vimg::ImageReadSeek` (the library's `Read + Seek` over an image) gives the bytes
//! qemu-img's raw conversion gives: streamed whole, at random seeks, and by `read_at`.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use common::*;
use vimg::{Image, ImageReadSeek, OpenOptions};

const MIB: u64 = 1 << 20;

/// Images qemu-img writes: a qcow2 overlay over a qcow2 base (data in both layers, a
/// discarded range), a compressed qcow2, a vhdx and a streamOptimized vmdk of the same data.
fn images(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let base = dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "9M"]);
    qemu_io(
        "qcow2",
        &base,
        &[
            "write -P 0x11 0 3M",
            "write -P 0x22 5M 1M",
            "write -z 6M 64k",
        ],
    );
    let top = dir.join("top.qcow2");
    qcow2_overlay(&top, "base.qcow2", "", None);
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x33 1M 64k",
            "write -z 2M 512k",
            "write -P 0x44 8M 1000k",
        ],
    );
    let mut out = vec![(top.clone(), "qcow2")];
    for (name, fmt, opts) in [
        ("c.qcow2", "qcow2", "-c"),
        ("d.vhdx", "vhdx", ""),
        ("s.vmdk", "vmdk", "subformat=streamOptimized"),
    ] {
        let p = dir.join(name);
        let mut args = vec!["convert", "-q", "-O", fmt];
        match opts {
            "" => {}
            "-c" => args.push("-c"),
            o => args.extend(["-o", o]),
        }
        args.extend([s(&top), s(&p)]);
        qemu_in(dir, &args);
        out.push((p, fmt));
    }
    out
}

#[test]
fn read_seek_reads_what_qemu_img_converts() {
    if !qemu_available("read_seek_reads_what_qemu_img_converts") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (img, fmt) in images(dir.path()) {
        let raw = dir.path().join("qemu.raw");
        qemu_img(&["convert", "-f", fmt, "-O", "raw", s(&img), s(&raw)]);
        let want = fs::read(&raw).unwrap();

        let image = Image::open(&img, &OpenOptions::default()).unwrap();
        let mut r = ImageReadSeek::new(&image);
        assert_eq!(r.len(), want.len() as u64, "{fmt}");
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert!(got == want, "{fmt}: streamed bytes differ from qemu-img's");

        // Reads that straddle cluster, layer and zero-range edges, at seeks from each end.
        let x = pattern(64, 3);
        for (i, w) in x.chunks(2).enumerate() {
            let len = 1 + (u64::from(w[0]) << 12 | u64::from(w[1])) % (300 << 10);
            let at = (u64::from(w[0]) * 37 * 1024 + i as u64 * 511) % want.len() as u64;
            let pos = if i % 2 == 0 {
                r.seek(SeekFrom::Start(at)).unwrap()
            } else {
                let back = want.len() as u64 - at;
                r.seek(SeekFrom::End(-(back as i64))).unwrap()
            };
            assert_eq!(pos, at);
            let n = len.min(want.len() as u64 - at) as usize;
            let mut buf = vec![0xa5u8; n];
            r.read_exact(&mut buf).unwrap();
            assert!(
                buf[..] == want[at as usize..at as usize + n],
                "{fmt}: {n} bytes at {at:#x}"
            );
            let mut again = vec![0u8; n];
            assert_eq!(r.read_at(&mut again, at).unwrap(), n);
            assert!(again == buf, "{fmt}: read_at {n} bytes at {at:#x}");
        }
        // The tail: a short read_at, then end of file.
        let mut buf = vec![0u8; MIB as usize];
        let at = want.len() as u64 - 1000;
        assert_eq!(r.read_at(&mut buf, at).unwrap(), 1000);
        assert!(buf[..1000] == want[at as usize..]);
        r.seek(SeekFrom::End(0)).unwrap();
        assert_eq!(r.read(&mut buf).unwrap(), 0);
    }
}

/// A corrupt image read through the adapter: an I/O error carrying vimg's error, not a
/// panic or zeros.
#[test]
fn read_seek_reports_a_corrupt_table_as_an_error() {
    if !qemu_available("read_seek_reports_a_corrupt_table_as_an_error") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bad.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    qemu_io("qcow2", &img, &["write -P 0x55 0 64k"]);
    // Point the first L2 entry far past the end of the file.
    let h = vimg::formats::qcow2::header::Header::parse(&fs::read(&img).unwrap()[..4096]).unwrap();
    let l1 = fs::read(&img).unwrap()[h.l1_table_offset as usize..][..8].to_vec();
    let l2 =
        u64::from_be_bytes(l1.try_into().unwrap()) & vimg::formats::qcow2::header::L1E_OFFSET_MASK;
    patch(
        &img,
        l2,
        &(0x8000_0000_0000_0000u64 | 1 << 40).to_be_bytes(),
    );
    let image = match Image::open(&img, &OpenOptions::default()) {
        Ok(i) => i,
        // Refused at open is fine too; what matters is no wrong bytes.
        Err(_) => return,
    };
    let mut r = ImageReadSeek::new(image);
    let mut buf = vec![0u8; 65536];
    let e = r.read_exact(&mut buf).unwrap_err();
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<vimg::Error>());
    assert!(inner.is_some(), "{e}");
    assert!(e.to_string().contains("bad.qcow2"), "{e}");
}

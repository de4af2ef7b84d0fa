use std::io::{Cursor, Write};
use std::sync::Arc;

use super::kind::XZ_MAGIC;
use super::*;
use crate::storage::{MemStorage, Storage};

/// Test data with zero runs (holes in a spool) and incompressible parts.
fn sample(len: usize) -> Vec<u8> {
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate() {
        if (i / 65536) % 3 == 1 {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    v
}

fn xz(data: &[u8], block: u64) -> Vec<u8> {
    let stream = liblzma::stream::MtStreamBuilder::new()
        .threads(2)
        .block_size(block)
        .preset(1)
        .encoder()
        .unwrap();
    let mut e = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zst(data: &[u8], with_size: bool) -> Vec<u8> {
    let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    // As the zstd tool does by default: without it, damage to stored blocks goes unseen.
    e.include_checksum(true).unwrap();
    if with_size {
        e.include_contentsize(true).unwrap();
        e.set_pledged_src_size(Some(data.len() as u64)).unwrap();
    } else {
        e.include_contentsize(false).unwrap();
    }
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn decoder(c: Option<Compression>, bytes: Vec<u8>) -> Decoder {
    Decoder::new(c, Box::new(Cursor::new(bytes)), "t.img", 2).unwrap()
}

#[test]
fn magic_detection() {
    let d = sample(1000);
    assert_eq!(detect(&xz(&d, 0)), Some(Compression::Xz));
    assert_eq!(detect(&gz(&d)), Some(Compression::Gzip));
    assert_eq!(detect(&zst(&d, true)), Some(Compression::Zstd));
    assert_eq!(detect(&d), None);
    assert_eq!(detect(&[0u8; 4096]), None);
    // The xz magic alone, with bad flags, is not enough.
    let mut fake = XZ_MAGIC.to_vec();
    fake.extend_from_slice(&[0, 1, 0, 0, 0, 0]);
    assert_eq!(detect(&fake), None);
    let mut bz = b"BZh91AY&SY".to_vec();
    bz.extend_from_slice(&[0u8; 20]);
    assert!(is_bzip2(&bz));
}

#[test]
fn xz_index_gives_the_size_of_multi_block_and_concatenated_streams() {
    let d = sample(3 << 20);
    let one = xz(&d, 0);
    let many = xz(&d, 256 << 10);
    for f in [&one, &many] {
        let s = MemStorage::new(f.clone());
        assert_eq!(xz_decoded_size(&s, "t").unwrap(), d.len() as u64);
    }
    // Two streams with stream padding between and after them.
    let mut cat = many.clone();
    cat.extend_from_slice(&[0u8; 8]);
    cat.extend_from_slice(&xz(&d[..1000], 0));
    cat.extend_from_slice(&[0u8; 4]);
    let s = MemStorage::new(cat.clone());
    assert_eq!(xz_decoded_size(&s, "t").unwrap(), d.len() as u64 + 1000);
    let mut out = Vec::new();
    let mut dec = decoder(Some(Compression::Xz), cat);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = dec.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    assert_eq!(out.len(), d.len() + 1000);
    assert_eq!(&out[..d.len()], &d[..]);
    // A truncated file has no footer: a clear error, not a guess.
    let s = MemStorage::new(one[..one.len() - 7].to_vec());
    let e = xz_decoded_size(&s, "t").unwrap_err();
    assert!(e.to_string().contains("xz container 't'"), "{e}");
}

#[test]
fn zstd_frames_give_the_size_when_they_declare_it() {
    let d = sample(300_000);
    let mut two = zst(&d, true);
    two.extend_from_slice(&zst(&d[..5000], true));
    let s = MemStorage::new(two);
    assert_eq!(zstd_decoded_size(&s, "t").unwrap(), Some(305_000));
    let s = MemStorage::new(zst(&d, false));
    assert_eq!(zstd_decoded_size(&s, "t").unwrap(), None);
    assert_eq!(zstd_size_from_head(&zst(&d, true)), Some(300_000));
    assert_eq!(zstd_size_from_head(&zst(&d, false)), None);
}

#[test]
fn truncated_and_corrupt_streams_name_container_and_offset() {
    let d = sample(1 << 20);
    for (c, bytes) in [
        (Compression::Xz, xz(&d, 0)),
        (Compression::Gzip, gz(&d)),
        (Compression::Zstd, zst(&d, true)),
    ] {
        let cut = bytes[..bytes.len() / 2].to_vec();
        let mut dec = decoder(Some(c), cut);
        let e = dec.count_to_end_ref().expect_err(&format!("{c} truncated"));
        let msg = e.to_string();
        assert!(msg.contains(&format!("{c} container 't.img'")), "{msg}");
        assert!(msg.contains("offset 0x"), "{msg}");
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        for b in &mut bad[mid..mid + 64] {
            *b ^= 0x5a;
        }
        let mut dec = decoder(Some(c), bad);
        let e = dec.count_to_end_ref().expect_err(&format!("{c} corrupt"));
        assert!(
            e.to_string().contains(&format!("{c} container 't.img'")),
            "{c}: {e}"
        );
    }
}

impl Decoder {
    fn count_to_end_ref(&mut self) -> std::io::Result<u64> {
        let mut buf = vec![0u8; 1 << 16];
        while self.read(&mut buf)? > 0 {}
        Ok(self.pos())
    }
}

fn head_of(dec: &mut Decoder) -> Vec<u8> {
    let mut head = vec![0u8; HEAD_BYTES];
    let n = dec.read_full(&mut head).unwrap();
    head.truncate(n);
    head
}

#[test]
fn stream_storage_serves_in_order_reads_and_refuses_going_back() {
    let d = sample((STREAM_WINDOW as usize) + (8 << 20));
    let mut dec = decoder(Some(Compression::Zstd), zst(&d, true));
    let head = head_of(&mut dec);
    let s = StreamStorage::new(dec, head, d.len() as u64, "test", OuterFile::default()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    // The head, then out-of-order reads within the window.
    s.read_exact_at(&mut buf[..100], 10).unwrap();
    assert_eq!(&buf[..100], &d[10..110]);
    s.read_exact_at(&mut buf, 4 << 20).unwrap();
    assert_eq!(&buf[..], &d[4 << 20..5 << 20]);
    s.read_exact_at(&mut buf, 2 << 20).unwrap();
    assert_eq!(&buf[..], &d[2 << 20..3 << 20]);
    let far = d.len() - (1 << 20);
    s.read_exact_at(&mut buf, far as u64).unwrap();
    assert_eq!(&buf[..], &d[far..]);
    // Behind the window, past the head.
    let e = s.read_exact_at(&mut buf, 1 << 20).unwrap_err();
    assert!(e.to_string().contains("needs random access"), "{e}");
    // The head is kept.
    s.read_exact_at(&mut buf[..16], 0).unwrap();
    assert_eq!(&buf[..16], &d[..16]);
}

#[test]
fn stream_storage_checks_the_declared_size() {
    let d = sample(200_000);
    let mut dec = decoder(Some(Compression::Gzip), gz(&d));
    let head = head_of(&mut dec);
    let s =
        StreamStorage::new(dec, head, 300_000, "the test's size", OuterFile::default()).unwrap();
    let mut buf = vec![0u8; 100_000];
    let e = s.read_exact_at(&mut buf, 150_000).unwrap_err();
    assert!(e.to_string().contains("the test's size"), "{e}");
    let mut dec = decoder(Some(Compression::Gzip), gz(&d));
    let head = head_of(&mut dec);
    let s = StreamStorage::new(dec, head, 50_000, "short", OuterFile::default());
    // The head alone is longer than the declared size.
    assert!(s.is_err());
    let big = sample(300_000);
    let mut dec = decoder(Some(Compression::Gzip), gz(&big));
    let head = head_of(&mut dec);
    let s = StreamStorage::new(dec, head, 200_000, "short", OuterFile::default()).unwrap();
    let e = s.read_exact_at(&mut buf, 100_000).unwrap_err();
    assert!(e.to_string().contains("at least"), "{e}");
}

#[test]
fn spool_decodes_lazily_and_leaves_holes() {
    let d = sample(4 << 20);
    let mut dec = decoder(Some(Compression::Xz), xz(&d, 0));
    let head = head_of(&mut dec);
    let s = SpoolStorage::new(
        dec,
        &head,
        Some(d.len() as u64),
        "test",
        SpoolLimits::default(),
        OuterFile::default(),
    )
    .unwrap();
    let mut buf = vec![0u8; 100];
    s.read_exact_at(&mut buf, 70_000).unwrap();
    assert_eq!(&buf[..], &d[70_000..70_100]);
    let mut all = vec![0u8; d.len()];
    s.read_exact_at(&mut all, 0).unwrap();
    assert_eq!(all, d);
    // The zero run at 64..128 KiB is a hole (where the filesystem has holes).
    if let Some((start, _)) = s.next_data(65536).unwrap() {
        assert!(start == 65536 || start == 131072, "{start}");
    }
    // Unknown size: decoded whole at once.
    let mut dec = decoder(Some(Compression::Gzip), gz(&d));
    let head = head_of(&mut dec);
    let s = SpoolStorage::new(
        dec,
        &head,
        None,
        "",
        SpoolLimits::default(),
        OuterFile::default(),
    )
    .unwrap();
    assert_eq!(s.len(), d.len() as u64);
    let mut all = vec![0u8; d.len()];
    s.read_exact_at(&mut all, 0).unwrap();
    assert_eq!(all, d);
    // A data limit is enforced.
    let mut dec = decoder(Some(Compression::Gzip), gz(&d));
    let head = head_of(&mut dec);
    let limits = SpoolLimits {
        dir: None,
        max_bytes: Some(1 << 20),
    };
    let e = SpoolStorage::new(dec, &head, None, "", limits, OuterFile::default()).unwrap_err();
    assert!(e.to_string().contains("allowed"), "{e}");
}

#[test]
fn compressed_sink_round_trips() {
    use crate::output::OutFile;
    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let d = sample(1 << 20);
    for name in ["xz", "gz", "zst"] {
        let buf = Buf::default();
        let f = OutFile::stream(Box::new(buf.clone()), "-");
        let c = OutputCompression::parse(name, None).unwrap();
        let sink = CompressedSink::new(f.clone(), c, 3 << 20, 2).unwrap();
        sink.write_at(0, &d[..1000]).unwrap();
        sink.write_at(1 << 20, &d).unwrap();
        assert!(sink.write_at(0, b"x").is_err());
        sink.finish(3 << 20).unwrap();
        f.sync().unwrap();
        let bytes = buf.0.lock().unwrap().clone();
        let mut dec = decoder(detect(&bytes), bytes);
        let mut out = Vec::new();
        let mut tmp = vec![0u8; 1 << 16];
        loop {
            let n = dec.read(&mut tmp).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&tmp[..n]);
        }
        let mut want = vec![0u8; 3 << 20];
        want[..1000].copy_from_slice(&d[..1000]);
        want[1 << 20..2 << 20].copy_from_slice(&d);
        assert!(out == want, "{name} round trip");
    }
    assert!(OutputCompression::parse("bz2", None).is_err());
    assert!(OutputCompression::parse("gz", Some(0)).is_err());
}

#[test]
fn a_decoder_does_not_look_inside() {
    // Opening (source.rs) refuses nested containers; the decoder just yields the bytes.
    let inner = xz(b"hello", 0);
    let mut dec = decoder(Some(Compression::Gzip), gz(&inner));
    let head = head_of(&mut dec);
    assert_eq!(detect(&head), Some(Compression::Xz));
}

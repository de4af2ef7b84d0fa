//! Random content through every writer and back. The input is a recipe, not an image: the
//! first byte picks a writer (format and `-o` options, every subformat), the next two a
//! virtual size (512 bytes to 4 MiB, in sectors), the rest a few extents (offset, length,
//! fill: random bytes, zeros, one repeated byte, or the input's own bytes). The target
//! writes the raw disk, converts it with `vimg::convert`, and checks that:
//! - the output opens as the format written and reads back byte-identical (a size rounded
//!   up by the format reads zeros past the end);
//! - its own `check` finds neither corruptions nor leaks;
//! - its header re-parses to the same bytes (qcow2 header, sparse VMDK header, VHD footer
//!   and dynamic header, VDI header): parse -> write is stable on what vimg writes.
#![no_main]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vimg::{ConvertOptions, CreateOptions, ErrorKind, Format, Image, OpenOptions};

/// Every writer, as `(format, -o options, -c)`.
const WRITERS: &[(Format, &str, bool)] = &[
    (Format::Raw, "", false),
    (Format::Raw, "compress=zst", false),
    (Format::Raw, "compress=gz,compression_level=1", false),
    (Format::Raw, "compress=xz,compression_level=0", false),
    (Format::Qcow2, "", false),
    (Format::Qcow2, "cluster_size=4096", false),
    (Format::Qcow2, "compat=0.10,cluster_size=512", false),
    (Format::Qcow2, "cluster_size=16384,extended_l2=on", false),
    (Format::Qcow2, "cluster_size=4096,refcount_bits=1,preallocation=metadata", false),
    (Format::Qcow2, "cluster_size=4096", true),
    (Format::Qcow2, "cluster_size=8192,compression_type=zstd", true),
    (Format::Qcow2, "cluster_size=4096,data_file=rt.data", false),
    (Format::Vmdk, "subformat=monolithicSparse", false),
    (Format::Vmdk, "subformat=monolithicSparse,zeroed_grain=on", false),
    (Format::Vmdk, "subformat=streamOptimized", false),
    (Format::Vmdk, "subformat=monolithicFlat", false),
    (Format::Vmdk, "subformat=twoGbMaxExtentSparse", false),
    (Format::Vmdk, "subformat=twoGbMaxExtentFlat", false),
    (Format::Vpc, "", false),
    (Format::Vpc, "force_size=on", false),
    (Format::Vpc, "subformat=fixed,force_size=on", false),
    (Format::Vhdx, "block_size=1M,log_size=1M", false),
    (Format::Vhdx, "block_size=1M,log_size=1M,block_state_zero=off", false),
    (Format::Vhdx, "subformat=fixed,block_size=1M,log_size=1M", false),
    (Format::Vdi, "", false),
    (Format::Vdi, "static=on", false),
    (Format::Parallels, "cluster_size=4096", false),
    (Format::Parallels, "cluster_size=1000", false),
    (Format::Qed, "cluster_size=4096,table_size=1", false),
    (Format::Qed, "", false),
    (Format::Qcow, "", false),
];

const MAX_EXTENTS: usize = 6;
const MAX_EXTENT: usize = 256 << 10;

/// A folder of this process on tmpfs when there is one: every run commits (and fsyncs)
/// its output.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("vimg-fuzz-roundtrip-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("fuzz folder");
        d
    })
}

/// xorshift64*, seeded from the input: the "random bytes" of an extent.
struct Rng(u64);

impl Rng {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn take<const N: usize>(data: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = data.split_first_chunk::<N>()?;
    *data = rest;
    Some(*head)
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let Some([w, s0, s1]) = take::<3>(&mut data) else {
        return;
    };
    let (format, opts, compress) = WRITERS[w as usize % WRITERS.len()];
    let size = (u64::from(u16::from_le_bytes([s0, s1]) % 8192) + 1) * 512;
    let mut disk = vec![0u8; size as usize];
    let mut rng = Rng(input.iter().fold(0x9e37_79b9_7f4a_7c15, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    }) | 1);
    for _ in 0..MAX_EXTENTS {
        let Some(e) = take::<7>(&mut data) else {
            break;
        };
        let off = (u32::from_le_bytes([e[0], e[1], e[2], e[3]]) as u64 % size) as usize;
        let len = (u16::from_le_bytes([e[4], e[5]]) as usize * 8 + 1)
            .min(MAX_EXTENT)
            .min(disk.len() - off);
        let dst = &mut disk[off..off + len];
        match e[6] % 4 {
            0 => rng.fill(dst),
            1 => dst.fill(0),
            2 => dst.fill(e[6] | 1),
            _ => {
                for (d, s) in dst.iter_mut().zip(input.iter().cycle()) {
                    *d = *s;
                }
            }
        }
    }

    let run = dir().join("run");
    let _ = std::fs::remove_dir_all(&run);
    std::fs::create_dir_all(&run).expect("run folder");
    let src = run.join("src.raw");
    {
        let f = std::fs::File::create(&src).expect("source");
        f.set_len(size).expect("source size");
        // Write only the non-zero 4 KiB pieces: the source is sparse, like a real disk.
        for (i, chunk) in disk.chunks(4096).enumerate() {
            if chunk.iter().any(|b| *b != 0) {
                f.write_all_at(chunk, i as u64 * 4096).expect("source data");
            }
        }
    }
    let src_img = Image::open(&src, &OpenOptions::with_format(Some(Format::Raw))).expect("raw opens");

    let mut create = CreateOptions::new();
    if !opts.is_empty() {
        create.parse_into(opts).expect("valid options");
    }
    create.compress = compress;
    let mut co = ConvertOptions::new(format);
    co.create = create;
    co.copy.workers = 1;
    let dst = run.join("out.img");
    if let Err(e) = vimg::convert(&src_img, &dst, &co) {
        panic!("{format} {opts:?} -c={compress} of {size} bytes: convert failed: {e}");
    }

    let out = Image::open(&dst, &OpenOptions::with_format(Some(format)))
        .unwrap_or_else(|e| panic!("{format} {opts:?}: vimg cannot open what it wrote: {e}"));
    assert_eq!(out.format(), format);
    let out_size = out.virtual_size();
    assert!(out_size >= size, "{format} {opts:?}: {out_size} < {size}");
    let mut back = vec![0u8; size as usize];
    out.read_at(&mut back, 0).expect("read back");
    if back != disk {
        let at = back.iter().zip(&disk).position(|(a, b)| a != b);
        panic!("{format} {opts:?} -c={compress}: content differs, first at {at:?}");
    }
    let mut tail = vec![0u8; (out_size - size).min(1 << 20) as usize];
    out.read_at(&mut tail, size).expect("read the rounded-up tail");
    assert!(tail.iter().all(|b| *b == 0), "{format} {opts:?}: the rounded-up tail is not zero");

    match out.reader().check() {
        Ok(r) => assert!(
            r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0,
            "{format} {opts:?}: check of what vimg wrote: {:?}",
            r.messages
        ),
        Err(e) if e.kind() == ErrorKind::Unsupported => {}
        Err(e) => panic!("{format} {opts:?}: check failed: {e}"),
    }
    headers_reparse(format, &dst);
    drop(out);
    let _ = std::fs::remove_dir_all(&run);
});

/// parse -> write of the header vimg wrote gives the same bytes.
fn headers_reparse(format: Format, path: &Path) {
    use vimg::formats::{parallels, qcow, qcow2, qed, vdi, vhd, vmdk};
    let Ok(bytes) = std::fs::read(path) else {
        return;
    };
    match format {
        Format::Qcow2 => {
            let h = qcow2::header::Header::parse(&bytes).expect("qcow2 header");
            let mut again = vec![0u8; h.len()];
            h.write_to(&mut again);
            assert_eq!(again, bytes[..h.len()], "qcow2 header: parse -> write differs");
        }
        Format::Vmdk if bytes.starts_with(b"KDMV") => {
            let h = vmdk::header::SparseHeader::parse(&bytes, 0).expect("vmdk header");
            let mut again = vec![0u8; 512];
            h.write_to(&mut again);
            assert_eq!(again, bytes[..512], "vmdk header: parse -> write differs");
        }
        Format::Vpc => {
            let n = bytes.len();
            let f = vhd::header::Footer::parse(&bytes[n - 512..]).expect("vhd footer");
            assert_eq!(f.to_bytes()[..], bytes[n - 512..], "vhd footer: parse -> write differs");
            if f.disk_type == vhd::header::DISK_TYPE_DYNAMIC {
                let at = f.data_offset as usize;
                let h = vhd::header::DynHeader::parse(&bytes[at..at + 1024]).expect("vhd header");
                assert_eq!(h.to_bytes()[..], bytes[at..at + 1024], "vhd header: parse -> write differs");
            }
        }
        Format::Vdi => {
            let h = vdi::header::Header::parse(&bytes).expect("vdi header");
            assert_eq!(h.to_bytes()[..], bytes[..512], "vdi header: parse -> write differs");
        }
        Format::Qcow => {
            let h = qcow::header::Header::parse(&bytes).expect("qcow header");
            let mut again = [0u8; qcow::header::HEADER_SIZE];
            h.write_to(&mut again);
            assert_eq!(again[..], bytes[..again.len()], "qcow header: parse -> write differs");
        }
        Format::Qed => {
            let h = qed::header::Header::parse(&bytes).expect("qed header");
            let mut again = [0u8; qed::header::HEADER_SIZE];
            h.write_to(&mut again);
            assert_eq!(again[..], bytes[..again.len()], "qed header: parse -> write differs");
        }
        Format::Parallels => {
            let h = parallels::header::Header::parse(&bytes).expect("parallels header");
            let mut again = [0u8; parallels::header::HEADER_SIZE];
            h.write_to(&mut again);
            assert_eq!(again[..], bytes[..again.len()], "parallels header: parse -> write differs");
        }
        _ => {}
    }
}

//! The metadata memory cap (`vimg::limits`), held against worst-case images: tables at
//! the limit open, tables past it are refused without being read, and no open image makes
//! vimg hold more than `MAX_METADATA_BYTES` of metadata. Each image is a sparse file (up to
//! a few TiB long, a few dozen MiB on disk) written by hand; vimg runs under an
//! address-space limit of [`ADDRESS_SPACE`] with its peak RSS measured by GNU time.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use common::*;
use vimg::limits::{MAX_METADATA_BYTES, MAX_TABLE_BYTES};

const MIB: u64 = 1 << 20;
/// RLIMIT_AS of every run: twice the metadata cap.
const ADDRESS_SPACE: u64 = 2 * MAX_METADATA_BYTES;
/// What a run may use beyond the metadata cap: the program, I/O buffers, allocator slack.
const SLACK: u64 = 48 * MIB;
/// Peak RSS of a run that refuses an image before reading its tables.
const REFUSED_RSS: u64 = 32 * MIB;
const TIME: &str = "/usr/bin/time";

/// Runs vimg under the address-space limit; returns (exit code, stderr, peak RSS bytes).
fn run(args: &[&str]) -> (Option<i32>, String, u64) {
    let rss = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(TIME);
    cmd.args(["-f", "%M", "-o", s(rss.path())])
        .arg(vimg_bin())
        .args(args);
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: ADDRESS_SPACE as libc::rlim_t,
                rlim_max: ADDRESS_SPACE as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let text = fs::read_to_string(rss.path()).unwrap();
    let kib: u64 = text
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("time wrote {text:?}"));
    (
        out.status.code().filter(|c| *c < 128),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        kib * 1024,
    )
}

/// The image opens (`info`), and, where `walk`, its whole mapping is walked (`map`), within
/// the cap.
#[track_caller]
fn assert_opens_within_cap(img: &Path, what: &str, walk: bool) {
    let mut cmds = vec![vec!["info", s(img)]];
    if walk {
        cmds.push(vec!["map", "--output=json", s(img)]);
    }
    for c in cmds {
        let (code, err, rss) = run(&c);
        assert_eq!(code, Some(0), "{what}: {c:?}: {err}");
        assert!(
            rss < MAX_METADATA_BYTES + SLACK,
            "{what}: {c:?} peaked at {} MiB",
            rss >> 20
        );
        eprintln!("{what:<48} {:<5} peak RSS {:>4} MiB", c[0], rss >> 20);
    }
}

/// The image is refused with `needle` in the message, without reading its tables.
#[track_caller]
fn assert_refused_unread(img: &Path, what: &str, needle: &str) {
    let (code, err, rss) = run(&["info", s(img)]);
    assert_eq!(code, Some(1), "{what}: {err}");
    assert!(err.contains(needle), "{what}: {err}");
    assert!(rss < REFUSED_RSS, "{what}: peaked at {} MiB", rss >> 20);
    eprintln!("{what:<48} refused peak RSS {:>4} MiB", rss >> 20);
}

fn be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn le32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn le64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes `n` table entries, `entry(i)` encoded by `put`, in 1 MiB pieces.
fn write_table(f: &File, at: u64, n: u64, width: usize, put: impl Fn(u64, &mut [u8])) {
    let per = (MIB as usize) / width;
    let mut buf = vec![0u8; per * width];
    let mut i = 0;
    while i < n {
        let k = (n - i).min(per as u64) as usize;
        for j in 0..k {
            put(i + j as u64, &mut buf[j * width..(j + 1) * width]);
        }
        f.write_all_at(&buf[..k * width], at + i * width as u64)
            .unwrap();
        i += k as u64;
    }
}

/// A qcow2 image with 512-byte clusters: `l1` L1 entries, each on its own L2 table
/// (`spacing` clusters apart, so the metadata map cannot merge them), and `data` data
/// clusters `stride` bytes apart named by the first L2 tables.
fn qcow2(p: &Path, l1: u64, spacing: u64, data: u64, stride: u64) {
    const CS: u64 = 512;
    let l1_off = CS;
    let rt_off = l1_off + (l1 * 8).div_ceil(CS) * CS;
    let l2_base = rt_off + CS;
    let mut end = l2_base + l1 * spacing * CS;
    let f = File::create(p).unwrap();
    let mut h = [0u8; 104];
    h[..4].copy_from_slice(b"QFI\xfb");
    be32(&mut h, 4, 3);
    be32(&mut h, 20, 9);
    be64(&mut h, 24, l1 * 64 * CS);
    be32(&mut h, 36, l1 as u32);
    be64(&mut h, 40, l1_off);
    be64(&mut h, 48, rt_off);
    be32(&mut h, 56, 1);
    be32(&mut h, 96, 4);
    be32(&mut h, 100, 104);
    f.write_all_at(&h, 0).unwrap();
    write_table(&f, l1_off, l1, 8, |i, b| {
        be64(b, 0, 1 << 63 | (l2_base + i * spacing * CS))
    });
    let first = end;
    for t in 0..data.div_ceil(64) {
        let n = (data - t * 64).min(64);
        write_table(&f, l2_base + t * spacing * CS, n, 8, |k, b| {
            be64(b, 0, 1 << 63 | (first + (t * 64 + k) * stride))
        });
    }
    end += data * stride;
    f.set_len(end).unwrap();
}

#[test]
fn qcow2_tables_at_and_past_the_limit() {
    if !tool_available("qcow2_tables_at_and_past_the_limit", TIME) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // An L1 of 32 MiB (QEMU's limit), every entry on its own L2 table: 4 Mi tables, 4 GiB
    // of (sparse) file. Open holds the L1 and a 4 Mi-range metadata map.
    let p = dir.path().join("l1.qcow2");
    qcow2(&p, MAX_TABLE_BYTES / 8, 2, 0, 0);
    assert_opens_within_cap(&p, "qcow2: L1 of 32 MiB, 4 Mi L2 tables", false);
    // One entry more: refused before the table is read.
    let p = dir.path().join("l1big.qcow2");
    qcow2(&p, MAX_TABLE_BYTES / 8 + 1, 1, 0, 0);
    assert_refused_unread(&p, "qcow2: L1 of 32 MiB + 8 bytes", "larger than 32 MiB");
    // 70400 data clusters 16 MiB apart in a 1 TiB file: the sharing check's set would grow
    // by 4 KiB per cluster, to 275 MiB; it stops at the cap.
    let p = dir.path().join("used.qcow2");
    qcow2(&p, 1100, 1, 1100 * 64, 16 * MIB);
    let (code, err, rss) = run(&["map", "--output=json", s(&p)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("metadata memory limit"), "{err}");
    assert!(
        rss < MAX_METADATA_BYTES + SLACK,
        "peaked at {} MiB",
        rss >> 20
    );
    eprintln!(
        "{:<48} map   peak RSS {:>4} MiB (refused at the cap)",
        "qcow2: 70400 clusters 16 MiB apart",
        rss >> 20
    );
    // Both at once: the 32 MiB L1 and its metadata map stay resident, so the set may grow
    // only to what is left of the cap (it used to grow to the whole cap on top of them).
    let p = dir.path().join("both.qcow2");
    qcow2(&p, MAX_TABLE_BYTES / 8, 2, 1100 * 64, 16 * MIB);
    let (code, err, rss) = run(&["map", "--output=json", s(&p)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("metadata memory limit"), "{err}");
    assert!(
        rss < MAX_METADATA_BYTES + SLACK,
        "peaked at {} MiB",
        rss >> 20
    );
    eprintln!(
        "{:<48} map   peak RSS {:>4} MiB (refused at the cap)",
        "qcow2: both",
        rss >> 20
    );
}

/// A dynamic VHD of `size` bytes in `block`-byte blocks, every block allocated, or a BAT
/// claiming `entries` entries.
fn vhd(p: &Path, size: u64, block: u64, entries: u64, allocate: bool) {
    fn sum(b: &[u8]) -> u32 {
        !b.iter().fold(0u32, |a, x| a.wrapping_add(u32::from(*x)))
    }
    let footer = |b: &mut [u8; 512]| {
        b[..8].copy_from_slice(b"conectix");
        be32(b, 8, 2);
        be32(b, 12, 0x10000);
        be64(b, 16, 512);
        b[28..32].copy_from_slice(b"vimg");
        be32(b, 32, 0x10000);
        b[36..40].copy_from_slice(b"Wi2k");
        be64(b, 40, size);
        be64(b, 48, size);
        b[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
        be32(b, 60, 3);
        let c = sum(b);
        be32(b, 64, c);
    };
    let mut foot = [0u8; 512];
    footer(&mut foot);
    let bat = 1536u64;
    let data0 = bat + (entries * 4).div_ceil(512) * 512;
    let slot = block + 512;
    let mut h = [0u8; 1024];
    h[..8].copy_from_slice(b"cxsparse");
    be64(&mut h, 8, u64::MAX);
    be64(&mut h, 16, bat);
    be32(&mut h, 24, 0x10000);
    be32(&mut h, 28, entries as u32);
    be32(&mut h, 32, block as u32);
    let c = sum(&h);
    be32(&mut h, 36, c);
    let f = File::create(p).unwrap();
    f.write_all_at(&foot, 0).unwrap();
    f.write_all_at(&h, 512).unwrap();
    write_table(&f, bat, entries, 4, |i, b| {
        let v = if allocate {
            ((data0 + i * slot) / 512) as u32
        } else {
            u32::MAX
        };
        be32(b, 0, v)
    });
    let end = if allocate {
        data0 + entries * slot
    } else {
        data0
    };
    f.write_all_at(&foot, end).unwrap();
}

#[test]
fn vhd_bat_at_and_past_the_limit() {
    if !tool_available("vhd_bat_at_and_past_the_limit", TIME) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 2040 GiB (the VHD maximum) in 256 KiB blocks: 8 Mi BAT entries (32 MiB), every block
    // allocated (a 2 TiB sparse file).
    let p = dir.path().join("bat.vhd");
    let size = 2040u64 << 30;
    let block = 256 << 10;
    vhd(&p, size, block, size / block, true);
    assert_opens_within_cap(&p, "vhd: 32 MiB BAT, 8 Mi allocated blocks", false);
    // A BAT past the limit: refused unread.
    let p = dir.path().join("batbig.vhd");
    vhd(&p, size, block, MAX_TABLE_BYTES / 4 + 1, false);
    assert_refused_unread(&p, "vhd: BAT of 32 MiB + 4 bytes", "too large");
}

/// A dynamic VDI with `blocks` 1 MiB blocks, all allocated in order.
fn vdi(p: &Path, blocks: u64) {
    let mut h = [0u8; 512];
    let text = b"<<< Oracle VM VirtualBox Disk Image >>>\n";
    h[..text.len()].copy_from_slice(text);
    let bmap = 0x200u64;
    let data = (bmap + (blocks * 4).div_ceil(512) * 512).div_ceil(MIB) * MIB;
    le32(&mut h, 0x40, 0xbeda_107f);
    le32(&mut h, 0x44, 0x0001_0001);
    le32(&mut h, 0x48, 0x190);
    le32(&mut h, 0x4c, 1);
    le32(&mut h, 0x154, bmap as u32);
    le32(&mut h, 0x158, data as u32);
    le32(&mut h, 0x168, 512);
    le64(&mut h, 0x170, blocks * MIB);
    le32(&mut h, 0x178, MIB as u32);
    le32(&mut h, 0x180, blocks as u32);
    le32(&mut h, 0x184, blocks as u32);
    let f = File::create(p).unwrap();
    f.write_all_at(&h, 0).unwrap();
    write_table(&f, bmap, blocks, 4, |i, b| le32(b, 0, i as u32));
    f.set_len(data + blocks * MIB).unwrap();
}

#[test]
fn vdi_block_map_at_and_past_the_limit() {
    if !tool_available("vdi_block_map_at_and_past_the_limit", TIME) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 8 Mi blocks (a 32 MiB block map): an 8 TiB disk, every block allocated.
    let p = dir.path().join("map.vdi");
    vdi(&p, MAX_TABLE_BYTES / 4);
    assert_opens_within_cap(&p, "vdi: 32 MiB block map, 8 Mi allocated blocks", true);
    let p = dir.path().join("mapbig.vdi");
    vdi(&p, MAX_TABLE_BYTES / 4 + 1);
    assert_refused_unread(&p, "vdi: block map of 32 MiB + 4 bytes", "too large");
}

/// A monolithicSparse VMDK with 64 KiB grains and a grain directory of `gd` entries, the
/// first `gts` of which name a grain table.
fn vmdk(p: &Path, gd: u64, gts: u64) {
    let grain = 128u64;
    let cap = gd * 512 * grain;
    let name = p.file_name().unwrap().to_str().unwrap();
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"monolithicSparse\"\nRW {cap} SPARSE \"{name}\"\n"
    );
    let gd_sec = 21u64;
    let gt0 = gd_sec + (gd * 4).div_ceil(512);
    let overhead = (gt0 + gts * 4).div_ceil(grain) * grain;
    let mut h = [0u8; 512];
    le32(&mut h, 0, 0x564d_444b);
    le32(&mut h, 4, 1);
    le32(&mut h, 8, 3);
    le64(&mut h, 0x0c, cap);
    le64(&mut h, 0x14, grain);
    le64(&mut h, 0x1c, 1);
    le64(&mut h, 0x24, 20);
    le32(&mut h, 0x2c, 512);
    le64(&mut h, 0x38, gd_sec);
    le64(&mut h, 0x40, overhead);
    h[0x49..0x4d].copy_from_slice(b"\n \r\n");
    let f = File::create(p).unwrap();
    f.write_all_at(&h, 0).unwrap();
    f.write_all_at(desc.as_bytes(), 512).unwrap();
    write_table(&f, gd_sec * 512, gts, 4, |i, b| {
        le32(b, 0, (gt0 + 4 * i) as u32)
    });
    f.set_len(overhead * 512 + MIB).unwrap();
}

#[test]
fn vmdk_grain_directory_at_and_past_the_limit() {
    if !tool_available("vmdk_grain_directory_at_and_past_the_limit", TIME) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A 32 MiB grain directory (256 TiB of 64 KiB grains), its first 64 Ki grain tables
    // present: every table is read and checked once.
    let p = dir.path().join("gd.vmdk");
    vmdk(&p, MAX_TABLE_BYTES / 4, 1 << 16);
    assert_opens_within_cap(&p, "vmdk: 32 MiB grain directory, 64 Ki tables", true);
    let p = dir.path().join("gdbig.vmdk");
    vmdk(&p, MAX_TABLE_BYTES / 4 + 1, 0);
    assert_refused_unread(&p, "vmdk: grain directory of 32 MiB + 4 bytes", "limit");
}

#[test]
fn vhdx_bat_at_and_past_the_limit() {
    if !qemu_available("vhdx_bat_at_and_past_the_limit")
        || !tool_available("vhdx_bat_at_and_past_the_limit", TIME)
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 4 190 000 MiB in 1 MiB blocks: a BAT of 4 191 022 entries (just under 32 MiB), every
    // payload block made present (a 4 TiB sparse file).
    let p = dir.path().join("bat.vhdx");
    let size = 4_190_000u64 * MIB;
    let arg = format!("{}M", size / MIB);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M,log_size=1M",
        s(&p),
        &arg,
    ]);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let mut rt = vec![0u8; 65536];
    f.read_exact_at(&mut rt, 0x30000).unwrap();
    let bat_guid: [u8; 16] = [
        0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a,
        0x08,
    ];
    let n = u32::from_le_bytes(rt[8..12].try_into().unwrap()) as usize;
    let bat = (0..n)
        .map(|i| &rt[16 + 32 * i..48 + 32 * i])
        .find(|e| e[..16] == bat_guid)
        .map(|e| u64::from_le_bytes(e[16..24].try_into().unwrap()))
        .unwrap();
    let blocks = size / MIB;
    let chunk = 4096u64; // 2^23 sectors of 512 bytes per bitmap, 1 MiB blocks
    let entries = blocks + (blocks - 1) / chunk;
    assert!(entries * 8 <= MAX_TABLE_BYTES);
    let end = f.metadata().unwrap().len().div_ceil(MIB) * MIB;
    write_table(&f, bat, entries, 8, |i, b| {
        let v = if (i + 1) % (chunk + 1) == 0 {
            0 // a sector bitmap entry
        } else {
            let block = i - i / (chunk + 1);
            (end + block * MIB) | 6
        };
        le64(b, 0, v)
    });
    f.set_len(end + blocks * MIB).unwrap();
    drop(f);
    assert_opens_within_cap(&p, "vhdx: 32 MiB BAT, 4 Mi present blocks", true);
    // A larger disk needs a BAT past the limit: refused unread.
    let p = dir.path().join("batbig.vhdx");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M,log_size=1M",
        s(&p),
        "4200000M",
    ]);
    assert_refused_unread(&p, "vhdx: BAT past 32 MiB", "too large");
}

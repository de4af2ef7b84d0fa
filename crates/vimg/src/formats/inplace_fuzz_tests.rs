//! Regression tests for what hunting the in-place code of the block-table formats found
//! (the fuzz targets `bat_update`, `qed_update` and `repair`, and by hand while they were
//! written: headers claiming huge units over tiny files; fuzz/README.md). Images are built
//! here by hand.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::formats::updater;
use crate::formats::Format;
use crate::gate::ExternalPolicy;
use crate::image::{Image, OpenOptions};

/// Writes `data` at `off` through the updater, then checks that the file occupies less
/// than 4 MiB and that the guest reads `data` there and zeros around it.
fn write_stays_small(path: &Path, format: Format, off: u64, data: &[u8]) {
    {
        let mut up = updater::open(path, format, ExternalPolicy::SameFolder).unwrap();
        let mut t = up.data().unwrap();
        t.write_at(off, data, None).unwrap();
        t.finish().unwrap();
    }
    let used = std::fs::metadata(path).unwrap().blocks() * 512;
    assert!(used < 4 << 20, "{format:?}: the file occupies {used} bytes");
    let img = Image::open(path, &OpenOptions::with_format(Some(format))).unwrap();
    let mut buf = vec![0xeeu8; 8192];
    img.read_at(&mut buf, 0).unwrap();
    let o = off as usize;
    assert!(buf[..o].iter().all(|b| *b == 0));
    assert_eq!(&buf[o..o + data.len()], data);
    assert!(buf[o + data.len()..].iter().all(|b| *b == 0));
    assert_eq!(crate::image::check(&img).unwrap().corruptions, 0);
}

/// Found by hand while writing `bat_update` (`vimg convert -n` of 64 KiB wrote 2 GB in 23 s): a
/// 1 KiB Parallels file whose header claims 2 GB clusters (4 000 000 sectors, under QEMU's
/// limit) made a write of a few bytes allocate and write a whole zeroed cluster. Now only
/// the bytes written are written; the new cluster past the old end of the file is a hole.
#[test]
fn parallels_write_into_a_huge_cluster_writes_only_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.hds");
    let mut b = vec![0u8; 1024];
    b[..16].copy_from_slice(b"WithoutFreeSpace");
    b[0x10..0x14].copy_from_slice(&2u32.to_le_bytes()); // version
    b[0x14..0x18].copy_from_slice(&16u32.to_le_bytes()); // heads
    b[0x1c..0x20].copy_from_slice(&4_000_000u32.to_le_bytes()); // sectors per cluster
    b[0x20..0x24].copy_from_slice(&1u32.to_le_bytes()); // BAT entries
    b[0x24..0x2c].copy_from_slice(&128u64.to_le_bytes()); // 64 KiB disk
    std::fs::write(&path, &b).unwrap();
    write_stays_small(&path, Format::Parallels, 1000, &[7u8; 3000]);
}

/// Found by hand while writing `bat_update` (`vimg convert -n` of 64 KiB wrote 2 GB in 19 s): a
/// dynamic VHD whose header claims 2 GiB blocks made a write of a few bytes allocate and
/// write a whole zeroed block (and size a 2 GiB buffer). Now the bitmap and the bytes
/// written are written; the rest of the new block past the old end of the file is a hole.
#[test]
fn vhd_write_into_a_huge_block_writes_only_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.vhd");
    crate::convert::create(&path, Format::Vpc, Some(64 << 10), &Default::default()).unwrap();
    let mut b = std::fs::read(&path).unwrap();
    let h = u64::from_be_bytes(b[16..24].try_into().unwrap()) as usize;
    assert_eq!(&b[h..h + 8], b"cxsparse");
    b[h + 0x20..h + 0x24].copy_from_slice(&(1u32 << 31).to_be_bytes());
    b[h + 0x24..h + 0x28].fill(0);
    let sum = b[h..h + 1024]
        .iter()
        .fold(0u32, |s, x| s.wrapping_add(u32::from(*x)));
    b[h + 0x24..h + 0x28].copy_from_slice(&(!sum).to_be_bytes());
    std::fs::write(&path, &b).unwrap();
    write_stays_small(&path, Format::Vpc, 512, &[9u8; 2000]);
    // A zero write into the allocated block needs no block-sized buffer either.
    let mut up = updater::open(&path, Format::Vpc, ExternalPolicy::SameFolder).unwrap();
    let mut t = up.data().unwrap();
    t.write_zeroes(0, 4096, None).unwrap();
    t.finish().unwrap();
}

/// Found by hand while writing `bat_update` (`vimg convert -n` of 64 KiB made a 1 KiB VDI
/// 4 GiB long): a header whose data offset (0x158) or allocated-block count (0x184) puts
/// the next data block far past the end of the file made the first write grow the file
/// by what the header claims. Now refused before anything is written.
#[test]
fn vdi_next_block_past_the_end_of_the_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("far.vdi");
    crate::convert::create(&path, Format::Vdi, Some(4 << 20), &Default::default()).unwrap();
    let good = std::fs::read(&path).unwrap();
    let offset_data = u32::from_le_bytes(good[0x158..0x15c].try_into().unwrap());
    assert_eq!(
        offset_data as usize,
        good.len(),
        "an empty VDI ends at its data area"
    );
    for (at, value) in [(0x158, 0xfff0_0000u32), (0x184, 3u32)] {
        let mut b = good.clone();
        b[at..at + 4].copy_from_slice(&value.to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        let mut up = updater::open(&path, Format::Vdi, ExternalPolicy::SameFolder).unwrap();
        let e = up.data().unwrap_err();
        assert!(e.to_string().contains("past the end of the file"), "{e}");
        drop(up);
        assert_eq!(std::fs::read(&path).unwrap(), b, "nothing written");
    }
    // The image as created takes writes.
    std::fs::write(&path, &good).unwrap();
    write_stays_small(&path, Format::Vdi, 100, &[5u8; 1000]);
}

/// A "WithouFreSpacExt" header: 2-sector clusters unless `tracks` says otherwise.
fn parallels_ext_header(
    tracks: u32,
    bat_entries: u32,
    nb_sectors: u64,
    inuse: u32,
    data_off: u32,
) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..16].copy_from_slice(b"WithouFreSpacExt");
    h[16..20].copy_from_slice(&2u32.to_le_bytes());
    h[28..32].copy_from_slice(&tracks.to_le_bytes());
    h[32..36].copy_from_slice(&bat_entries.to_le_bytes());
    h[36..44].copy_from_slice(&nb_sectors.to_le_bytes());
    h[44..48].copy_from_slice(&inuse.to_le_bytes());
    h[48..52].copy_from_slice(&data_off.to_le_bytes());
    h
}

/// Found by the `repair` target: a 924-byte Parallels file (not whole sectors) with
/// data_off 2 and BAT entries past the end. `check -r all` clears the entries; the reader
/// then refused the image ("data_off lies past the end of the file") where QEMU, which
/// rounds the file up to whole sectors (qemu-img info shows "file length: 1 KiB"), opens
/// it. Now the reader rounds as QEMU does, and a cluster ending in the partial last sector
/// reads its missing tail as zeros, as QEMU reads it.
#[test]
fn parallels_file_not_in_whole_sectors_opens_after_repair() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.hds");
    let mut f = parallels_ext_header(2, 64, 128, 0, 2);
    f.resize(924, 0);
    f[64 + 4 * 43..64 + 4 * 44].copy_from_slice(&0xf7u32.to_le_bytes());
    std::fs::write(&p, &f).unwrap();
    let fmt = Format::Parallels;
    let rep = updater::open_for_repair(&p, fmt, ExternalPolicy::SameFolder)
        .and_then(|mut u| u.repair(crate::formats::qcow2::Repair::All))
        .unwrap();
    assert_eq!(rep.corruptions_fixed, 1);
    let img = Image::open(&p, &OpenOptions::with_format(Some(fmt))).unwrap();
    assert_eq!(crate::image::check(&img).unwrap().corruptions, 0);

    // A cluster (sector 2, 1 KiB) ending 100 bytes past the end of the file.
    let q = dir.path().join("b.hds");
    let mut g = parallels_ext_header(2, 4, 8, 0, 2);
    g[..16].copy_from_slice(b"WithoutFreeSpace");
    g.resize(1024, 0);
    g[64..68].copy_from_slice(&2u32.to_le_bytes());
    g.extend_from_slice(&[0x5au8; 924]);
    std::fs::write(&q, &g).unwrap();
    let img = Image::open(&q, &OpenOptions::with_format(Some(fmt))).unwrap();
    let mut buf = vec![1u8; 1024];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf[..924].iter().all(|b| *b == 0x5a));
    assert!(buf[924..].iter().all(|b| *b == 0));
}

/// Found by the `repair` target: a 624-byte "WithouFreSpacExt" image with 4 KiB clusters,
/// the in-use flag set, data_off 0 and 48 BAT entries past the end. The repair set
/// data_off to the first cluster after the BAT (sector 8), past the end of the file, so
/// every later check found data_off wrong again (and the reader refused the image). QEMU's
/// repair leaves the file grown past that offset; now vimg's grows the file to the data
/// offset it sets. Issue 15: and further, as QEMU's close does, to the end of the data its
/// open found (the 48 clusters that were outside the image): the first repair reports 50
/// corruptions and leaves 200704 bytes, the second gives back 48 leaked clusters, a third
/// finds nothing (qemu-img check -r all, run three times, says the same).
#[test]
fn parallels_data_off_fixed_past_the_end_grows_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.hds");
    let mut f = parallels_ext_header(8, 48, 384, 0x746f_6e59, 0);
    f.resize(624, 0);
    for i in 0..48u32 {
        let at = 64 + 4 * i as usize;
        f[at..at + 4].copy_from_slice(&(i + 1).to_le_bytes());
    }
    std::fs::write(&p, &f).unwrap();
    let fmt = Format::Parallels;
    let repair = || {
        updater::open_for_repair(&p, fmt, ExternalPolicy::SameFolder)
            .and_then(|mut u| u.repair(crate::formats::qcow2::Repair::All))
            .unwrap()
    };
    let first = repair();
    assert_eq!(
        (first.corruptions_fixed, first.leaks_fixed),
        (50, 0),
        "{first:?}"
    );
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 49 * 4096);
    let mut again = updater::open_for_repair(&p, fmt, ExternalPolicy::SameFolder).unwrap();
    let second = again.repair(crate::formats::qcow2::Repair::All).unwrap();
    assert_eq!(
        (second.corruptions_fixed, second.leaks_fixed),
        (0, 48),
        "{second:?}"
    );
    drop(again);
    let third = repair();
    assert_eq!(
        (third.corruptions_fixed, third.leaks_fixed),
        (0, 0),
        "{third:?}"
    );
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 4096);
    let img = Image::open(&p, &OpenOptions::with_format(Some(fmt))).unwrap();
    assert_eq!(crate::image::check(&img).unwrap().corruptions, 0);
}

/// Found by the `repair` target (issue 15's run): a QED image whose L2 table holds a
/// valid cluster followed by an entry near 2^64. The fragmentation count added the
/// cluster size to the previous entry before judging the entry (as QEMU's qed_check does,
/// in wrapping arithmetic) and overflowed; now it wraps as QEMU's does, the entry is a
/// corruption, and `-r leaks` and `-r all` both finish.
#[test]
fn qed_l2_entry_near_the_top_of_u64_is_a_corruption() {
    let cs = 4096usize;
    let mut f = vec![0u8; 6 * cs];
    f[..4].copy_from_slice(b"QED\0");
    f[4..8].copy_from_slice(&(cs as u32).to_le_bytes());
    f[8..12].copy_from_slice(&2u32.to_le_bytes()); // table_size: two clusters
    f[12..16].copy_from_slice(&1u32.to_le_bytes()); // header_size: one cluster
    f[40..48].copy_from_slice(&(cs as u64).to_le_bytes()); // L1 at cluster 1
    f[48..56].copy_from_slice(&(64u64 << 20).to_le_bytes()); // image_size
    f[cs..cs + 8].copy_from_slice(&(3 * cs as u64).to_le_bytes()); // L1[0] -> L2
    let l2 = 3 * cs;
    f[l2..l2 + 8].copy_from_slice(&(5 * cs as u64).to_le_bytes());
    f[l2 + 8..l2 + 16].copy_from_slice(&(u64::MAX - 0xfff).to_le_bytes());
    f[l2 + 16..l2 + 24].copy_from_slice(&(5 * cs as u64).to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qed");
    for mode in [
        crate::formats::qcow2::Repair::Leaks,
        crate::formats::qcow2::Repair::All,
    ] {
        std::fs::write(&p, &f).unwrap();
        let rep = updater::open_for_repair(&p, Format::Qed, ExternalPolicy::SameFolder)
            .and_then(|mut u| u.repair(mode))
            .unwrap();
        assert!(rep.before.corruptions >= 1, "{mode:?}: {rep:?}");
    }
}

/// Found by the `repair` target (issue 15's run): a Parallels file of 845 bytes whose
/// header claims huge clusters and a wrong data_off. The fixed data offset is the first
/// cluster after the BAT, and the repair grew the file to it (872 MB). Now a repair whose
/// data area would start past twice the file's length plus 1 MiB is refused before
/// anything is written.
#[test]
fn parallels_repair_refuses_a_data_area_far_past_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.hds");
    // 1 GiB clusters (2^21 sectors), 4 BAT entries, data_off 1 (inside the BAT).
    let mut f = parallels_ext_header(1 << 21, 4, 1 << 23, 0, 1);
    f.resize(845, 0);
    std::fs::write(&p, &f).unwrap();
    let e = updater::open_for_repair(&p, Format::Parallels, ExternalPolicy::SameFolder)
        .and_then(|mut u| u.repair(crate::formats::qcow2::Repair::All))
        .unwrap_err();
    assert!(e.to_string().contains("data area would start"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), f, "nothing written");
}

/// Found by the `repair` target (issue 15's run): a QED image with a corrupt table entry
/// and a backing file name size of 0x4f0001 (the backing-file feature set). The reader
/// refused the tables first (corrupt), so `check -r` opened it with the header alone and
/// cleared the entry; the next open then refused the backing file name, so the repaired
/// image could not be opened again. Now the repair-only open checks that field too and
/// refuses, before anything is written.
#[test]
fn qed_repair_refuses_a_bad_backing_name_before_writing() {
    let cs = 4096usize;
    let mut f = vec![0u8; 6 * cs];
    f[..4].copy_from_slice(b"QED\0");
    f[4..8].copy_from_slice(&(cs as u32).to_le_bytes());
    f[8..12].copy_from_slice(&2u32.to_le_bytes());
    f[12..16].copy_from_slice(&1u32.to_le_bytes());
    f[16..24].copy_from_slice(&1u64.to_le_bytes()); // backing file
    f[40..48].copy_from_slice(&(cs as u64).to_le_bytes());
    f[48..56].copy_from_slice(&(64u64 << 20).to_le_bytes());
    f[56..60].copy_from_slice(&0x40u32.to_le_bytes());
    f[60..64].copy_from_slice(&0x004f_0001u32.to_le_bytes());
    f[cs..cs + 8].copy_from_slice(&0x1234u64.to_le_bytes()); // misaligned L1 entry
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qed");
    std::fs::write(&p, &f).unwrap();
    let e = updater::open_for_repair(&p, Format::Qed, ExternalPolicy::SameFolder)
        .and_then(|mut u| u.repair(crate::formats::qcow2::Repair::All))
        .unwrap_err();
    assert!(e.to_string().contains("backing file name size"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), f, "nothing written");
}

/// Found by the `repair` target (issue 15's run): a Parallels image whose BAT (832
/// entries, ending at 0xd40) has an entry pointing inside the BAT itself: the "last
/// cluster" then ends inside the BAT, and the leak repair cut the file there, leaving a
/// BAT past the end of the file that no open accepts. The cut never goes below the BAT.
#[test]
fn parallels_leak_cut_never_cuts_into_the_bat() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.hds");
    let mut f = parallels_ext_header(1, 832, 832, 0, 0);
    f[..16].copy_from_slice(b"WithoutFreeSpace");
    f.resize(0x1000, 0);
    f[64..68].copy_from_slice(&4u32.to_le_bytes()); // cluster 0 at sector 4, in the BAT
    std::fs::write(&p, &f).unwrap();
    let _ = updater::open_for_repair(&p, Format::Parallels, ExternalPolicy::SameFolder)
        .and_then(|mut u| u.repair(crate::formats::qcow2::Repair::All));
    assert!(std::fs::metadata(&p).unwrap().len() >= 0xd40);
    updater::open_for_repair(&p, Format::Parallels, ExternalPolicy::SameFolder).unwrap();
}

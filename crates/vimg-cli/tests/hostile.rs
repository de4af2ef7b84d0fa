//! The hostile-input suite (issue 5), in one table: every case is an image qemu-img made,
//! patched at test time, with the field it breaks, the value it puts there and the error
//! kind vimg must answer with.
//!
//! For each row:
//! - through the library: open and read every mapped byte; the result must be an error of
//!   the expected [`ErrorKind`], within [`LIB_SECONDS`];
//! - through the CLI: `vimg convert -O raw` under an address-space limit of
//!   [`CLI_ADDRESS_SPACE`]; it must exit 1 with a `vimg: ` message (no panic, no signal),
//!   within [`CLI_SECONDS`], with a peak RSS under [`CLI_MAX_RSS`] (measured by `wait4`),
//!   and leave nothing in the output folder;
//! - for the external-file rows, the named file (when there is one) is filled with
//!   [`SECRET`], and no output and no message may contain it. The positive controls at the
//!   end show the same images do leak it with `--allow-external`, so the setup is real.
//!
//! The per-format suites (qcow2.rs, vmdk.rs, vhd.rs, vdi.rs, vhdx.rs) hold more cases of
//! the same kinds, with their exact messages; this table is the one place that shows every
//! class of hostile input for every format side by side.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use vimg::formats::qcow2::header::{Header as QHeader, L1E_OFFSET_MASK};
use vimg::formats::vdi::header::Header as VdiHeader;
use vimg::formats::vhd::header::{DynHeader, Footer, FOOTER_COOKIE};
use vimg::formats::vhdx::header::{
    checksum_with_zeroed_field, Guid, MetadataEntry, MetadataTable, ParentLocator, RegionTable,
    BAT_GUID, FILE_PARAMETERS_GUID, METADATA_GUID, METADATA_TABLE_SIZE, META_IS_REQUIRED,
    PARAM_HAS_PARENT, PARENT_LOCATOR_GUID, PARENT_TYPE_VHDX_GUID, REGION_TABLE_SIZE,
    VIRTUAL_DISK_SIZE_GUID,
};
use vimg::formats::vmdk::header::SparseHeader;
use vimg::{ErrorKind, ExternalPolicy, Format, Image, OpenOptions};

const MIB: u64 = 1 << 20;
/// The bytes every file a hostile image names is filled with.
const SECRET: &[u8; 16] = b"VIMG-SECRET-5EC!";
/// Time a library open-and-read of one case may take.
const LIB_SECONDS: u64 = 5;
/// Time one CLI run may take (a debug build, on a shared machine).
const CLI_SECONDS: u64 = 15;
/// RLIMIT_AS of the CLI runs: twice vimg's metadata cap, so an attempt to allocate what a
/// header claims fails the run instead of succeeding quietly.
const CLI_ADDRESS_SPACE: u64 = 2 * vimg::limits::MAX_METADATA_BYTES;
/// Peak RSS a CLI run on a hostile image may reach.
const CLI_MAX_RSS: u64 = 64 * MIB;

// ---------------------------------------------------------------------------------------
// The table

/// One hostile image.
struct Case {
    /// Unique; also the image's file name.
    name: &'static str,
    /// The format the image is made as (qemu-img's name).
    format: &'static str,
    /// Opened without `-f` (polyglots); otherwise with `-f format`.
    probe: bool,
    /// What the patch breaks.
    field: &'static str,
    /// The hostile value, in words.
    value: &'static str,
    /// What vimg must answer.
    expect: ErrorKind,
    /// Opened with `--allow-external`: for names the folder rule alone would already stop
    /// (devices, protocol paths), this shows the other rules stop them too.
    allow_external: bool,
    /// Makes the image in the image folder; returns its path.
    build: fn(&Env, &str) -> PathBuf,
}

#[rustfmt::skip]
fn cases() -> Vec<Case> {
    use ErrorKind::{Corrupt, Invalid, UnsafeReference, Unsupported};
    fn c(name: &'static str, format: &'static str, field: &'static str, value: &'static str,
         expect: ErrorKind, build: fn(&Env, &str) -> PathBuf) -> Case {
        Case { name, format, probe: false, field, value, expect, allow_external: false, build }
    }
    fn trusted(mut case: Case) -> Case {
        case.allow_external = true;
        case
    }
    fn probed(mut case: Case) -> Case {
        case.probe = true;
        case
    }
    vec![
        // ---- qcow2
        c("q-version", "qcow2", "header version", "4", Invalid, |e, n| e.qcow2(n, |p, _| wr32be(p, 4, 4))),
        c("q-cluster-bits", "qcow2", "header cluster_bits", "22 (4 MiB clusters)", Invalid, |e, n| e.qcow2(n, |p, _| wr32be(p, 20, 22))),
        c("q-l1-over-limit", "qcow2", "header l1_size", "0x01000000 (128 MiB of L1)", Invalid, |e, n| e.qcow2(n, |p, _| wr32be(p, 36, 0x0100_0000))),
        c("q-l1-past-eof", "qcow2", "header l1_size", "0x00400000 (32 MiB of L1 in a small file)", Corrupt, |e, n| e.qcow2(n, |p, _| wr32be(p, 36, 0x0040_0000))),
        c("q-reftable-over-limit", "qcow2", "header refcount_table_clusters", "0x10000", Invalid, |e, n| e.qcow2(n, |p, _| wr32be(p, 56, 0x1_0000))),
        c("q-snapshots", "qcow2", "header nb_snapshots", "100000", Invalid, |e, n| e.qcow2(n, |p, l| { wr32be(p, 60, 100_000); wr64be(p, 64, l.cs * 8); })),
        c("q-huge-size", "qcow2", "header size", "2^60 bytes", Unsupported, |e, n| e.qcow2(n, |p, _| wr64be(p, 24, 1 << 60))),
        c("q-huge-size-tiny-l1", "qcow2", "header size", "2^50 bytes with a 1-entry L1", Invalid, |e, n| e.qcow2(n, |p, _| wr64be(p, 24, 1 << 50))),
        c("q-incompatible", "qcow2", "header incompatible_features", "bit 20", Unsupported, |e, n| e.qcow2(n, |p, _| wr64be(p, 72, 1 << 20))),
        c("q-encrypted", "qcow2", "header crypt_method", "2 (LUKS) without the encryption header extension", Invalid, |e, n| e.qcow2(n, |p, _| wr32be(p, 32, 2))),
        c("q-extension-length", "qcow2", "header extension length", "1 MiB", Invalid, |e, n| e.qcow2(n, |p, _| wr32be(p, 0x74, MIB as u32))),
        c("q-l2-past-eof", "qcow2", "L2 entry 0", "a cluster 16 clusters past EOF", Corrupt, |e, n| e.qcow2(n, |p, l| wr64be(p, l.l2, ((size_of(p).div_ceil(l.cs) + 16) * l.cs) | (1 << 63)))),
        c("q-l1-self", "qcow2", "L1 entry 0", "the L1 table itself", Corrupt, |e, n| e.qcow2(n, |p, l| wr64be(p, l.h.l1_table_offset, l.h.l1_table_offset | 1 << 63))),
        c("q-l2-into-reftable", "qcow2", "L2 entry 0", "the refcount table", Corrupt, |e, n| e.qcow2(n, |p, l| wr64be(p, l.l2, l.h.refcount_table_offset | 1 << 63))),
        c("q-l2-into-header", "qcow2", "L2 entry 0", "offset 0 with the copied flag (the header; qemu reads it as unallocated)", Corrupt, |e, n| e.qcow2(n, |p, l| wr64be(p, l.l2, 1 << 63))),
        c("q-l2-reserved", "qcow2", "L2 entry 0", "reserved bit 60 set", Corrupt, |e, n| e.qcow2(n, |p, l| wr64be(p, l.l2, rd64be(p, l.l2) | 1 << 60))),
        c("q-l2-unaligned", "qcow2", "L2 entry 0", "offset + 512", Corrupt, |e, n| e.qcow2(n, |p, l| wr64be(p, l.l2, rd64be(p, l.l2) + 512))),
        c("q-amplification", "qcow2", "every L2 entry", "the first data cluster", Corrupt, |e, n| e.qcow2(n, |p, l| {
            let entry = rd64be(p, l.l2);
            patch(p, l.l2, &entry.to_be_bytes().repeat((l.cs / 8) as usize));
        })),
        c("q-compressed-size", "qcow2", "compressed cluster", "a deflate stream of 32 KiB", Corrupt, |e, n| e.qcow2_compressed(n)),
        c("q-truncated", "qcow2", "file length", "cut inside the first L2 table", Corrupt, |e, n| e.qcow2(n, |p, l| truncate(p, l.l2 + 100))),
        c("q-empty", "qcow2", "file length", "0", Invalid, |e, n| e.empty(n, "qcow2")),
        c("q-backing-absolute", "qcow2", "backing file name", "absolute path of the secret", UnsafeReference, |e, n| e.qcow2_backing(n, &e.secret("raw"))),
        c("q-backing-dotdot", "qcow2", "backing file name", "../secret.raw", UnsafeReference, |e, n| e.qcow2_backing(n, "../secret.raw")),
        c("q-backing-symlink", "qcow2", "backing file name", "a symlink in the folder to ../secret.raw", UnsafeReference, |e, n| e.qcow2_backing(n, "link-secret.raw")),
        c("q-backing-fifo", "qcow2", "backing file name", "a FIFO in the folder (opening it would block)", UnsafeReference, |e, n| { let f = e.fifo(n); e.qcow2_backing(n, &f) }),
        trusted(c("q-backing-device", "qcow2", "backing file name", "/dev/zero (trusted)", UnsafeReference, |e, n| e.qcow2_backing(n, "/dev/zero"))),
        trusted(c("q-backing-json", "qcow2", "backing file name", "json:{\"file.filename\":\"/etc/passwd\"} (trusted)", UnsafeReference, |e, n| e.qcow2_backing(n, "json:{\"file.driver\":\"file\",\"file.filename\":\"/etc/passwd\"}"))),
        trusted(c("q-backing-nbd", "qcow2", "backing file name", "nbd://127.0.0.1:10809/x (trusted)", UnsafeReference, |e, n| e.qcow2_backing(n, "nbd://127.0.0.1:10809/x"))),
        c("q-datafile-absolute", "qcow2", "external data file name", "absolute path of the secret", UnsafeReference, |e, n| e.qcow2_data_file(n, &e.secret("raw"))),
        c("q-datafile-dotdot", "qcow2", "external data file name", "../secret.raw", UnsafeReference, |e, n| e.qcow2_data_file(n, "../secret.raw")),
        c("q-datafile-symlink", "qcow2", "external data file name", "a symlink in the folder to ../secret.raw", UnsafeReference, |e, n| e.qcow2_data_file(n, "link-secret.raw")),
        trusted(c("q-datafile-device", "qcow2", "external data file name", "/dev/zero (trusted)", UnsafeReference, |e, n| e.qcow2_data_file(n, "/dev/zero"))),
        c("q-datafile-nbd", "qcow2", "external data file name", "nbd:localhost:10809", UnsafeReference, |e, n| e.qcow2_data_file(n, "nbd:localhost:10809")),

        // ---- vmdk
        c("k-capacity", "vmdk", "sparse header capacity", "2^50 sectors", Invalid, |e, n| e.vmdk(n, |p, _| wr64le(p, 0x0c, 1 << 50))),
        c("k-grain-size", "vmdk", "sparse header grainSize", "3 sectors", Invalid, |e, n| e.vmdk(n, |p, _| wr64le(p, 0x14, 3))),
        c("k-gtes-per-gt", "vmdk", "sparse header numGTEsPerGT", "1024", Invalid, |e, n| e.vmdk(n, |p, _| wr32le(p, 0x2c, 1024))),
        c("k-version", "vmdk", "sparse header version", "4", Unsupported, |e, n| e.vmdk(n, |p, _| wr32le(p, 0x04, 4))),
        c("k-gd-past-eof", "vmdk", "grain directory entry 0", "sector 0x7fff0000", Corrupt, |e, n| e.vmdk(n, |p, l| wr32le(p, l.gd, 0x7fff_0000))),
        c("k-gd-shared", "vmdk", "grain directory entry 1", "grain table 0's sector", Corrupt, |e, n| e.vmdk(n, |p, l| wr32le(p, l.gd + 4, (l.gt0 / 512) as u32))),
        c("k-gt-past-eof", "vmdk", "grain table entry 0", "sector 0x00ff0000", Corrupt, |e, n| e.vmdk(n, |p, l| wr32le(p, l.gt0, 0x00ff_0000))),
        c("k-gt-into-gd", "vmdk", "grain table entry 0", "the grain directory's sector", Corrupt, |e, n| e.vmdk(n, |p, l| wr32le(p, l.gt0, (l.gd / 512) as u32))),
        c("k-amplification", "vmdk", "every grain table entry", "the first grain", Corrupt, |e, n| e.vmdk(n, |p, l| {
            let first = rd32le(p, l.gt0);
            patch(p, l.gt0, &first.to_le_bytes().repeat(512));
        })),
        c("k-truncated", "vmdk", "file length", "cut inside grain table 0", Corrupt, |e, n| e.vmdk(n, |p, l| truncate(p, l.gt0 + 100))),
        c("k-empty", "vmdk", "file length", "0", Invalid, |e, n| e.empty(n, "vmdk")),
        c("k-extent-many", "vmdk", "descriptor extent lines", "one sparse file named by 1000 extents", Invalid, |e, n| e.vmdk_split_repeated(n)),
        c("k-extent-absolute", "vmdk", "extent file name", "absolute path of the secret", UnsafeReference, |e, n| e.vmdk_flat(n, &e.secret("raw"))),
        c("k-extent-passwd", "vmdk", "extent file name", "/etc/passwd", UnsafeReference, |e, n| e.vmdk_flat(n, "/etc/passwd")),
        c("k-extent-dotdot", "vmdk", "extent file name", "../secret.raw", UnsafeReference, |e, n| e.vmdk_flat(n, "../secret.raw")),
        c("k-extent-symlink", "vmdk", "extent file name", "a symlink in the folder to ../secret.raw", UnsafeReference, |e, n| e.vmdk_flat(n, "link-secret.raw")),
        c("k-extent-fifo", "vmdk", "extent file name", "a FIFO in the folder (opening it would block)", UnsafeReference, |e, n| { let f = e.fifo(n); e.vmdk_flat(n, &f) }),
        trusted(c("k-extent-device", "vmdk", "extent file name", "/dev/zero (trusted)", UnsafeReference, |e, n| e.vmdk_flat(n, "/dev/zero"))),
        trusted(c("k-extent-json", "vmdk", "extent file name", "json:{} (trusted)", UnsafeReference, |e, n| e.vmdk_flat(n, "json:{}"))),
        c("k-parent-absolute", "vmdk", "parentFileNameHint", "absolute path of the secret", UnsafeReference, |e, n| e.vmdk_parent(n, &e.secret("vmdk"))),
        c("k-parent-dotdot", "vmdk", "parentFileNameHint", "../secret.vmdk", UnsafeReference, |e, n| e.vmdk_parent(n, "../secret.vmdk")),
        c("k-parent-symlink", "vmdk", "parentFileNameHint", "a symlink in the folder to ../secret.vmdk", UnsafeReference, |e, n| e.vmdk_parent(n, "link-secret.vmdk")),
        trusted(c("k-parent-nbd", "vmdk", "parentFileNameHint", "nbd://127.0.0.1/x (trusted)", UnsafeReference, |e, n| e.vmdk_parent(n, "nbd://127.0.0.1/x"))),

        // ---- vhd (vpc)
        c("h-footer-checksum", "vpc", "footer checksum (both copies)", "off by one bit", Invalid, |e, n| e.vhd(n, |p| {
            let len = size_of(p);
            xor_byte(p, 0x30, 1);
            xor_byte(p, len - 512 + 0x30, 1);
        })),
        c("h-header-checksum", "vpc", "dynamic header checksum", "off by one bit", Invalid, |e, n| e.vhd(n, |p| xor_byte(p, 0x200 + 0x20, 0x40))),
        c("h-disk-type", "vpc", "footer disk type", "7", Invalid, |e, n| e.vhd(n, |p| vhd_footers(p, |f| f.disk_type = 7))),
        c("h-block-size", "vpc", "dynamic header block size", "3 MiB", Invalid, |e, n| e.vhd(n, |p| vhd_header(p, |h| h.block_size = 3 << 20))),
        c("h-max-entries", "vpc", "dynamic header max table entries", "2^30 + 1", Corrupt, |e, n| e.vhd(n, |p| vhd_header(p, |h| h.max_table_entries = (1 << 30) + 1))),
        c("h-huge-size", "vpc", "footer current size", "3 TiB", Unsupported, |e, n| e.vhd(n, |p| vhd_footers(p, |f| f.current_size = 3 << 40))),
        c("h-huge-size-tiny-bat", "vpc", "footer current size", "2000 GiB with a 4-entry BAT", Invalid, |e, n| e.vhd(n, |p| vhd_footers(p, |f| f.current_size = 2000 << 30))),
        c("h-bat-past-eof", "vpc", "BAT entry 1", "sector 0x0fffffff", Corrupt, |e, n| e.vhd(n, |p| vhd_set_bat(p, 1, 0x0fff_ffff))),
        c("h-bat-into-bat", "vpc", "BAT entry 1", "the BAT's own sector", Corrupt, |e, n| e.vhd(n, |p| vhd_set_bat(p, 1, (vhd_bat_offset(p) / 512) as u32))),
        c("h-amplification", "vpc", "every BAT entry", "block 0's sector", Corrupt, |e, n| e.vhd(n, |p| {
            let first = vhd_bat(p, 0);
            for i in 1..4 {
                vhd_set_bat(p, i, first);
            }
        })),
        c("h-truncated", "vpc", "file length", "cut inside block 0", Corrupt, |e, n| e.vhd(n, |p| truncate(p, u64::from(vhd_bat(p, 0)) * 512 + 4096))),
        c("h-empty", "vpc", "file length", "0", Invalid, |e, n| e.empty(n, "vhd")),
        c("h-parent-w2ku-absolute", "vpc", "parent locator W2ku", "absolute path of the secret", UnsafeReference, |e, n| e.vhd_child(n, &[(b"W2ku", utf16le(&e.secret("vhd")))])),
        c("h-parent-w2ru-dotdot", "vpc", "parent locator W2ru", "..\\secret.vhd", UnsafeReference, |e, n| e.vhd_child(n, &[(b"W2ru", utf16le("..\\secret.vhd"))])),
        c("h-parent-symlink", "vpc", "parent locator W2ru", "a symlink in the folder to ../secret.vhd", UnsafeReference, |e, n| e.vhd_child(n, &[(b"W2ru", utf16le(".\\link-secret.vhd"))])),
        c("h-parent-macx", "vpc", "parent locator MacX", "file:///etc/passwd", UnsafeReference, |e, n| e.vhd_child(n, &[(b"MacX", b"file:///etc/passwd".to_vec())])),
        trusted(c("h-parent-device", "vpc", "parent locator W2ku", "/dev/zero (trusted)", UnsafeReference, |e, n| e.vhd_child(n, &[(b"W2ku", utf16le("/dev/zero"))]))),

        // ---- vhdx
        c("x-header-checksums", "vhdx", "both header checksums", "off by one bit", Invalid, |e, n| e.vhdx(n, |b| {
            b[0x10000 + 300] ^= 1;
            b[0x20000 + 300] ^= 1;
        })),
        c("x-region-checksums", "vhdx", "both region table checksums", "off by one bit", Invalid, |e, n| e.vhdx(n, |b| {
            b[0x30000 + 100] ^= 1;
            b[0x40000 + 100] ^= 1;
        })),
        c("x-region-count", "vhdx", "region table entry count", "5000", Invalid, |e, n| e.vhdx(n, |b| {
            for off in [0x30000usize, 0x40000] {
                b[off + 8..off + 12].copy_from_slice(&5000u32.to_le_bytes());
                let crc = checksum_with_zeroed_field(&b[off..off + REGION_TABLE_SIZE], 4);
                b[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
            }
        })),
        c("x-regions-overlap", "vhdx", "metadata region offset", "the BAT region's offset", Corrupt, |e, n| e.vhdx(n, |b| vhdx_region_tables(b, |t| {
            let bat = t.entries.iter().find(|x| x.guid == BAT_GUID).unwrap().file_offset;
            t.entries.iter_mut().find(|x| x.guid == METADATA_GUID).unwrap().file_offset = bat;
        }))),
        c("x-block-size", "vhdx", "file parameters block size", "512 MiB", Invalid, |e, n| e.vhdx(n, |b| {
            let o = vhdx_item(b, FILE_PARAMETERS_GUID);
            b[o..o + 4].copy_from_slice(&(512u32 << 20).to_le_bytes());
        })),
        c("x-huge-size", "vhdx", "virtual disk size", "64 TiB in a 16 MiB file", Invalid, |e, n| e.vhdx(n, |b| {
            let o = vhdx_item(b, VIRTUAL_DISK_SIZE_GUID);
            b[o..o + 8].copy_from_slice(&(64u64 << 40).to_le_bytes());
        })),
        c("x-bat-past-eof", "vhdx", "BAT entry 0", "block at 1 TiB", Corrupt, |e, n| e.vhdx(n, |b| vhdx_set_bat(b, 0, (1 << 40) | 6))),
        c("x-bat-into-metadata", "vhdx", "BAT entry 0", "the metadata region", Corrupt, |e, n| e.vhdx(n, |b| {
            let meta = vhdx_regions(b).1 as u64;
            vhdx_set_bat(b, 0, meta | 6);
        })),
        c("x-amplification", "vhdx", "every payload BAT entry", "block 0's offset", Corrupt, |e, n| e.vhdx(n, |b| {
            let first = vhdx_bat(b, 0);
            for i in 1..16 {
                vhdx_set_bat(b, i, first);
            }
        })),
        c("x-truncated", "vhdx", "file length", "cut inside the last block", Corrupt, |e, n| e.vhdx(n, |b| {
            let len = b.len();
            b.truncate(len - 4096);
        })),
        c("x-empty", "vhdx", "file length", "0", Invalid, |e, n| e.empty(n, "vhdx")),
        c("x-parent-absolute", "vhdx", "parent locator absolute_win32_path", "absolute path of the secret", UnsafeReference, |e, n| e.vhdx_child(n, "absolute_win32_path", &e.secret("vhdx"))),
        c("x-parent-dotdot", "vhdx", "parent locator relative_path", "..\\secret.vhdx", UnsafeReference, |e, n| e.vhdx_child(n, "relative_path", "..\\secret.vhdx")),
        c("x-parent-symlink", "vhdx", "parent locator relative_path", "a symlink in the folder to ../secret.vhdx", UnsafeReference, |e, n| e.vhdx_child(n, "relative_path", ".\\link-secret.vhdx")),
        c("x-parent-volume", "vhdx", "parent locator volume_path", "\\\\?\\Volume{..}\\secret.vhdx", UnsafeReference, |e, n| e.vhdx_child(n, "volume_path", "\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\secret.vhdx")),
        trusted(c("x-parent-device", "vhdx", "parent locator absolute_win32_path", "/dev/zero (trusted)", UnsafeReference, |e, n| e.vhdx_child(n, "absolute_win32_path", "/dev/zero"))),

        // ---- vdi
        c("d-signature", "vdi", "header signature", "0xbeda107e", Invalid, |e, n| e.vdi(n, |h| h.signature ^= 1)),
        c("d-block-size", "vdi", "header block size", "2 MiB", Unsupported, |e, n| e.vdi(n, |h| h.block_size = 2 << 20)),
        c("d-blocks-huge", "vdi", "header blocks in image", "2^32 - 1", Unsupported, |e, n| e.vdi(n, |h| h.blocks_in_image = u32::MAX)),
        c("d-huge-size", "vdi", "header disk size", "2^45 bytes in an 8-block image", Invalid, |e, n| e.vdi(n, |h| h.disk_size = 1 << 45)),
        c("d-bmap-past-eof", "vdi", "header block map offset", "0x7ffffe00", Corrupt, |e, n| e.vdi(n, |h| h.offset_bmap = 0x7fff_fe00)),
        c("d-data-in-bmap", "vdi", "header data offset", "inside the block map", Invalid, |e, n| e.vdi(n, |h| h.offset_data = h.offset_bmap)),
        c("d-entry-range", "vdi", "block map entry 1", "8 (past the allocated blocks)", Corrupt, |e, n| e.vdi_raw(n, |p| vdi_set_entry(p, 1, 8))),
        c("d-amplification", "vdi", "every block map entry", "block 0", Corrupt, |e, n| e.vdi_raw(n, |p| {
            for i in 1..8 {
                vdi_set_entry(p, i, 0);
            }
        })),
        c("d-truncated", "vdi", "file length", "cut inside the last block", Corrupt, |e, n| e.vdi_raw(n, |p| truncate(p, size_of(p) - 4096))),
        c("d-empty", "vdi", "file length", "0", Invalid, |e, n| e.empty(n, "vdi")),

        // ---- polyglots: two formats' signatures in one file, probed (no -f)
        probed(c("p-qcow2-vhd", "qcow2", "file", "a qcow2 image with a valid fixed-VHD footer appended", Invalid, |e, n| e.polyglot(n, "qcow2"))),
        probed(c("p-vdi-vhd", "vdi", "file", "a VDI with a valid fixed-VHD footer appended", Invalid, |e, n| e.polyglot(n, "vdi"))),
        probed(c("p-vmdk-vhd", "vmdk", "file", "a sparse VMDK with a valid fixed-VHD footer appended", Invalid, |e, n| e.polyglot(n, "vmdk"))),
        probed(c("p-vhdx-vhd", "vhdx", "file", "a VHDX with a valid fixed-VHD footer appended", Invalid, |e, n| e.polyglot(n, "vhdx"))),
    ]
}

// ---------------------------------------------------------------------------------------
// The tests: one per format (they run in parallel), plus the table's coverage.

#[test]
fn table_covers_every_format_and_class() {
    let all = cases();
    assert!(all.len() >= 40, "{} cases", all.len());
    let mut names: Vec<_> = all.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), all.len(), "case names must be unique");
    for f in ["qcow2", "vmdk", "vpc", "vhdx", "vdi"] {
        let of = |k: ErrorKind| {
            all.iter()
                .filter(|c| c.format == f && c.expect == k)
                .count()
        };
        assert!(of(ErrorKind::Corrupt) >= 4, "{f}: table cases");
        assert!(
            of(ErrorKind::Invalid) + of(ErrorKind::Unsupported) >= 1,
            "{f}: header cases"
        );
        assert!(
            of(ErrorKind::UnsafeReference) >= 4 || f == "vdi",
            "{f}: escapes"
        );
        for class in ["amplification", "truncated", "empty"] {
            assert!(
                all.iter().any(|c| c.format == f && c.name.ends_with(class)),
                "{f}: no {class} case"
            );
        }
    }
    assert!(all.iter().filter(|c| c.probe).count() >= 4);
}

#[test]
fn hostile_qcow2() {
    run_group("hostile_qcow2", "q-");
}

#[test]
fn hostile_vmdk() {
    run_group("hostile_vmdk", "k-");
}

#[test]
fn hostile_vhd() {
    run_group("hostile_vhd", "h-");
}

#[test]
fn hostile_vhdx() {
    run_group("hostile_vhdx", "x-");
}

#[test]
fn hostile_vdi() {
    run_group("hostile_vdi", "d-");
}

#[test]
fn hostile_polyglots() {
    run_group("hostile_polyglots", "p-");
}

/// Runs every case whose name starts with `prefix`; reports all failures at once.
fn run_group(test: &str, prefix: &str) {
    if !qemu_available(test) || !tool_available(test, TIME) {
        return;
    }
    let env = Env::new();
    let mut failures = Vec::new();
    for c in cases().iter().filter(|c| c.name.starts_with(prefix)) {
        if let Err(e) = run_case(&env, c) {
            failures.push(format!("{}: {e}", c.name));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn run_case(env: &Env, c: &Case) -> Result<(), String> {
    let img = (c.build)(env, c.name);
    let probe_format = (!c.probe).then(|| Format::from_name(c.format).unwrap());
    // Library: open and read all, with the expected kind, in time.
    let t = Instant::now();
    let r = read_all(&img, probe_format, c.allow_external);
    let lib_time = t.elapsed();
    match r {
        Ok(()) => {
            return Err(format!(
                "{} = {}: accepted by the library",
                c.field, c.value
            ))
        }
        Err(e) if e.kind() != c.expect => {
            return Err(format!(
                "{} = {}: library said {} ({e}), expected {}",
                c.field,
                c.value,
                e.kind().as_str(),
                c.expect.as_str()
            ))
        }
        Err(_) => {}
    }
    if lib_time > Duration::from_secs(LIB_SECONDS) {
        return Err(format!("library took {lib_time:?}"));
    }
    // CLI: exit 1, a message, bounded time and memory, nothing left behind.
    let out = env.out().join(format!("{}.raw", c.name));
    let mut args = vec!["convert".to_string()];
    if let Some(f) = probe_format {
        args.extend(["-f".into(), f.name().into()]);
    }
    if c.allow_external {
        args.push("--allow-external".into());
    }
    args.extend(["-O".into(), "raw".into(), s(&img).into(), s(&out).into()]);
    let run = run_limited(&args, CLI_ADDRESS_SPACE);
    let err = &run.stderr;
    if run.code != Some(1) || !err.starts_with("vimg: ") || err.contains("panicked") {
        return Err(format!("CLI exit {:?}: {err}", run.code));
    }
    if run.elapsed > Duration::from_secs(CLI_SECONDS) {
        return Err(format!("CLI took {:?}", run.elapsed));
    }
    if run.max_rss > CLI_MAX_RSS {
        return Err(format!("CLI peak RSS {} KiB", run.max_rss >> 10));
    }
    let left: Vec<_> = fs::read_dir(env.out())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    if !left.is_empty() {
        return Err(format!("CLI left {left:?} behind"));
    }
    if contains_secret(run.stdout.as_bytes()) || contains_secret(run.stderr.as_bytes()) {
        return Err("the secret's bytes reached the CLI's output".into());
    }
    eprintln!(
        "{:<24} {:<6} {:<17} lib {:>5} ms  cli {:>5} ms  rss {:>6} KiB",
        c.name,
        if c.probe { "probe" } else { c.format },
        c.expect.as_str(),
        lib_time.as_millis(),
        run.elapsed.as_millis(),
        run.max_rss >> 10
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Positive controls: the escapes are real, and `-f raw` takes a polyglot as bytes.

/// With `--allow-external` (and nothing else changed), the secret named by each kind of
/// reference does reach the output: the refusals above are the gate's doing.
#[test]
fn escapes_do_leak_when_trusted() {
    if !qemu_available("escapes_do_leak_when_trusted") {
        return;
    }
    let env = Env::new();
    let controls: Vec<(&str, PathBuf)> = vec![
        (
            "qcow2 backing",
            env.qcow2_backing("c-qb", &env.secret("raw")),
        ),
        (
            "qcow2 data file",
            env.qcow2_data_file("c-qd", &env.secret("raw")),
        ),
        ("vmdk extent", env.vmdk_flat("c-ke", &env.secret("raw"))),
        ("vmdk parent", env.vmdk_parent("c-kp", &env.secret("vmdk"))),
        (
            "vhd parent",
            env.vhd_child("c-hp", &[(b"W2ku", utf16le(&env.secret("vhd")))]),
        ),
        (
            "vhdx parent",
            env.vhdx_child("c-xp", "absolute_win32_path", &env.secret("vhdx")),
        ),
    ];
    for (what, img) in controls {
        let out = env.out().join("trusted.raw");
        vimg(&["convert", "--allow-external", "-O", "raw", s(&img), s(&out)]);
        assert!(
            contains_secret(&fs::read(&out).unwrap()),
            "{what}: the trusted conversion did not read the secret"
        );
        fs::remove_file(&out).unwrap();
        // And without the flag the same image is refused (the table's cases).
        let e = read_all(&img, None, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{what}: {e}");
    }
}

/// `-f raw` on a polyglot takes the bytes as raw, as the user said.
#[test]
fn polyglot_with_f_raw_is_read_as_bytes() {
    if !qemu_available("polyglot_with_f_raw_is_read_as_bytes") {
        return;
    }
    let env = Env::new();
    for f in ["qcow2", "vdi", "vmdk", "vhdx"] {
        let img = env.polyglot(&format!("raw-{f}"), f);
        let out = env.out().join("bytes.raw");
        vimg(&["convert", "-f", "raw", "-O", "raw", s(&img), s(&out)]);
        assert_same_file(&img, &out);
        fs::remove_file(&out).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Running things

/// Opens `p` and reads every mapped byte (up to 64 MiB) through the whole chain.
fn read_all(p: &Path, format: Option<Format>, allow_external: bool) -> vimg::Result<()> {
    let opts = OpenOptions::with_format(format).policy(if allow_external {
        ExternalPolicy::Allow
    } else {
        ExternalPolicy::SameFolder
    });
    let img = Image::open(p, &opts)?;
    let size = img.virtual_size();
    let (mut pos, mut budget) = (0u64, 64 * MIB);
    let mut buf = Vec::new();
    while pos < size {
        let (e, _, _) = img.map_flat(pos, size - pos)?;
        if e.kind.has_data() && budget > 0 {
            let n = e.len.min(4 * MIB).min(budget);
            buf.resize(n as usize, 0);
            img.read_at(&mut buf, pos)?;
            budget -= n;
            if n < e.len {
                pos += n;
                continue;
            }
        }
        pos = e.end();
    }
    Ok(())
}

fn contains_secret(b: &[u8]) -> bool {
    b.windows(SECRET.len()).any(|w| w == SECRET)
}

// ---------------------------------------------------------------------------------------
// The images

/// A temporary tree: `secret.*` (the files hostile images name, full of [`SECRET`]),
/// `img/` (the hostile images, with symlinks out to the secrets) and `out/` (outputs).
struct Env {
    root: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir(r.join("img")).unwrap();
        fs::create_dir(r.join("out")).unwrap();
        let secret = r.join("secret.raw");
        fs::write(&secret, SECRET.repeat((4 * MIB / 16) as usize)).unwrap();
        for (fmt, ext, opts) in [
            ("vpc", "vhd", "subformat=fixed,force_size=on"),
            ("vhdx", "vhdx", "block_size=1M"),
            ("vmdk", "vmdk", "subformat=monolithicSparse"),
        ] {
            qemu_img(&[
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                fmt,
                "-o",
                opts,
                s(&secret),
                s(&r.join(format!("secret.{ext}"))),
            ]);
        }
        for ext in ["raw", "vhd", "vhdx", "vmdk"] {
            symlink(
                format!("../secret.{ext}"),
                r.join(format!("img/link-secret.{ext}")),
            )
            .unwrap();
        }
        // The data every base image holds.
        mixed_raw(&r.join("mixed16.raw"), 16 * MIB);
        mixed_raw(&r.join("mixed8.raw"), 8 * MIB);
        Env { root }
    }

    fn img(&self) -> PathBuf {
        self.root.path().join("img")
    }

    fn out(&self) -> PathBuf {
        self.root.path().join("out")
    }

    /// The absolute path of `secret.EXT`.
    fn secret(&self, ext: &str) -> String {
        s(&self.root.path().join(format!("secret.{ext}"))).to_string()
    }

    /// `qemu-img convert -O FMT -o OPTS mixedN.raw img/NAME`.
    fn convert(&self, name: &str, fmt: &str, opts: &str, mib: u64) -> PathBuf {
        let p = self.img().join(name);
        let src = self.root.path().join(format!("mixed{mib}.raw"));
        let mut a = vec!["convert", "-q", "-f", "raw", "-O", fmt];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.extend([s(&src), s(&p)]);
        qemu_img(&a);
        p
    }

    /// A FIFO named `NAME.fifo` in the image folder; returns its name.
    fn fifo(&self, name: &str) -> String {
        let f = format!("{name}.fifo");
        let c = std::ffi::CString::new(s(&self.img().join(&f))).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        f
    }

    fn empty(&self, name: &str, ext: &str) -> PathBuf {
        let p = self.img().join(format!("{name}.{ext}"));
        fs::write(&p, b"").unwrap();
        p
    }

    // ---- qcow2

    /// A 16 MiB qcow2 (64 KiB clusters) patched by `f`.
    fn qcow2(&self, name: &str, f: impl Fn(&Path, &QLayout)) -> PathBuf {
        let p = self.convert(&format!("{name}.qcow2"), "qcow2", "", 16);
        let l = qlayout(&p);
        f(&p, &l);
        p
    }

    /// A compressed qcow2 whose first compressed cluster inflates to half a cluster.
    fn qcow2_compressed(&self, name: &str) -> PathBuf {
        let p = self.img().join(format!("{name}.qcow2"));
        let src = self.root.path().join("mixed16.raw");
        qemu_img(&["convert", "-q", "-c", "-O", "qcow2", s(&src), s(&p)]);
        let l = qlayout(&p);
        let g = vimg::formats::qcow2::header::Geometry::new(l.h.cluster_bits, false, 4);
        let coff = (0..l.cs / 8)
            .map(|i| rd64be(&p, l.l2 + 8 * i))
            .find(|e| e & vimg::formats::qcow2::header::OFLAG_COMPRESSED != 0)
            .expect("a compressed cluster")
            & g.coffset_mask;
        let stream = vimg::codec::deflate(&vec![b'A'; 32768], 6, 12, false, 65536).unwrap();
        patch(&p, coff, &stream);
        p
    }

    /// A 4 MiB qcow2 over a backing file named `backing` (raw), nothing allocated.
    fn qcow2_backing(&self, name: &str, backing: &str) -> PathBuf {
        let p = self.img().join(format!("{name}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "placeholder",
            "-F",
            "raw",
            s(&p),
            "4M",
        ]);
        let h = qlayout(&p).h;
        // The name sits alone at the end of the header cluster: write the new one there.
        patch(&p, h.backing_file_offset, backing.as_bytes());
        wr32be(&p, 16, backing.len() as u32);
        p
    }

    /// A 4 MiB qcow2 whose external data file (4 MiB written) is renamed to `data_file`.
    fn qcow2_data_file(&self, name: &str, data_file: &str) -> PathBuf {
        let dir = self.img();
        let p = dir.join(format!("{name}.qcow2"));
        let own = format!("{name}.data");
        let o = format!("data_file={own}");
        qemu_in(
            &dir,
            &["create", "-q", "-f", "qcow2", "-o", &o, s(&p), "4M"],
        );
        let io = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x11 0 4M", s(&p)])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            io.status.success(),
            "{}",
            String::from_utf8_lossy(&io.stderr)
        );
        qcow2_set_data_file_name(&p, data_file);
        fs::remove_file(dir.join(own)).unwrap();
        p
    }

    // ---- vmdk

    /// A 64 MiB monolithicSparse vmdk with data in two grain tables, patched by `f`.
    fn vmdk(&self, name: &str, f: impl Fn(&Path, &KLayout)) -> PathBuf {
        let p = self.img().join(format!("{name}.vmdk"));
        let src = self.img().join(format!("{name}.src"));
        let data = pattern(128 << 10, 3);
        write_sparse_raw(&src, 64 * MIB, &[(0, &data), (40 * MIB, &data)]);
        qemu_img(&["convert", "-q", "-f", "raw", "-O", "vmdk", s(&src), s(&p)]);
        fs::remove_file(src).unwrap();
        let head = fs::read(&p).unwrap();
        let h = SparseHeader::parse(&head[..512], 0).unwrap();
        let gd = h.gd_offset * 512;
        let l = KLayout {
            gd,
            gt0: u64::from(rd32le(&p, gd)) * 512,
        };
        f(&p, &l);
        p
    }

    /// A monolithicFlat vmdk whose extent line names `extent`.
    fn vmdk_flat(&self, name: &str, extent: &str) -> PathBuf {
        let p = self.img().join(format!("{name}.vmdk"));
        qemu_create(&p, "vmdk", "subformat=monolithicFlat", "4M");
        let own = format!("{name}-flat.vmdk");
        let text = fs::read_to_string(&p).unwrap();
        assert!(text.contains(&own), "{text}");
        fs::write(
            &p,
            text.replace(&format!("\"{own}\""), &format!("\"{extent}\"")),
        )
        .unwrap();
        fs::remove_file(self.img().join(own)).unwrap();
        p
    }

    /// A twoGbMaxExtentSparse vmdk whose one extent line is repeated 1000 times.
    fn vmdk_split_repeated(&self, name: &str) -> PathBuf {
        let p = self.img().join(format!("{name}.vmdk"));
        qemu_create(&p, "vmdk", "subformat=twoGbMaxExtentSparse", "1M");
        let text = fs::read_to_string(&p).unwrap();
        let line = format!("RW 2048 SPARSE \"{name}-s001.vmdk\"\n");
        assert!(text.contains(&line), "{text}");
        fs::write(&p, text.replace(&line, &line.repeat(1000))).unwrap();
        p
    }

    /// A sparse delta vmdk whose parentFileNameHint is `parent` (the parent's CID kept, so
    /// only the gate stands between the image and the parent).
    fn vmdk_parent(&self, name: &str, parent: &str) -> PathBuf {
        let p = self.img().join(format!("{name}.vmdk"));
        let base = self.img().join(format!("{name}-base.vmdk"));
        fs::copy(self.root.path().join("secret.vmdk"), &base).unwrap();
        let base_name = format!("{name}-base.vmdk");
        qemu_in(
            &self.img(),
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-b",
                &base_name,
                "-F",
                "vmdk",
                s(&p),
            ],
        );
        fs::remove_file(base).unwrap();
        vmdk_edit_descriptor(&p, |t| {
            t.replace(
                &format!("parentFileNameHint=\"{base_name}\""),
                &format!("parentFileNameHint=\"{parent}\""),
            )
        });
        p
    }

    // ---- vhd

    /// An 8 MiB dynamic VHD (4 blocks, force_size) patched by `f`.
    fn vhd(&self, name: &str, f: impl Fn(&Path)) -> PathBuf {
        let p = self.convert(&format!("{name}.vhd"), "vpc", "force_size=on", 8);
        f(&p);
        p
    }

    /// A differencing VHD (block 0 its own, the rest its parent's) with `locators`.
    fn vhd_child(&self, name: &str, locators: &[(&[u8; 4], Vec<u8>)]) -> PathBuf {
        let p = self.img().join(format!("{name}.vhd"));
        qemu_create(&p, "vpc", "force_size=on", "4M");
        qemu_io("vpc", &p, &["write -P 0x11 0 1M"]);
        let mut d = fs::read(&p).unwrap();
        let footer = d.split_off(d.len() - 512);
        let mut entries = Vec::new();
        for (code, data) in locators {
            let at = d.len() as u64;
            d.extend_from_slice(data);
            d.resize(d.len().div_ceil(512) * 512 + 512, 0);
            entries.push((**code, data.len() as u32, at));
        }
        d.extend_from_slice(&footer);
        fs::write(&p, d).unwrap();
        vhd_footers(&p, |f| f.disk_type = 4);
        vhd_header(&p, |h| {
            for (i, (code, len, at)) in entries.iter().enumerate() {
                h.locators[i].platform_code = *code;
                h.locators[i].data_space = 512;
                h.locators[i].data_length = *len;
                h.locators[i].data_offset = *at;
            }
        });
        p
    }

    // ---- vhdx

    /// A 16 MiB vhdx with 1 MiB blocks, patched by `f`.
    fn vhdx(&self, name: &str, f: impl Fn(&mut Vec<u8>)) -> PathBuf {
        self.vhdx_with(name, "block_size=1M", f)
    }

    fn vhdx_with(&self, name: &str, opts: &str, f: impl Fn(&mut Vec<u8>)) -> PathBuf {
        let p = self.convert(&format!("{name}.vhdx"), "vhdx", opts, 16);
        let mut b = fs::read(&p).unwrap();
        f(&mut b);
        fs::write(&p, b).unwrap();
        p
    }

    /// A differencing vhdx (its holes read from the parent) whose locator holds `key` =
    /// `value`, linked to the secret vhdx (so only the gate stands between the image and
    /// the secret, as the positive control shows).
    fn vhdx_child(&self, name: &str, key: &str, value: &str) -> PathBuf {
        let opts = OpenOptions::default().open_backing(false);
        let linkage = Image::open(self.secret("vhdx"), &opts)
            .unwrap()
            .reader()
            .link_identity("DataWriteGuid")
            .unwrap();
        // Unwritten blocks "not present" (not "zero"), so they are read from the parent.
        self.vhdx_with(name, "block_size=1M,block_state_zero=off", |b| {
            let loc = ParentLocator {
                locator_type: PARENT_TYPE_VHDX_GUID,
                entries: vec![
                    ("parent_linkage".to_string(), linkage.clone()),
                    (key.to_string(), value.to_string()),
                ],
            }
            .to_bytes();
            let meta = vhdx_regions(b).1;
            // Past qemu's items (which start at 64 KiB and take a few hundred bytes).
            let at = 0x11000usize;
            b[meta + at..meta + at + loc.len()].copy_from_slice(&loc);
            let mut t = vhdx_metadata(b);
            t.entries.push(MetadataEntry {
                item_id: PARENT_LOCATOR_GUID,
                offset: at as u32,
                length: loc.len() as u32,
                flags: META_IS_REQUIRED,
            });
            t.write_to(&mut b[meta..meta + METADATA_TABLE_SIZE]);
            let fp = vhdx_item(b, FILE_PARAMETERS_GUID);
            let flags = u32::from_le_bytes(b[fp + 4..fp + 8].try_into().unwrap());
            b[fp + 4..fp + 8].copy_from_slice(&(flags | PARAM_HAS_PARENT).to_le_bytes());
        })
    }

    // ---- vdi

    /// An 8 MiB dynamic VDI with its header patched by `f`.
    fn vdi(&self, name: &str, f: impl Fn(&mut VdiHeader)) -> PathBuf {
        self.vdi_raw(name, |p| {
            let mut b = fs::read(p).unwrap();
            let mut h = VdiHeader::parse(&b[..512]).unwrap();
            f(&mut h);
            h.write_to(&mut b[..512]);
            fs::write(p, b).unwrap();
        })
    }

    /// An 8 MiB dynamic VDI patched by `f`.
    fn vdi_raw(&self, name: &str, f: impl Fn(&Path)) -> PathBuf {
        let p = self.convert(&format!("{name}.vdi"), "vdi", "", 8);
        f(&p);
        p
    }

    // ---- polyglots

    /// An image of `fmt` with a valid fixed-VHD footer appended (its size the file's).
    fn polyglot(&self, name: &str, fmt: &str) -> PathBuf {
        let (ext, opts) = match fmt {
            "vhdx" => ("vhdx", "block_size=1M"),
            _ => (fmt, ""),
        };
        let p = self.convert(&format!("{name}.{ext}"), fmt, opts, 8);
        let secret_vhd = fs::read(self.root.path().join("secret.vhd")).unwrap();
        let mut footer = Footer::parse(&secret_vhd[secret_vhd.len() - 512..]).unwrap();
        let mut b = fs::read(&p).unwrap();
        b.resize(b.len().div_ceil(512) * 512, 0);
        footer.current_size = b.len() as u64;
        footer.original_size = b.len() as u64;
        footer.seal();
        b.extend_from_slice(&footer.to_bytes());
        fs::write(&p, b).unwrap();
        p
    }
}

// ---------------------------------------------------------------------------------------
// Patching helpers

fn rd32le(p: &Path, off: u64) -> u32 {
    u32::from_le_bytes(read_bytes(p, off))
}

fn wr64be(p: &Path, off: u64, v: u64) {
    patch(p, off, &v.to_be_bytes());
}

fn wr32be(p: &Path, off: u64, v: u32) {
    patch(p, off, &v.to_be_bytes());
}

fn wr64le(p: &Path, off: u64, v: u64) {
    patch(p, off, &v.to_le_bytes());
}

fn wr32le(p: &Path, off: u64, v: u32) {
    patch(p, off, &v.to_le_bytes());
}

fn xor_byte(p: &Path, off: u64, x: u8) {
    let [b] = read_bytes::<1>(p, off);
    patch(p, off, &[b ^ x]);
}

fn truncate(p: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Where a qcow2 image keeps its tables.
struct QLayout {
    h: QHeader,
    cs: u64,
    /// The L2 table of L1 entry 0.
    l2: u64,
}

fn qlayout(p: &Path) -> QLayout {
    let head = fs::read(p).unwrap();
    let h = QHeader::parse(&head[..head.len().min(4096)]).unwrap();
    let cs = h.cluster_size();
    let l2 = if h.l1_size > 0 {
        rd64be(p, h.l1_table_offset) & L1E_OFFSET_MASK
    } else {
        0
    };
    QLayout { h, cs, l2 }
}

/// Rewrites the external data file extension of a qcow2 v3 image to name `name`.
fn qcow2_set_data_file_name(p: &Path, name: &str) {
    const EXT_DATA_FILE: u32 = 0x4441_5441;
    let h = qlayout(p).h;
    let mut b = fs::read(p).unwrap();
    let start = h.header_length as usize;
    let mut exts = Vec::new();
    let mut at = start;
    loop {
        let ty = u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        if ty == 0 {
            break;
        }
        let data = if ty == EXT_DATA_FILE {
            name.as_bytes().to_vec()
        } else {
            b[at + 8..at + 8 + len].to_vec()
        };
        exts.push((ty, data));
        at += 8 + len.div_ceil(8) * 8;
    }
    let end = at + 8;
    let mut out = Vec::new();
    for (ty, data) in exts {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(&data);
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out.extend_from_slice(&[0; 8]);
    assert!(start + out.len() <= h.cluster_size() as usize);
    b[start..end.max(start + out.len())].fill(0);
    b[start..start + out.len()].copy_from_slice(&out);
    fs::write(p, b).unwrap();
}

/// Where a sparse vmdk keeps its grain directory and first grain table (bytes).
struct KLayout {
    gd: u64,
    gt0: u64,
}

/// Rewrites the descriptor embedded in a sparse vmdk through `f` (it must still fit).
fn vmdk_edit_descriptor(p: &Path, f: impl Fn(&str) -> String) {
    let mut b = fs::read(p).unwrap();
    let h = SparseHeader::parse(&b[..512], 0).unwrap();
    let (at, len) = (
        (h.descriptor_offset * 512) as usize,
        (h.descriptor_size * 512) as usize,
    );
    let area = &mut b[at..at + len];
    let text_len = area.iter().position(|&c| c == 0).unwrap_or(len);
    let text = std::str::from_utf8(&area[..text_len]).unwrap().to_string();
    let new = f(&text);
    assert_ne!(new, text, "the descriptor edit changed nothing");
    assert!(new.len() < len, "the new descriptor does not fit");
    area.fill(0);
    area[..new.len()].copy_from_slice(new.as_bytes());
    fs::write(p, b).unwrap();
}

/// Rewrites both footers of a VHD through `f`, checksums recomputed.
fn vhd_footers(p: &Path, f: impl Fn(&mut Footer)) {
    let mut d = fs::read(p).unwrap();
    let tail = d.len() - 512;
    for at in [0, tail] {
        if d[at..at + 8] != FOOTER_COOKIE {
            continue;
        }
        let mut footer = Footer::parse(&d[at..at + 512]).unwrap();
        f(&mut footer);
        footer.seal();
        footer.write_to(&mut d[at..at + 512]);
    }
    fs::write(p, d).unwrap();
}

/// Rewrites the dynamic header of a VHD through `f`, checksum recomputed.
fn vhd_header(p: &Path, f: impl Fn(&mut DynHeader)) {
    let mut d = fs::read(p).unwrap();
    let at = Footer::parse(&d[..512]).unwrap().data_offset as usize;
    let mut h = DynHeader::parse(&d[at..at + 1024]).unwrap();
    f(&mut h);
    h.seal();
    h.write_to(&mut d[at..at + 1024]);
    fs::write(p, d).unwrap();
}

fn vhd_bat_offset(p: &Path) -> u64 {
    let d = fs::read(p).unwrap();
    let at = Footer::parse(&d[..512]).unwrap().data_offset as usize;
    DynHeader::parse(&d[at..at + 1024]).unwrap().table_offset
}

fn vhd_bat(p: &Path, i: u64) -> u32 {
    u32::from_be_bytes(read_bytes(p, vhd_bat_offset(p) + 4 * i))
}

fn vhd_set_bat(p: &Path, i: u64, v: u32) {
    patch(p, vhd_bat_offset(p) + 4 * i, &v.to_be_bytes());
}

/// `(BAT offset, metadata offset)` of a vhdx, from region table 1.
fn vhdx_regions(b: &[u8]) -> (usize, usize) {
    let t = RegionTable::parse(&b[0x30000..0x30000 + REGION_TABLE_SIZE]).unwrap();
    let off = |g| t.entries.iter().find(|e| e.guid == g).unwrap().file_offset as usize;
    (off(BAT_GUID), off(METADATA_GUID))
}

fn vhdx_metadata(b: &[u8]) -> MetadataTable {
    let meta = vhdx_regions(b).1;
    MetadataTable::parse(&b[meta..meta + METADATA_TABLE_SIZE]).unwrap()
}

fn vhdx_item(b: &[u8], g: Guid) -> usize {
    let meta = vhdx_regions(b).1;
    let e = vhdx_metadata(b)
        .entries
        .into_iter()
        .find(|e| e.item_id == g)
        .unwrap();
    meta + e.offset as usize
}

fn vhdx_bat(b: &[u8], i: usize) -> u64 {
    let bat = vhdx_regions(b).0 + 8 * i;
    u64::from_le_bytes(b[bat..bat + 8].try_into().unwrap())
}

fn vhdx_set_bat(b: &mut [u8], i: usize, v: u64) {
    let bat = vhdx_regions(b).0 + 8 * i;
    b[bat..bat + 8].copy_from_slice(&v.to_le_bytes());
}

fn vhdx_region_tables(b: &mut [u8], f: impl Fn(&mut RegionTable)) {
    for off in [0x30000usize, 0x40000] {
        let mut t = RegionTable::parse(&b[off..off + REGION_TABLE_SIZE]).unwrap();
        f(&mut t);
        t.write_to(&mut b[off..off + REGION_TABLE_SIZE]);
    }
}

fn vdi_set_entry(p: &Path, i: u64, v: u32) {
    let b = fs::read(p).unwrap();
    let h = VdiHeader::parse(&b[..512]).unwrap();
    patch(p, u64::from(h.offset_bmap) + 4 * i, &v.to_le_bytes());
}

// ---------------------------------------------------------------------------------------
// `vimg check` on the same images, against `qemu-img check`

/// Cases where `vimg check` and `qemu-img check` (10.0.2) exit differently: (case, vimg's
/// code, qemu-img's code). Everything else exits alike. The test fails when a listed case
/// stops differing, so the list stays true.
#[rustfmt::skip]
const CHECK_DIFFERS: &[(&str, i32, i32)] = &[
    // qemu-img check opens backing files (and connects to an nbd server); vimg check reads
    // only the image itself.
    ("q-backing-nbd", 0, 1), ("k-parent-nbd", 0, 1),
    // A data file or extent outside the folder: qemu-img opens it and checks; vimg's gate
    // refuses it, so the check cannot complete (exit 1; --allow-external would check).
    ("q-datafile-absolute", 1, 0), ("q-datafile-dotdot", 1, 0), ("q-datafile-symlink", 1, 0),
    ("q-datafile-device", 1, 0),
    // qemu-img opens a FIFO that names itself a backing file or an extent, and waits on it
    // forever (124: killed by `timeout`); vimg check does not open backing files and
    // refuses the extent.
    ("q-backing-fifo", 0, 124), ("k-extent-fifo", 1, 124),
    ("k-extent-absolute", 1, 0), ("k-extent-passwd", 1, 0), ("k-extent-dotdot", 1, 0),
    ("k-extent-symlink", 1, 0),
    // qemu-img's vmdk check only looks at grains past EOF; vimg refuses the image at open
    // (corrupt tables: exit 2; a header field out of range: exit 1).
    ("k-grain-size", 1, 0), ("k-extent-many", 1, 0), ("k-gd-past-eof", 2, 0),
    ("k-gd-shared", 2, 0), ("k-gt-into-gd", 2, 0), ("k-amplification", 2, 0),
    ("k-gt-past-eof", 2, 1), ("k-truncated", 2, 1),
    // qemu-img has no vpc check (63) and refuses some corrupt VHDs at open (1); vimg checks
    // VHDs.
    ("h-disk-type", 1, 63), ("h-bat-into-bat", 2, 63), ("h-amplification", 2, 63),
    ("h-max-entries", 2, 1), ("h-bat-past-eof", 2, 1), ("h-truncated", 2, 1),
    ("h-parent-w2ku-absolute", 0, 63), ("h-parent-w2ru-dotdot", 0, 63),
    ("h-parent-symlink", 0, 63), ("h-parent-macx", 0, 63), ("h-parent-device", 0, 63),
    // qemu-img cannot open differencing VHDX; it does not look for overlapping blocks;
    // it refuses overlapping regions at open.
    ("x-parent-absolute", 0, 1), ("x-parent-dotdot", 0, 1), ("x-parent-symlink", 0, 1),
    ("x-parent-volume", 0, 1), ("x-parent-device", 0, 1),
    ("x-amplification", 2, 0), ("x-regions-overlap", 2, 1),
    // qemu-img's vdi check ignores blocks past EOF and a data area inside the block map.
    ("d-truncated", 2, 0), ("d-data-in-bmap", 1, 0),
    // qemu-img probes a polyglot as the first format that matches; vimg refuses to guess.
    ("p-qcow2-vhd", 1, 0), ("p-vdi-vhd", 1, 0), ("p-vmdk-vhd", 1, 0), ("p-vhdx-vhd", 1, 0),
];

/// Every table case through `vimg check` and `qemu-img check`: the same exit code unless
/// listed in [`CHECK_DIFFERS`]; a case of kind "corrupt" is reported as corrupt (2, or 3
/// when qemu-img too only sees a leak), never as "could not check" (but for a compressed
/// cluster of the wrong size: check reads metadata, not compressed data).
#[test]
fn check_exits_like_qemu_on_every_case() {
    if !qemu_available("check_exits_like_qemu_on_every_case") {
        return;
    }
    let env = Env::new();
    let mut failures = Vec::new();
    for c in cases() {
        let img = (c.build)(&env, c.name);
        let mut args = vec!["check"];
        if !c.probe {
            args.extend(["-f", c.format]);
        }
        args.push(s(&img));
        let v = vimg_raw(&args).status.code().unwrap_or(-1);
        // qemu-img waits forever on a FIFO it is told to open: 124 is `timeout`'s code.
        let limit = if c.name.ends_with("-fifo") {
            "3"
        } else {
            "300"
        };
        let q = Command::new("timeout")
            .arg(limit)
            .arg("qemu-img")
            .args(&args)
            .current_dir(env.img())
            .output()
            .unwrap()
            .status
            .code()
            .unwrap_or(-1);
        let want = CHECK_DIFFERS
            .iter()
            .find(|d| d.0 == c.name)
            .map_or((q, q), |d| (d.1, d.2));
        if (v, q) != want {
            failures.push(format!(
                "{}: vimg check {v}, qemu-img check {q}; expected {want:?}",
                c.name
            ));
        }
        // Check verifies metadata; like qemu-img it does not inflate compressed clusters.
        let data_level = c.name == "q-compressed-size";
        if c.expect == ErrorKind::Corrupt && !data_level && !(v == 2 || v == 3 && q == 3) {
            failures.push(format!("{}: corrupt, but vimg check exits {v}", c.name));
        }
    }
    for d in CHECK_DIFFERS {
        assert!(cases().iter().any(|c| c.name == d.0), "{} is no case", d.0);
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// An image refused at open for corrupt tables is reported by `vimg check` as one
/// corruption with the reader's error, in qemu-img's words and JSON keys.
#[test]
fn check_reports_an_image_refused_at_open_as_corrupt() {
    if !qemu_available("check_reports_an_image_refused_at_open_as_corrupt") {
        return;
    }
    let env = Env::new();
    for c in cases().iter().filter(|c| {
        [
            "k-gd-shared",
            "h-bat-past-eof",
            "x-bat-past-eof",
            "d-entry-range",
        ]
        .contains(&c.name)
    }) {
        let img = (c.build)(&env, c.name);
        // Probed, so the format in the report comes from the content.
        let out = vimg_raw(&["check", "--output=json", s(&img)]);
        assert_eq!(out.status.code(), Some(2), "{}", c.name);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["check-errors"], 0, "{}", c.name);
        assert_eq!(v["corruptions"], 1, "{}", c.name);
        assert_eq!(v["filename"], s(&img), "{}", c.name);
        assert_eq!(v["format"], c.format, "{}", c.name);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("ERROR "), "{}: {err}", c.name);
        let human = vimg_raw(&["check", s(&img)]);
        assert_eq!(human.status.code(), Some(2));
        assert!(
            String::from_utf8_lossy(&human.stdout).contains("1 errors were found on the image."),
            "{}",
            c.name
        );
    }
}

/// Each format's check() finds an inconsistency in an image that opens: the redundant or
/// summary structures the reader does not need (qcow2: a refcount; vhd: the footer copy;
/// vhdx: the redundant region table; vdi: the allocated-blocks count). Not vmdk: a
/// redundant grain table that differs is no error for qemu-img, nor for vimg (tests/vmdk.rs).
#[test]
fn check_finds_an_injected_inconsistency_in_every_format() {
    if !qemu_available("check_finds_an_injected_inconsistency_in_every_format") {
        return;
    }
    let env = Env::new();
    let cases: Vec<(&str, PathBuf, i32)> = vec![
        (
            "qcow2",
            env.qcow2("ck-qcow2", |p, l| {
                // The refcount of the first data cluster (16-bit refcounts) drops to 0.
                let rb = rd64be(p, l.h.refcount_table_offset) & !0x1ff;
                let c = (rd64be(p, l.l2) & 0x00ff_ffff_ffff_fe00) / l.cs;
                patch(p, rb + 2 * c, &[0, 0]);
            }),
            2,
        ),
        (
            "vpc",
            env.vhd("ck-vhd", |p| {
                // The footer copy at offset 0 says something else than the footer.
                let mut d = fs::read(p).unwrap();
                let mut f = Footer::parse(&d[..512]).unwrap();
                f.timestamp ^= 1;
                f.seal();
                f.write_to(&mut d[..512]);
                fs::write(p, d).unwrap();
            }),
            63,
        ),
        ("vhdx", env.vhdx("ck-vhdx", |b| b[0x40000 + 100] ^= 1), 0),
        ("vdi", env.vdi("ck-vdi", |h| h.blocks_allocated += 1), 2),
    ];
    for (fmt, img, qemu_code) in cases {
        Image::open(&img, &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{fmt}: the image must open: {e}"));
        let out = vimg_raw(&["check", "--output=json", "-f", fmt, s(&img)]);
        assert_eq!(out.status.code(), Some(2), "{fmt}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["corruptions"].as_u64() >= Some(1), "{fmt}: {v}");
        let q = run_cmd("qemu-img", &["check", "-f", fmt, s(&img)]);
        assert_eq!(
            q.status.code(),
            Some(qemu_code),
            "qemu-img check of the {fmt} image"
        );
    }
}

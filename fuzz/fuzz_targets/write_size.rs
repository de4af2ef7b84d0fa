//! The write side under any virtual size (issue 18). The first byte picks a writer (format
//! and `-o` options), the next eight a virtual size: any `u64`. `vimg::create` must either
//! refuse up front, leaving nothing in the folder, or write an image that vimg opens as the
//! format written, with at least the size asked for, and whose `check` is clean. Run with
//! `ASAN_OPTIONS=quarantine_size_mb=16` and `-rss_limit_mb=1024`: a writer that sizes its
//! tables by the virtual size past the metadata cap is reported as a crash. (`crates/vimg-cli/tests/hostile2.rs` checks the same property with
//! qemu-img as the judge on chosen sizes.)
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vimg::{CreateOptions, Format, Image, OpenOptions};

const WRITERS: &[(Format, &str)] = &[
    (Format::Raw, ""),
    (Format::Qcow2, ""),
    (Format::Qcow2, "cluster_size=512"),
    (Format::Qcow2, "cluster_size=2M"),
    (Format::Qcow2, "cluster_size=4096,refcount_bits=64"),
    (Format::Qcow2, "cluster_size=65536,extended_l2=on"),
    (Format::Vmdk, "subformat=monolithicSparse"),
    (Format::Vmdk, "subformat=streamOptimized"),
    (Format::Vmdk, "subformat=monolithicFlat"),
    (Format::Vmdk, "subformat=twoGbMaxExtentSparse"),
    (Format::Vmdk, "subformat=twoGbMaxExtentFlat"),
    (Format::Vpc, ""),
    (Format::Vpc, "force_size=on"),
    (Format::Vpc, "subformat=fixed,force_size=on"),
    (Format::Vhdx, "block_size=1M,log_size=1M"),
    (Format::Vhdx, "subformat=fixed,block_size=1M,log_size=1M"),
    (Format::Vdi, ""),
    (Format::Vdi, "static=on"),
];

/// A folder of this process, on tmpfs when there is one (files are sparse there too).
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("vimg-fuzz-write-size-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("fuzz folder");
        d
    })
}

fn clear(d: &Path) {
    for e in std::fs::read_dir(d).expect("read folder").flatten() {
        let _ = std::fs::remove_file(e.path());
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let (format, o) = WRITERS[data[0] as usize % WRITERS.len()];
    let size = u64::from_le_bytes(data[1..9].try_into().expect("8 bytes"));
    if o.contains("twoGb") && size > 64 << 30 {
        // Up to 16,384 extent files, each written: the folder's space, not a finding.
        return;
    }
    let d = dir();
    clear(d);
    let p = d.join(format!("w.{}", format.name()));
    let mut opts = CreateOptions::new();
    if !o.is_empty() {
        opts.parse_into(o).expect("writer options");
    }
    match vimg::create(&p, format, Some(size), &opts) {
        Err(_) => {
            let left: Vec<_> = std::fs::read_dir(d).expect("read folder").flatten().collect();
            assert!(left.is_empty(), "{format} {o} {size}: refused but left {left:?}");
        }
        // A VMDK of 0 sectors has no extent line; qemu-img writes the same and cannot open
        // it either (vimg writes qemu-img's bytes).
        Ok(()) if format == Format::Vmdk && size < 512 => {}
        Ok(()) => {
            let img = Image::open(
                &p,
                &OpenOptions::with_format(Some(format)),
            )
            .unwrap_or_else(|e| panic!("{format} {o} {size}: written but not opened: {e}"));
            let got = img.reader().virtual_size();
            assert!(got >= size, "{format} {o} {size}: opens as {got} bytes");
            if format != Format::Raw && size <= 1 << 40 {
                if let Ok(r) = img.reader().check() {
                    assert!(
                        r.corruptions == 0 && r.leaks == 0,
                        "{format} {o} {size}: check {:?}",
                        r.messages
                    );
                }
            }
        }
    }
    clear(d);
});

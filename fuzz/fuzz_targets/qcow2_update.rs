//! Untrusted bytes changed in place as qcow2: the first 8 bytes are a program of in-place
//! operations, the rest is the image. The image is written to a file in a private folder
//! (with a 256 KiB raw file `b` next to it, for images that name it as their backing file),
//! opened with `vimg::formats::updater::open`, and each program byte runs one operation:
//! `check -r leaks|all`, `resize` grow and shrink, `amend`, snapshot create/apply/delete,
//! bitmap add/remove/clear/enable/disable/merge, guest writes, zero writes, unmaps,
//! `rebase -u` onto no backing file, and reopening the file. Every call may fail with an
//! error; none may panic, abort, hang or allocate what the image claims. At the end the
//! file, whatever it now holds, goes through the read-side property
//! (`vimg::fuzzing::open_at_and_read_all`).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vimg::formats::qcow2::{Amend, BitmapOp, Prealloc, Repair};
use vimg::formats::updater::{self, DataTarget, Updater};
use vimg::gate::ExternalPolicy;
use vimg::Format;

/// Program bytes before the image.
const PROGRAM: usize = 8;
/// Growth per resize step (the size is the user's: trusted, so kept small here).
const GROW: u64 = 64 << 10;
/// The largest virtual size a program grows to.
const MAX_SIZE: u64 = 64 << 20;

fn folder() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("vimg-fuzz-update-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("fuzz folder");
        std::fs::write(d.join("b"), vec![0x5au8; 256 << 10]).expect("backing file");
        d
    })
}

/// Removes what earlier runs (or an operation's temporary files) left, except `b`.
fn clean(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name() != "b" {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

const NAMES: [&str; 4] = ["one", "s0", "1", "bm"];

fn run(up: &mut Updater, op: u8, path: &Path, step: usize) -> Option<()> {
    let p = (op >> 4) as u64;
    let name = NAMES[(p & 3) as usize];
    match op & 0x0f {
        0 => {
            let _ = up.repair(Repair::Leaks);
        }
        1 => {
            let _ = up.repair(Repair::All);
        }
        2 => {
            let size = up.virtual_size().ok()?;
            let new = (size + GROW * (p + 1)).min(MAX_SIZE.max(size));
            let pre = if p & 1 == 0 {
                Prealloc::Off
            } else {
                Prealloc::Metadata
            };
            let _ = up.resize(new, pre);
        }
        3 => {
            let size = up.virtual_size().ok()?;
            let new = if p & 1 == 0 {
                size / 2 / 512 * 512
            } else {
                size.saturating_sub(512 * (p + 1))
            };
            let _ = up.resize(new, Prealloc::Off);
        }
        4 => {
            let _ = up.snapshot_create(name, 1_700_000_000 + step as u32, 0);
        }
        5 => {
            let _ = up.snapshot_apply(name);
        }
        6 => {
            let _ = up.snapshot_delete(name);
        }
        7 => {
            let g = if p & 4 == 0 {
                None
            } else {
                Some(512u64 << (p & 3))
            };
            let _ = up.bitmap(name, &BitmapOp::Add { granularity: g });
        }
        8 => {
            let bop = match p >> 2 {
                0 => BitmapOp::Remove,
                1 => BitmapOp::Clear,
                2 => BitmapOp::Enable,
                _ => BitmapOp::Merge(NAMES[((p + 1) & 3) as usize].to_string()),
            };
            let _ = up.bitmap(name, &bop);
        }
        9 | 10 | 11 => {
            let size = up.virtual_size().ok()?;
            let off = size / 16 * p;
            let len = (size - off.min(size)).min(1000 + p * 777);
            let mut t = up.data().ok()?;
            let _ = match op & 0x0f {
                9 => t.write_at(off, &vec![p as u8 + 1; len as usize], None),
                10 => t.write_zeroes(off, len, None),
                _ => match &mut t {
                    DataTarget::Qcow2(w) => {
                        let cs = w.cluster_size();
                        w.unmap_clusters(off / cs, len.div_ceil(cs))
                    }
                    _ => Ok(()),
                },
            };
            let _ = t.finish();
        }
        12 => {
            let _ = up.set_backing(None);
        }
        13 => {
            let a = Amend {
                version: if p & 1 == 0 { Some(3) } else { Some(2) },
                lazy_refcounts: if p & 2 == 0 { None } else { Some(p & 4 != 0) },
            };
            let _ = up.amend(a);
        }
        14 => {
            let _ = up.bitmap(name, &BitmapOp::Disable);
        }
        _ => {
            // Reopen: what was written so far is read back by a fresh open.
            *up = updater::open(path, Format::Qcow2, ExternalPolicy::SameFolder).ok()?;
        }
    }
    Some(())
}

fuzz_target!(|data: &[u8]| {
    if data.len() < PROGRAM {
        return;
    }
    let (program, image) = data.split_at(PROGRAM);
    let dir = folder();
    clean(dir);
    let path = dir.join("img.qcow2");
    if std::fs::write(&path, image).is_err() {
        return;
    }
    if let Ok(mut up) = updater::open(&path, Format::Qcow2, ExternalPolicy::SameFolder) {
        let trace = std::env::var_os("VIMG_FUZZ_TRACE").is_some();
        for (i, &op) in program.iter().enumerate() {
            let done = run(&mut up, op, &path, i).is_none();
            if trace {
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                eprintln!("op {op:#04x}: file {len} bytes");
            }
            if done {
                break;
            }
        }
    }
    // The file as the operations left it must still obey the read-side property.
    // (A file the operations made larger than that is left alone: growing past every
    // cluster the image references is a bug the updater's own checks must prevent.)
    let len = std::fs::metadata(&path)
        .map(|m| m.len())
        .unwrap_or(u64::MAX);
    assert!(
        len <= (image.len() as u64 + (64 << 20)) * 4,
        "the operations grew the file from {} to {len} bytes",
        image.len()
    );
    if let Ok(after) = std::fs::read(&path) {
        vimg::fuzzing::open_at_and_read_all(&after, Some(&path), Some(Format::Qcow2));
    }
});

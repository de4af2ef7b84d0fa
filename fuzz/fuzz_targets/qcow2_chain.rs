//! Untrusted bytes as the top qcow2 image of a chain over a valid base: `commit` and safe
//! `rebase` (`vimg::inplace`). The first byte picks the operation, the rest is the top
//! image, written as `t.qcow2` in a private folder next to a fresh 256 KiB raw file `b`
//! (the base the seeds name as their backing file) and a 128 KiB raw file `c` (a new
//! backing file for `rebase`). 0: `commit`; 1: `commit -d`; 2: `rebase -b ''` (no backing
//! file); 3: `rebase -b c -F raw`. Every call may fail with an error; none may panic,
//! abort, hang or allocate what the image claims. After it, the top image, whatever it
//! now holds, goes through the read-side property (`vimg::fuzzing::open_at_and_read_all`).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vimg::gate::ExternalPolicy;
use vimg::inplace::{self, CommitOptions, NewBacking};
use vimg::{Format, Image, OpenOptions};

fn folder() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("vimg-fuzz-chain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("fuzz folder");
        d
    })
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if (i >> 12) % 3 == 0 {
                0
            } else {
                (i as u8) ^ seed
            }
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&op, top)) = data.split_first() else {
        return;
    };
    let dir = folder();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let (t, b, c) = (dir.join("t.qcow2"), dir.join("b"), dir.join("c"));
    if std::fs::write(&b, pattern(256 << 10, 0x5a)).is_err()
        || std::fs::write(&c, pattern(128 << 10, 0xa5)).is_err()
        || std::fs::write(&t, top).is_err()
    {
        return;
    }
    let policy = ExternalPolicy::SameFolder;
    let progress = |_| {};
    match op & 3 {
        0 | 1 => {
            let opts = CommitOptions {
                base: None,
                drop: op & 1 == 1,
            };
            let _ = inplace::commit(&t, Format::Qcow2, policy, opts, &progress);
        }
        2 => {
            let _ = inplace::rebase(&t, Format::Qcow2, policy, None, &progress);
        }
        _ => {
            let opened = Image::open(&c, &OpenOptions::with_format(Some(Format::Raw)));
            if let Ok(img) = opened {
                let new = NewBacking {
                    name: "c",
                    format: Format::Raw,
                    image: &img,
                };
                let _ = inplace::rebase(&t, Format::Qcow2, policy, Some(new), &progress);
            }
        }
    }
    // The top must have grown no more than the base it copies from allows (rebase copies
    // at most the old backing file's 256 KiB, plus tables).
    let len = std::fs::metadata(&t).map(|m| m.len()).unwrap_or(u64::MAX);
    assert!(
        len <= top.len() as u64 + (16 << 20),
        "the operation grew the top image from {} to {len} bytes",
        top.len()
    );
    if let Ok(after) = std::fs::read(&t) {
        vimg::fuzzing::open_at_and_read_all(&after, Some(&t), Some(Format::Qcow2));
    }
});

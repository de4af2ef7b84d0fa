//! All-or-nothing output: an interrupted or failed conversion leaves no partial file behind
//! and leaves an existing destination byte-identical.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn interrupt_with(signal: i32, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // 2 GiB of holes written out as data with -S 0: long enough to interrupt.
    write_sparse_raw(&src, 2 << 30, &[(0, b"start")]);
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let dst = out_dir.join("dst.raw");
    fs::write(&dst, b"previous content").unwrap();
    let mut child = Command::new(vimg_bin())
        .args([
            "convert",
            "-S",
            "0",
            "-m",
            "1",
            "-O",
            "raw",
            s(&src),
            s(&dst),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the temporary file exists, then interrupt.
    let t0 = Instant::now();
    while listing(&out_dir).len() < 2 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    let interrupted = listing(&out_dir).len() == 2;
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let status = child.wait().unwrap();
    if !interrupted {
        eprintln!("{name}: conversion finished before the signal; nothing to check");
        return;
    }
    assert_eq!(
        listing(&out_dir),
        vec!["dst.raw".to_string()],
        "{name}: temporaries left"
    );
    // All or nothing: either the old destination, byte for byte, or the whole new image (the
    // signal came after the rename, when the output was already complete). Never a part.
    let len = fs::metadata(&dst).unwrap().len();
    if len == 2 << 30 {
        let mut head = [0u8; 5];
        use std::os::unix::fs::FileExt;
        fs::File::open(&dst)
            .unwrap()
            .read_exact_at(&mut head, 0)
            .unwrap();
        assert_eq!(&head, b"start", "{name}: replaced by something else");
        eprintln!("{name}: the signal came after the output was in place (exit {status})");
    } else {
        assert!(!status.success(), "{name}: interrupted convert must fail");
        assert_eq!(
            len,
            b"previous content".len() as u64,
            "{name}: partial output"
        );
        assert_eq!(fs::read(&dst).unwrap(), b"previous content");
    }
}

#[test]
fn sigint_leaves_nothing_behind() {
    interrupt_with(libc::SIGINT, "SIGINT");
}

#[test]
fn sigterm_leaves_nothing_behind() {
    interrupt_with(libc::SIGTERM, "SIGTERM");
}

#[test]
fn out_of_space_leaves_nothing_behind() {
    // Needs a small filesystem: a tmpfs mount, which only root can make.
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    fs::create_dir(&small).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs", s(&small)])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        skipped_line(format_args!(
            "SKIPPED out_of_space_leaves_nothing_behind: cannot mount a tmpfs (needs root)"
        ));
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&small);
    let src = dir.path().join("src.raw");
    let data = pattern(16 << 20, 3);
    write_sparse_raw(&src, 32 << 20, &[(0, &data)]);
    let dst = small.join("dst.raw");
    fs::write(&dst, b"keep me").unwrap();
    let out = vimg_raw(&["convert", "-O", "raw", s(&src), s(&dst)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left"), "{err}");
    assert_eq!(listing(&small), vec!["dst.raw".to_string()]);
    assert_eq!(fs::read(&dst).unwrap(), b"keep me");
}

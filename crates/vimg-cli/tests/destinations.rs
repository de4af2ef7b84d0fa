//! Issue 12, "Where the output goes": block devices (real loop devices), character devices
//! made with mknod, FIFOs with readers and `/dev/stdout` are written in place and never
//! replaced; nothing of a device's old content shows through; existing files keep owner,
//! group and mode; a multi-file output is all-or-nothing together; signals and SIGKILL leave
//! nothing that lives forever.
//!
//! Loop devices need root (CI is root); where `losetup` is not permitted those tests print a
//! SKIPPED line. Every loop device is detached by a guard, on every path.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The fixture every test converts: a 64 MiB qcow2 with data and holes.
fn small_qcow2() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/small.qcow2")
}

/// A loop device over a file of `size` bytes, detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn new(test: &str, dir: &Path, size: u64) -> Option<Loop> {
        let backing = dir.join("backing.img");
        let f = fs::File::create(&backing).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        let out = Command::new("losetup")
            .args(["-f", "--show", s(&backing)])
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Loop {
                dev: String::from_utf8_lossy(&o.stdout).trim().to_string(),
            }),
            Ok(o) => {
                skipped_line(format_args!(
                    "SKIPPED {test}: losetup not permitted here: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
                None
            }
            Err(e) => {
                skipped_line(format_args!("SKIPPED {test}: cannot run losetup: {e}"));
                None
            }
        }
    }

    /// Fills the whole device with `byte`.
    fn fill(&self, byte: u8) {
        use std::io::Write;
        let size = self.size();
        let mut f = fs::OpenOptions::new().write(true).open(&self.dev).unwrap();
        let buf = vec![byte; 1 << 20];
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(buf.len() as u64) as usize;
            f.write_all(&buf[..n]).unwrap();
            pos += n as u64;
        }
        f.sync_all().unwrap();
    }

    fn size(&self) -> u64 {
        use std::io::Seek;
        let mut f = fs::File::open(&self.dev).unwrap();
        f.seek(std::io::SeekFrom::End(0)).unwrap()
    }

    fn read(&self) -> Vec<u8> {
        let mut v = Vec::new();
        fs::File::open(&self.dev)
            .unwrap()
            .read_to_end(&mut v)
            .unwrap();
        v
    }

    fn assert_is_device(&self) {
        let m = fs::symlink_metadata(&self.dev).unwrap();
        assert!(
            m.file_type().is_block_device(),
            "{} was replaced by a {:?}",
            self.dev,
            m.file_type()
        );
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// qemu-img's raw conversion of the fixture.
fn reference(dir: &Path) -> Vec<u8> {
    let r = dir.join("ref.raw");
    qemu_img(&["convert", "-O", "raw", s(&small_qcow2()), s(&r)]);
    fs::read(r).unwrap()
}

/// The device holds the image in its first bytes, and what lies past the image is
/// untouched (`fill`): not one byte of the old content shows through inside the image.
fn assert_device_holds(l: &Loop, want: &[u8], fill: u8, what: &str) {
    l.assert_is_device();
    let got = l.read();
    assert!(got.len() >= want.len());
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: byte {i:#x} is {:#x}, qemu-img's raw has {:#x}",
            got[i], want[i]
        );
    }
    assert!(
        got[want.len()..].iter().all(|&b| b == fill),
        "{what}: the device past the image was written"
    );
}

/// What Cinder, Nova, Ironic and KubeVirt run against a volume: every command line writes
/// the image onto the device, zeroes every range the image has as zero, and leaves the
/// device node a block device. The device is filled with 0xEE before each run.
#[test]
fn loop_device_written_in_place_with_no_old_content() {
    let test = "loop_device_written_in_place_with_no_old_content";
    if !qemu_available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let want = reference(dir.path());
    let Some(l) = Loop::new(test, dir.path(), 96 << 20) else {
        return;
    };
    let src = small_qcow2();
    let link = dir.path().join("by-path-link");
    std::os::unix::fs::symlink(&l.dev, &link).unwrap();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("plain", vec!["convert", "-O", "raw"], &l.dev),
        (
            "cinder -t none",
            vec!["convert", "-O", "raw", "-t", "none", "-f", "qcow2"],
            &l.dev,
        ),
        (
            "cinder -t none -S 0",
            vec!["convert", "-O", "raw", "-t", "none", "-S", "0"],
            &l.dev,
        ),
        (
            "ironic directsync host_device -W",
            vec![
                "convert",
                "-t",
                "directsync",
                "-S",
                "0",
                "-O",
                "host_device",
                "-W",
            ],
            &l.dev,
        ),
        (
            "symlink to the device",
            vec!["convert", "-O", "raw"],
            s(&link),
        ),
        ("-n", vec!["convert", "-n", "-O", "raw"], &l.dev),
        (
            "-n -t none",
            vec!["convert", "-n", "-t", "none", "-O", "raw"],
            &l.dev,
        ),
    ];
    for (what, args, dst) in cases {
        l.fill(0xEE);
        let mut a = args.clone();
        a.push(s(&src));
        a.push(dst);
        let o = vimg_raw(&a);
        assert!(
            o.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_device_holds(&l, &want, 0xEE, what);
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }
    // --checksum on a device covers the image's bytes (not the whole device), read back
    // without O_DIRECT.
    l.fill(0xEE);
    let out = vimg(&[
        "convert",
        "-t",
        "none",
        "--checksum",
        "sha256",
        "-O",
        "raw",
        s(&src),
        &l.dev,
    ]);
    let r = dir.path().join("ref.raw");
    assert_eq!(out, format!("{}  {}\n", sha256_file(&r), l.dev));
    // --target-is-zero is believed: on a device that does not read as zeros, the old bytes
    // show through (the user's promise, as with qemu-img); on a zeroed one the result is
    // right.
    l.fill(0);
    let o = vimg_raw(&[
        "convert",
        "-n",
        "--target-is-zero",
        "-O",
        "raw",
        s(&src),
        &l.dev,
    ]);
    assert!(o.status.success());
    assert_device_holds(&l, &want, 0, "--target-is-zero on a zeroed device");
    // Other formats go onto the device zeroed first (oVirt's qcow2 on a logical volume):
    // qemu-img finds them clean and reads the same content as the source.
    for (fmt, opts) in [
        ("qcow2", "compat=1.1"),
        ("vpc", "subformat=dynamic"),
        ("vdi", "static=off"),
    ] {
        l.fill(0xEE);
        vimg(&[
            "convert",
            "-t",
            "none",
            "-O",
            fmt,
            "-o",
            opts,
            s(&src),
            &l.dev,
        ]);
        l.assert_is_device();
        if fmt != "vpc" {
            qemu_img(&["check", "-f", fmt, &l.dev]);
        }
        qemu_img(&["compare", "-f", fmt, "-F", "qcow2", &l.dev, s(&src)]);
    }
    // -n into a device takes raw only; the device is not written.
    l.fill(0xEE);
    let o = vimg_raw(&["convert", "-n", "-O", "qcow2", s(&src), &l.dev]);
    assert!(!o.status.success());
    assert!(l.read().iter().all(|&b| b == 0xEE), "refusal wrote");
    // `create` on a device: raw keeps the node and, like qemu-img, writes nothing; qcow2
    // zeroes the device and writes a clean empty image.
    vimg(&["create", "-f", "raw", &l.dev, "64M"]);
    l.assert_is_device();
    assert!(l.read().iter().all(|&b| b == 0xEE), "raw create wrote");
    vimg(&["create", "-f", "qcow2", &l.dev, "64M"]);
    l.assert_is_device();
    qemu_img(&["check", "-f", "qcow2", &l.dev]);
    let map = qemu_img(&["map", "--output=json", "-f", "qcow2", &l.dev]);
    assert!(!map.contains("\"data\": true"), "{map}");
}

/// An image larger than the device is refused up front with qemu-img's messages, and the
/// device is not written.
#[test]
fn loop_device_too_small_is_refused_up_front() {
    let test = "loop_device_too_small_is_refused_up_front";
    if !qemu_available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(l) = Loop::new(test, dir.path(), 16 << 20) else {
        return;
    };
    l.fill(0xEE);
    let src = small_qcow2();
    for (args, msg) in [
        (
            vec!["convert", "-O", "raw"],
            format!(
                "vimg: {}: error while converting raw: Cannot grow device files",
                l.dev
            ),
        ),
        (
            vec!["convert", "-n", "-O", "raw"],
            "vimg: output file is smaller than input file".to_string(),
        ),
    ] {
        let mut a = args.clone();
        a.push(s(&src));
        a.push(&l.dev);
        let o = vimg_raw(&a);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim(), msg);
        // qemu-img says the same.
        let q = run_cmd("qemu-img", &a);
        assert!(!q.status.success());
        assert_eq!(
            String::from_utf8_lossy(&q.stderr).trim(),
            msg.replacen("vimg:", "qemu-img:", 1)
        );
    }
    assert!(l.read().iter().all(|&b| b == 0xEE));
    l.assert_is_device();
}

/// `info` on a device reports the host_device protocol exactly as qemu-img does.
#[test]
fn info_on_loop_device_matches_qemu() {
    let test = "info_on_loop_device_matches_qemu";
    if !qemu_available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(l) = Loop::new(test, dir.path(), 8 << 20) else {
        return;
    };
    let v = vimg(&["info", &l.dev]);
    assert!(v.contains("protocol type: host_device"), "{v}");
    assert_eq!(v, qemu_img(&["info", &l.dev]));
}

/// A character device made with mknod (the null device): streamed to, never replaced; a
/// format that needs to seek is refused with a clear message.
#[test]
fn mknod_null_device_is_written_not_replaced() {
    let test = "mknod_null_device_is_written_not_replaced";
    let dir = tempfile::tempdir().unwrap();
    let null = dir.path().join("null");
    let made = Command::new("mknod")
        .args([s(&null), "c", "1", "3"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !made {
        skipped_line(format_args!("SKIPPED {test}: mknod not permitted here"));
        return;
    }
    let src = small_qcow2();
    for fmt in [
        &["-O", "raw"][..],
        &["-O", "vmdk", "-o", "subformat=streamOptimized"],
    ] {
        let mut a = vec!["convert"];
        a.extend_from_slice(fmt);
        a.extend([s(&src), s(&null)]);
        let o = vimg_raw(&a);
        assert!(
            o.status.success(),
            "{fmt:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(fs::metadata(&null).unwrap().file_type().is_char_device());
    }
    let o = vimg_raw(&["convert", "-O", "qcow2", s(&src), s(&null)]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot be written to a stream"), "{err}");
    assert!(fs::metadata(&null).unwrap().file_type().is_char_device());
    // -n: a character device has no size to hold the image; qemu-img's message.
    let o = vimg_raw(&["convert", "-n", "-O", "raw", s(&src), s(&null)]);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim(),
        "vimg: output file is smaller than input file"
    );
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "leftovers");
}

/// Reads everything from the FIFO at `p` in a thread.
fn fifo_reader(p: &Path) -> std::thread::JoinHandle<Vec<u8>> {
    let p = p.to_path_buf();
    std::thread::spawn(move || {
        let mut v = Vec::new();
        fs::File::open(p).unwrap().read_to_end(&mut v).unwrap();
        v
    })
}

/// A FIFO gets the image as a stream (its reader sees qemu-img's raw bytes) and stays a
/// FIFO; a format that needs to seek sends the reader nothing.
#[test]
fn fifo_with_reader_gets_the_stream() {
    let test = "fifo_with_reader_gets_the_stream";
    if !qemu_available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let want = reference(dir.path());
    let fifo = dir.path().join("pipe");
    assert!(Command::new("mkfifo")
        .arg(s(&fifo))
        .status()
        .unwrap()
        .success());
    let src = small_qcow2();
    let r = fifo_reader(&fifo);
    let o = vimg_raw(&["convert", "-O", "raw", s(&src), s(&fifo)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(r.join().unwrap() == want, "the reader got other bytes");
    assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
    let r = fifo_reader(&fifo);
    let o = vimg_raw(&["convert", "-O", "qcow2", s(&src), s(&fifo)]);
    assert!(!o.status.success());
    assert!(r.join().unwrap().is_empty(), "a refused format wrote");
    assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

/// `/dev/stdout` (Proxmox's storage layer) redirected to a file is written through, and
/// the system's `/dev/stdout` stays what it was.
#[test]
fn dev_stdout_is_written_through() {
    let test = "dev_stdout_is_written_through";
    if !qemu_available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let want = reference(dir.path());
    let before = fs::symlink_metadata("/dev/stdout").ok().map(|m| m.ino());
    let out = dir.path().join("out.raw");
    let f = fs::File::create(&out).unwrap();
    let st = Command::new(vimg_bin())
        .args([
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            s(&small_qcow2()),
            "/dev/stdout",
        ])
        .stdout(Stdio::from(f))
        .status()
        .unwrap();
    assert!(st.success());
    assert!(fs::read(&out).unwrap() == want);
    assert_eq!(
        fs::symlink_metadata("/dev/stdout").ok().map(|m| m.ino()),
        before
    );
    // Through a pipe, too; the checksum line and progress go to stderr, never into the
    // image's bytes.
    let o = Command::new(vimg_bin())
        .args([
            "convert",
            "-p",
            "--checksum",
            "sha256",
            "-O",
            "raw",
            s(&small_qcow2()),
            "/dev/stdout",
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(o.stdout == want);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "{}  /dev/stdout",
            sha256_file(&dir.path().join("ref.raw"))
        )),
        "{err}"
    );
}

fn uid_of(p: &Path) -> (u32, u32, u32) {
    let m = fs::metadata(p).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

/// An existing file owned by another user with mode 0600 keeps owner, group and mode when
/// it is replaced; a new file gets the umask's mode; a hard-linked file is replaced under
/// its name (the other link keeps the old bytes) with a note saying so.
#[test]
fn existing_file_keeps_owner_group_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    let src = small_qcow2();
    let dst = dir.path().join("disk.raw");
    fs::write(&dst, b"old").unwrap();
    // SAFETY: chown of a file this test made.
    let c = std::ffi::CString::new(s(&dst)).unwrap();
    let chowned = unsafe { libc::chown(c.as_ptr(), 4321, 4322) } == 0;
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o600)).unwrap();
    let o = vimg_raw(&["convert", "-O", "raw", s(&src), s(&dst)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (uid, gid, mode) = uid_of(&dst);
    assert_eq!(mode, 0o600, "mode widened");
    if chowned {
        assert_eq!((uid, gid), (4321, 4322), "owner lost");
    } else {
        skipped_line(format_args!(
            "SKIPPED part of existing_file_keeps_owner_group_and_mode: chown not permitted"
        ));
    }
    assert_eq!(fs::metadata(&dst).unwrap().len(), 64 << 20);
    // A new file: 0644 under the umask (the test runs with whatever umask it inherited).
    let new = dir.path().join("new.raw");
    vimg(&["convert", "-O", "raw", s(&src), s(&new)]);
    // SAFETY: umask read and restored at once.
    let mask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    };
    assert_eq!(uid_of(&new).2, 0o644 & !(mask as u32));
    // Hard links: the name given gets the new file; the other link keeps the old content.
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    fs::write(&a, b"old").unwrap();
    fs::hard_link(&a, &b).unwrap();
    let o = vimg_raw(&["convert", "-O", "raw", s(&src), s(&a)]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("hard links"), "{err}");
    assert_eq!(fs::read(&b).unwrap(), b"old");
    assert_eq!(fs::metadata(&a).unwrap().len(), 64 << 20);
}

/// A user who may write the file but not its folder: the file is written in place, with a
/// note, instead of a bare "Permission denied". Run as another uid with setpriv.
#[test]
fn unwritable_folder_writable_file_is_written_in_place() {
    let test = "unwritable_folder_writable_file_is_written_in_place";
    if !qemu_available(test) {
        return;
    }
    if !have("setpriv") {
        skipped_line(format_args!("SKIPPED {test}: setpriv not on PATH"));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let want = reference(dir.path());
    let folder = dir.path().join("ro");
    fs::create_dir(&folder).unwrap();
    let dst = folder.join("disk.raw");
    fs::write(&dst, vec![0xEEu8; 80 << 20]).unwrap();
    let src = dir.path().join("src.qcow2");
    fs::copy(small_qcow2(), &src).unwrap();
    let cd = std::ffi::CString::new(s(&dst)).unwrap();
    // SAFETY: chown of a file this test made.
    if unsafe { libc::chown(cd.as_ptr(), 4321, 4321) } != 0 {
        skipped_line(format_args!("SKIPPED {test}: chown not permitted"));
        return;
    }
    for p in [dir.path(), folder.as_path()] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(&src, fs::Permissions::from_mode(0o644)).unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=4321", "--regid=4321", "--clear-groups"])
        .arg(vimg_bin())
        .args(["convert", "-O", "raw", s(&src), s(&dst)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("written in place"), "{err}");
    assert!(fs::read(&dst).unwrap() == want);
    assert_eq!(uid_of(&dst).0, 4321);
    // A new file in that folder cannot be made at all: the error names the folder.
    let o = Command::new("setpriv")
        .args(["--reuid=4321", "--regid=4321", "--clear-groups"])
        .arg(vimg_bin())
        .args(["convert", "-O", "raw", s(&src), s(&folder.join("new.raw"))])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!("in the folder '{}'", folder.display()))
            && err.contains("Permission denied"),
        "{err}"
    );
}

/// monolithicFlat over an existing set whose extent is immutable: the extent cannot be
/// replaced, so the descriptor is not either — the old set stays whole and consistent, and
/// no temporary is left.
#[test]
fn immutable_extent_leaves_the_old_set() {
    let test = "immutable_extent_leaves_the_old_set";
    let dir = tempfile::tempdir().unwrap();
    let src = small_qcow2();
    let a = dir.path().join("a.vmdk");
    let flat = dir.path().join("a-flat.vmdk");
    vimg(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&src),
        s(&a),
    ]);
    let old_desc = fs::read(&a).unwrap();
    let old_flat_len = fs::metadata(&flat).unwrap().len();
    let ok = Command::new("chattr")
        .args(["+i", s(&flat)])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        skipped_line(format_args!(
            "SKIPPED {test}: the filesystem refuses chattr +i"
        ));
        return;
    }
    struct Unlock(PathBuf);
    impl Drop for Unlock {
        fn drop(&mut self) {
            let _ = Command::new("chattr").args(["-i", s(&self.0)]).status();
        }
    }
    let _unlock = Unlock(flat.clone());
    // A different size, so a descriptor that moved would describe another extent.
    let o = vimg_raw(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&src),
        s(&a),
        // (size stays the source's; the descriptor's CID differs per run anyway)
    ]);
    assert!(
        !o.status.success(),
        "the rename over an immutable file cannot work"
    );
    assert_eq!(fs::read(&a).unwrap(), old_desc, "descriptor replaced");
    assert_eq!(fs::metadata(&flat).unwrap().len(), old_flat_len);
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["a-flat.vmdk", "a.vmdk"], "leftovers");
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Starts a long conversion into `out_dir/dst.raw` and waits until its temporary exists.
fn start_long(src: &Path, dst: &Path) -> std::process::Child {
    let child = Command::new(vimg_bin())
        .args(["convert", "-S", "0", "-m", "1", "-O", "raw", s(src), s(dst)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let folder = dst.parent().unwrap();
    let t0 = Instant::now();
    while listing(folder).len() < 2 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    child
}

/// SIGHUP, SIGQUIT and SIGXCPU clean up like SIGTERM. SIGKILL cannot be caught: its
/// temporary (named with pid and start time) is removed by the next conversion to the same
/// destination, while a temporary of a live process is left alone.
#[test]
fn hup_and_kill_then_a_second_run_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    write_sparse_raw(&src, 4 << 30, &[(0, b"start")]);
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let dst = out_dir.join("dst.raw");
    fs::write(&dst, b"previous").unwrap();
    for sig in [libc::SIGHUP, libc::SIGQUIT, libc::SIGXCPU] {
        let mut child = start_long(&src, &dst);
        let running = listing(&out_dir).len() == 2;
        // SAFETY: a signal to the child this test started.
        unsafe { libc::kill(child.id() as i32, sig) };
        let st = child.wait().unwrap();
        if !running {
            eprintln!("signal {sig}: finished before the signal; nothing to check");
            continue;
        }
        assert!(!st.success());
        assert_eq!(
            listing(&out_dir),
            vec!["dst.raw"],
            "signal {sig}: leftovers"
        );
        assert_eq!(fs::read(&dst).unwrap(), b"previous");
    }
    let mut child = start_long(&src, &dst);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let left = listing(&out_dir);
    assert_eq!(left.len(), 2, "SIGKILL leaves its temporary: {left:?}");
    let stale = left.iter().find(|n| *n != "dst.raw").unwrap().clone();
    assert!(stale.starts_with(".dst.raw.vimg-"), "{stale}");
    // A temporary of a live process (this test's own pid and start time) must survive.
    let me = std::process::id();
    let stat = fs::read_to_string(format!("/proc/{me}/stat")).unwrap();
    let start: u64 = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let live = format!(".dst.raw.vimg-{me}-{start}-0.tmp");
    fs::write(out_dir.join(&live), b"live").unwrap();
    // The second run, to the same destination, removes the stale one.
    let small = dir.path().join("small.raw");
    write_sparse_raw(&small, 1 << 20, &[(0, b"new")]);
    vimg(&["convert", "-O", "raw", s(&small), s(&dst)]);
    assert_eq!(listing(&out_dir), vec![live.clone(), "dst.raw".to_string()]);
    assert_eq!(fs::metadata(&dst).unwrap().len(), 1 << 20);
}

/// A destination name that fits NAME_MAX works: the temporary name is shortened to fit.
#[test]
fn longest_destination_name_fits() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.raw");
    write_sparse_raw(&src, 1 << 20, &[(0, b"x")]);
    for len in [200, 244, 255] {
        let name = format!("{}.raw", "n".repeat(len - 4));
        let dst = dir.path().join(&name);
        vimg(&["convert", "-O", "raw", s(&src), s(&dst)]);
        assert_eq!(fs::metadata(&dst).unwrap().len(), 1 << 20);
        fs::remove_file(&dst).unwrap();
    }
    assert_eq!(listing(dir.path()), vec!["s.raw"]);
}

/// A directory destination is refused before any work: before the source is even opened.
#[test]
fn directory_destination_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let o = vimg_raw(&[
        "convert",
        "-O",
        "raw",
        s(&dir.path().join("no-such-source.qcow2")),
        s(dir.path()),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Is a directory"), "{err}");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// A conversion onto a device interrupted by SIGTERM says how far it got (a device cannot
/// be all or nothing), and the device node stays.
#[test]
fn interrupted_device_write_reports_how_far() {
    let test = "interrupted_device_write_reports_how_far";
    let dir = tempfile::tempdir().unwrap();
    let Some(l) = Loop::new(test, dir.path(), 1 << 30) else {
        return;
    };
    let src = dir.path().join("src.raw");
    write_sparse_raw(&src, 1 << 30, &[(0, b"start")]);
    let child = Command::new(vimg_bin())
        .args([
            "convert",
            "-t",
            "none",
            "-S",
            "0",
            "-m",
            "1",
            "-O",
            "raw",
            s(&src),
            &l.dev,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.success() {
        eprintln!("{test}: finished before the signal; nothing to check");
        return;
    }
    // 130 when the copy stopped; 143 when the device's final flush outlasted the two
    // seconds a signal gives it. Either way the user is told how far it got.
    assert!(matches!(o.status.code(), Some(130) | Some(143)), "{err}");
    assert!(
        err.contains("interrupted; the block device")
            && err.contains("was written in place and is incomplete")
            && err.contains("bytes written, up to offset"),
        "{err}"
    );
    l.assert_is_device();
}

/// A device read as the source is refused as the destination, also through a second node
/// of the same device made with mknod, before anything is written.
#[test]
fn same_device_through_another_node_is_refused() {
    let test = "same_device_through_another_node_is_refused";
    let dir = tempfile::tempdir().unwrap();
    let Some(l) = Loop::new(test, dir.path(), 8 << 20) else {
        return;
    };
    l.fill(0xEE);
    let rdev = fs::metadata(&l.dev).unwrap().rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let node = dir.path().join("node");
    let made = Command::new("mknod")
        .args([s(&node), "b", &major.to_string(), &minor.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !made {
        skipped_line(format_args!("SKIPPED {test}: mknod not permitted here"));
        return;
    }
    for dst in [l.dev.as_str(), s(&node)] {
        let o = vimg_raw(&["convert", "-f", "raw", "-O", "raw", &l.dev, dst]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("which the source reads"), "{err}");
    }
    assert!(l.read().iter().all(|&b| b == 0xEE));
}

/// O_DIRECT onto a device with 4 KiB logical blocks (`losetup --sector-size 4096`), from a
/// source whose data and zero runs start and end on 512-byte boundaries and whose size is
/// not a multiple of 4 KiB: every partial block is read, patched and written whole, zero
/// runs are punched in whole blocks and written at their edges. The device then holds
/// qemu-img's raw bytes and nothing of its old content.
#[test]
fn direct_io_on_4k_sectors_with_unaligned_runs() {
    let test = "direct_io_on_4k_sectors_with_unaligned_runs";
    if !qemu_available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing4k.img");
    fs::File::create(&backing)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let o = Command::new("losetup")
        .args(["-f", "--show", "--sector-size", "4096", s(&backing)])
        .output();
    let l = match o {
        Ok(o) if o.status.success() => Loop {
            dev: String::from_utf8_lossy(&o.stdout).trim().to_string(),
        },
        _ => {
            skipped_line(format_args!(
                "SKIPPED {test}: losetup --sector-size 4096 not permitted here"
            ));
            return;
        }
    };
    let src = dir.path().join("src.raw");
    let size = (8 << 20) + 1536;
    let a = pattern(3 * 512, 1);
    let b = pattern(9 * 512, 2);
    let c = pattern(1024, 3);
    write_sparse_raw(
        &src,
        size,
        &[
            (512, &a[..]),
            (4096 * 3 + 1024, &b[..]),
            (size - 1024, &c[..]),
        ],
    );
    let want = fs::read(&src).unwrap();
    for sparse in ["512", "4k", "0"] {
        l.fill(0xEE);
        vimg(&[
            "convert",
            "-t",
            "none",
            "-S",
            sparse,
            "-f",
            "raw",
            "-O",
            "raw",
            s(&src),
            &l.dev,
        ]);
        assert_device_holds(&l, &want, 0xEE, &format!("-S {sparse}"));
    }
}

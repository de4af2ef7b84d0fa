//! Issue 16: a source whose whole-image probe is deferred (a container decoded while the copy
//! starts) and then refuses it — here a qcow2 that is also a valid fixed VHD, inside xz — is
//! refused before any destination written in place is opened or truncated. A refused run
//! leaves every destination as it was: a FIFO gets no byte (and is not even opened), a file
//! written with `-n` keeps its bytes, `/dev/stdout` redirected onto an existing file keeps
//! it, the in-place fallback (a writable file in a folder the user may not write) keeps the
//! file, and an existing regular file replaced atomically survives.

mod common;

use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `p.qcow2.xz`: 8 MiB qcow2 with 1 MiB of data and a valid fixed-VHD footer appended
/// (ambiguous, refused by the probe), in xz. `None` (and a SKIPPED line) without the tools.
fn polyglot_xz(test: &str, dir: &Path) -> Option<PathBuf> {
    use vimg::formats::vhd::header::Footer;
    if !qemu_available(test) || !tool_available(test, "xz") {
        return None;
    }
    let vhd = dir.join("f.vpc");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        s(&vhd),
        "1M",
    ]);
    let v = fs::read(&vhd).unwrap();
    let mut footer = Footer::parse(&v[v.len() - 512..]).unwrap();
    let p = dir.join("p.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "8M"]);
    qemu_io("qcow2", &p, &["write -P 7 0 1M"]);
    let mut b = fs::read(&p).unwrap();
    b.resize(b.len().div_ceil(512) * 512, 0);
    footer.current_size = b.len() as u64;
    footer.original_size = b.len() as u64;
    footer.seal();
    b.extend_from_slice(&footer.to_bytes());
    fs::write(&p, &b).unwrap();
    run_ok("xz", &["-k", "-q", "-f", s(&p)]);
    Some(dir.join("p.qcow2.xz"))
}

/// Runs `cmd`, killing it after 60 s (a FIFO opened without a reader would block).
fn run_bounded(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "still running after 60 s: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_refused(what: &str, o: &Output) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{what}: {err}");
    assert!(err.contains("ambiguous"), "{what}: {err}");
}

fn no_temporaries(dir: &Path) {
    let left: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp") || n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn refused_source_leaves_every_destination_untouched() {
    let test = "refused_source_leaves_every_destination_untouched";
    let dir = tempfile::tempdir().unwrap();
    let Some(src) = polyglot_xz(test, dir.path()) else {
        return;
    };
    let old: Vec<u8> = (0..(9u32 << 20)).map(|i| (i % 251) as u8).collect();
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();

    // An existing regular file, replaced atomically: survives.
    let f = out.join("file.raw");
    fs::write(&f, &old).unwrap();
    let o = run_bounded({
        let mut c = Command::new(vimg_bin());
        c.args(["convert", "-O", "raw", s(&src), s(&f)]);
        c
    });
    assert_refused("over a regular file", &o);
    assert!(fs::read(&f).unwrap() == old, "the regular file changed");

    // -n into an existing file: written in place, so checked before it is opened.
    let o = run_bounded({
        let mut c = Command::new(vimg_bin());
        c.args(["convert", "-n", "-O", "raw", s(&src), s(&f)]);
        c
    });
    assert_refused("-n", &o);
    assert!(fs::read(&f).unwrap() == old, "-n wrote into the file");

    // /dev/stdout onto an existing file opened without truncation (`1<>file`): vimg writes
    // that open file in place from empty (as qemu-img does), so a refusal must come first.
    let o = run_bounded({
        let mut c = Command::new(vimg_bin());
        c.args(["convert", "-O", "raw", s(&src), "/dev/stdout"]);
        c.stdout(fs::OpenOptions::new().write(true).open(&f).unwrap());
        c
    });
    assert_refused("/dev/stdout onto a file", &o);
    assert!(
        fs::read(&f).unwrap() == old,
        "/dev/stdout: the file was truncated or written"
    );

    // A FIFO with a reader: refused before it is opened, the reader sees no byte.
    let fifo = out.join("fifo");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: mkfifo on a path in the test's own folder.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    // Opened non-blocking, so it needs no writer; a writer's open would succeed.
    let reader = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let o = run_bounded({
        let mut c = Command::new(vimg_bin());
        c.args(["convert", "-O", "raw", s(&src), s(&fifo)]);
        c
    });
    assert_refused("into a FIFO", &o);
    let mut buf = [0u8; 4096];
    let got = std::io::Read::read(&mut &reader, &mut buf);
    assert!(
        matches!(got, Ok(0))
            || matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the FIFO received bytes: {got:?}"
    );
    drop(reader);
    fs::remove_file(&fifo).unwrap();
    no_temporaries(&out);

    // The in-place fallback: a user who may write the file but not its folder.
    if !have("setpriv") {
        skipped_line(format_args!(
            "SKIPPED {test} (in-place fallback part): setpriv not on PATH"
        ));
        return;
    }
    let cf = std::ffi::CString::new(s(&f)).unwrap();
    // SAFETY: chown of a file this test made.
    if unsafe { libc::chown(cf.as_ptr(), 4321, 4321) } != 0 {
        skipped_line(format_args!(
            "SKIPPED {test} (in-place fallback part): chown not permitted"
        ));
        return;
    }
    for p in [dir.path(), out.as_path()] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(&src, fs::Permissions::from_mode(0o644)).unwrap();
    let o = run_bounded({
        let mut c = Command::new("setpriv");
        c.args(["--reuid=4321", "--regid=4321", "--clear-groups"])
            .arg(vimg_bin())
            .args(["convert", "-O", "raw", s(&src), s(&f)]);
        c
    });
    assert_refused("in-place fallback", &o);
    assert!(
        fs::read(&f).unwrap() == old,
        "the in-place fallback truncated or wrote the file"
    );
    // The same source converted by qemu-img's rules is fine once -f says what it is: the
    // fallback itself works (the file is written in place, with a note).
    let plain = dir.path().join("plain.qcow2");
    fs::copy(dir.path().join("p.qcow2"), &plain).unwrap();
    fs::set_permissions(&plain, fs::Permissions::from_mode(0o644)).unwrap();
    let o = run_bounded({
        let mut c = Command::new("setpriv");
        c.args(["--reuid=4321", "--regid=4321", "--clear-groups"])
            .arg(vimg_bin())
            .args(["convert", "-f", "qcow2", "-O", "raw", s(&plain), s(&f)]);
        c
    });
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("written in place"), "{err}");
    assert_eq!(fs::metadata(&f).unwrap().len(), 8 << 20);
    no_temporaries(&out);
}

//! The refcount rebuild of a dirty (`lazy_refcounts=on`, writer killed) qcow2 image, with
//! qemu-img as the oracle (iotest 061's dirty downgrade): `check -r all` and the repair
//! every in-place command makes first put the new refcount blocks and table where QEMU
//! puts them and keep the L1/L2 tables, so the repaired file is qemu-img's byte for byte;
//! killed at sampled points of the repair, the image is never worse than the dirty image
//! it was (no more corruptions, the same guest content), and both vimg's and qemu-img's
//! repair bring it back clean.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const HOOK: &str = "VIMG_TEST_CRASH_AFTER_WRITES";

/// A dirty image: created with `opts` (lazy refcounts on), `clean` written and closed
/// normally, then `dirty` written by a qemu-io that is killed after a flush.
fn dirty_image(dir: &Path, name: &str, opts: &str, clean: &[&str], dirty: &[&str]) -> PathBuf {
    let img = dir.join(format!("{name}.qcow2"));
    qemu_create(&img, "qcow2", &format!("lazy_refcounts=on,{opts}"), "64M");
    if !clean.is_empty() {
        qemu_io("qcow2", &img, clean);
    }
    let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
    for c in dirty.iter().copied().chain(["flush", "sigraise 9"]) {
        args.push("-c".into());
        args.push(c.into());
    }
    args.push(s(&img).into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_cmd("qemu-io", &refs);
    assert_eq!(
        out.status.signal(),
        Some(9),
        "{name}: qemu-io was not killed"
    );
    assert!(is_dirty(&img), "{name}: not dirty");
    let (code, text) = qemu_check_output(&img, "qcow2");
    assert_eq!(
        code, 2,
        "{name}: the dirty image has no corruption:\n{text}"
    );
    img
}

/// The header's dirty bit (incompatible feature bit 0, the last byte of the field at 72).
fn is_dirty(img: &Path) -> bool {
    read_bytes::<1>(img, 79)[0] & 1 != 0
}

/// `qemu-img check --output=json`: exit code, corruptions, leaks.
fn check_counts(img: &Path) -> (i32, u64, u64) {
    let out = run_cmd("qemu-img", &["check", "--output=json", s(img)]);
    let code = out.status.code().unwrap_or(-1);
    let v = json(&String::from_utf8_lossy(&out.stdout));
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    (code, n("corruptions"), n("leaks"))
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).expect("copy");
}

/// The scenarios: QEMU's own (061), holes and a two-cluster refcount table (512-byte
/// clusters, so many refcount blocks), an internal snapshot, 64-bit refcounts.
fn scenarios(d: &Path) -> Vec<(&'static str, PathBuf)> {
    vec![
        (
            "iotest-061",
            dirty_image(
                d,
                "i061",
                "cluster_size=65536",
                &[],
                &["write -P 0x2a 0 128k"],
            ),
        ),
        (
            "holes",
            dirty_image(
                d,
                "holes",
                "cluster_size=512",
                &["write -P 0x11 0 3M", "discard 1M 512k"],
                &["write -P 0x22 6M 6M", "write -P 0x33 1M 64k"],
            ),
        ),
        ("snapshot", {
            let img = d.join("snap.qcow2");
            qemu_create(&img, "qcow2", "lazy_refcounts=on", "64M");
            qemu_io("qcow2", &img, &["write -P 0x55 0 1M"]);
            qemu_img(&["snapshot", "-c", "s1", s(&img)]);
            let out = run_cmd(
                "qemu-io",
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    "write -P 0x66 512k 1M",
                    "-c",
                    "write -P 0x67 8M 128k",
                    "-c",
                    "flush",
                    "-c",
                    "sigraise 9",
                    s(&img),
                ],
            );
            assert_eq!(out.status.signal(), Some(9));
            assert!(is_dirty(&img));
            img
        }),
        (
            "refcount64",
            dirty_image(
                d,
                "r64",
                "cluster_size=4096,refcount_bits=64",
                &["write -P 0x71 0 256k"],
                &["write -P 0x72 2M 2M"],
            ),
        ),
    ]
}

/// `check -r all` of a dirty image: the same words, exit code and file as qemu-img's.
#[test]
fn check_repair_of_dirty_image_is_qemus_file() {
    if !qemu_available("check_repair_of_dirty_image_is_qemus_file") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for (name, pristine) in scenarios(d) {
        let q = d.join(format!("{name}-q.qcow2"));
        let v = d.join(format!("{name}-v.qcow2"));
        copy(&pristine, &q);
        copy(&pristine, &v);
        let qo = run_cmd("qemu-img", &["check", "-r", "all", s(&q)]);
        let vo = vimg_raw(&["check", "-r", "all", s(&v)]);
        let text = |o: &std::process::Output| {
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        };
        assert_eq!(text(&vo), text(&qo), "{name}: check -r all");
        assert!(
            String::from_utf8_lossy(&qo.stdout).contains("Rebuilding refcount structure")
                || String::from_utf8_lossy(&qo.stderr).contains("Rebuilding refcount structure"),
            "{name}: qemu-img did not rebuild"
        );
        assert_same_file(&q, &v);
        assert_eq!(check_counts(&v), (0, 0, 0), "{name}: repaired");
        assert!(!is_dirty(&v), "{name}: still dirty");
        qemu_img(&["compare", s(&pristine), s(&v)]);
    }
}

/// iotest 061's dirty downgrade: `amend -o compat=0.10` repairs first (the L1 table stays
/// at 0x30000, the new refcount table goes to 0x80000), then downgrades.
#[test]
fn amend_downgrade_of_dirty_image_like_qemu() {
    if !qemu_available("amend_downgrade_of_dirty_image_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pristine = dirty_image(d, "p", "cluster_size=65536", &[], &["write -P 0x2a 0 128k"]);
    let q = d.join("q.qcow2");
    let v = d.join("v.qcow2");
    copy(&pristine, &q);
    copy(&pristine, &v);
    qemu_img(&["amend", "-o", "compat=0.10", s(&q)]);
    vimg(&["amend", "-o", "compat=0.10", s(&v)]);
    for (what, off) in [
        ("version", 4u64),
        ("l1_table_offset", 40),
        ("refcount_table_offset", 48),
    ] {
        let n = if what == "version" { 4 } else { 8 };
        let get = |p: &Path| read_bytes::<8>(p, off)[..n].to_vec();
        assert_eq!(get(&v), get(&q), "{what}");
    }
    assert_eq!(rd64be(&v, 40), 0x30000);
    assert_eq!(rd64be(&v, 48), 0x80000);
    assert_eq!(check_counts(&v), (0, 0, 0));
    qemu_img(&["compare", s(&pristine), s(&v)]);
    qemu_img(&["compare", s(&q), s(&v)]);
}

/// Runs `vimg check -r all img` killed before write/flush/truncate number `n`; true when
/// it was killed.
fn repair_killed(img: &Path, n: u64) -> bool {
    let out = Command::new(vimg_bin())
        .args(["check", "-r", "all", s(img)])
        .env(HOOK, n.to_string())
        .output()
        .expect("run vimg");
    match out.status.signal() {
        Some(9) => true,
        Some(sig) => panic!("vimg died of signal {sig}"),
        None => {
            assert_eq!(
                out.status.code(),
                Some(0),
                "finished with {HOOK}={n}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            false
        }
    }
}

/// What an image killed during the repair must be: no more corruptions or leaks than the
/// dirty image (`before`), the same guest content, dirty unless the repair is done (then
/// qemu-img's repaired file), and brought back clean by vimg's and by qemu-img's repair.
fn assert_killed_state(
    w: &str,
    img: &Path,
    pristine: &Path,
    qemu_done: &Path,
    before: (i32, u64, u64),
) {
    let (code, corr, leaks) = check_counts(img);
    assert!(
        code == 0 || code == 2 || code == 3,
        "{w}: qemu-img check exit {code}"
    );
    assert!(
        corr <= before.1,
        "{w}: {corr} corruptions, {} before",
        before.1
    );
    assert!(leaks <= before.2, "{w}: {leaks} leaks, {} before", before.2);
    if is_dirty(img) {
        // Still the dirty image (its refcounts not trusted by any opener) or one with exact
        // refcounts not yet marked clean.
    } else {
        assert_eq!(code, 0, "{w}: clean bit with findings");
        assert_same_file(img, qemu_done);
    }
    qemu_img(&["compare", s(pristine), s(img)]);
    let dir = img.parent().expect("dir");
    let r1 = dir.join("again-vimg.qcow2");
    let r2 = dir.join("again-qemu.qcow2");
    copy(img, &r1);
    copy(img, &r2);
    vimg(&["check", "-r", "all", s(&r1)]);
    assert_eq!(check_counts(&r1), (0, 0, 0), "{w}: after vimg's repair");
    assert!(!is_dirty(&r1), "{w}: dirty after vimg's repair");
    qemu_img(&["compare", s(pristine), s(&r1)]);
    let out = run_cmd("qemu-img", &["check", "-r", "all", s(&r2)]);
    assert_eq!(out.status.code(), Some(0), "{w}: qemu-img check -r all");
    assert_eq!(check_counts(&r2), (0, 0, 0), "{w}: after qemu-img's repair");
    qemu_img(&["compare", s(pristine), s(&r2)]);
}

/// SIGKILL during the rebuild: every point of the small image, sampled points and the
/// last ones (the switch, the punched old structure, the copied flags, the dirty bit) of
/// the one with many refcount blocks and a two-cluster table.
#[test]
fn dirty_rebuild_killed_at_sampled_points() {
    if !qemu_available("dirty_rebuild_killed_at_sampled_points") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cases = [
        (
            "iotest-061",
            dirty_image(
                d,
                "i061",
                "cluster_size=65536",
                &[],
                &["write -P 0x2a 0 128k"],
            ),
            1u64,
        ),
        (
            "holes",
            dirty_image(
                d,
                "holes",
                "cluster_size=512",
                &["write -P 0x11 0 3M", "discard 1M 512k"],
                &["write -P 0x22 6M 6M", "write -P 0x33 1M 64k"],
            ),
            17,
        ),
    ];
    for (name, pristine, step) in cases {
        let before = check_counts(&pristine);
        let qemu_done = d.join(format!("{name}-qemu-done.qcow2"));
        copy(&pristine, &qemu_done);
        run_cmd("qemu-img", &["check", "-r", "all", s(&qemu_done)]);
        assert_eq!(check_counts(&qemu_done), (0, 0, 0));
        let work = d.join("work.qcow2");
        // Sampled points until the repair finishes, then every point just before that.
        let mut last_killed = None;
        let mut n = 0u64;
        let end = loop {
            assert!(n < 100_000, "{name}: no end in sight");
            copy(&pristine, &work);
            if !repair_killed(&work, n) {
                break n;
            }
            assert_killed_state(
                &format!("{name}: killed before point {n}"),
                &work,
                &pristine,
                &qemu_done,
                before,
            );
            last_killed = Some(n);
            n += step;
        };
        // The exact number of points (the first that lets it finish), by bisection.
        let (mut lo, mut hi) = (last_killed.map_or(0, |k| k + 1), end);
        while lo < hi {
            let mid = (lo + hi) / 2;
            copy(&pristine, &work);
            if repair_killed(&work, mid) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let tail_from = last_killed.map_or(0, |k| k + 1).max(lo.saturating_sub(8));
        let mut kills = 0;
        for n in tail_from..lo {
            copy(&pristine, &work);
            assert!(repair_killed(&work, n), "{name}: finished before point {n}");
            kills += 1;
            assert_killed_state(
                &format!("{name}: killed before point {n}"),
                &work,
                &pristine,
                &qemu_done,
                before,
            );
        }
        assert!(kills > 0 || step == 1, "{name}: no point near the end");
        // The finished repair is qemu-img's file.
        copy(&pristine, &work);
        vimg(&["check", "-r", "all", s(&work)]);
        assert_same_file(&work, &qemu_done);
    }
}

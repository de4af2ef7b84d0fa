//! Kill-at-any-point tests of the in-place operations (issue 15): each operation runs once
//! per write, flush and truncate it makes, killed (SIGKILL, through the test-only
//! `VIMG_TEST_CRASH_AFTER_WRITES` hook) just before that point. After every kill:
//! `qemu-img check` finds no corruption (leaks are allowed), every guest cluster holds its
//! old or its new content, the virtual size is the old or the new one, `vimg check -r leaks`
//! leaves the image clean, and running the operation again gives what qemu-img gives.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const HOOK: &str = "VIMG_TEST_CRASH_AFTER_WRITES";

/// Runs vimg with the hook at `n`; true when it was killed, false when it finished.
fn run_killed(args: &[&str], n: u64) -> bool {
    let out = Command::new(vimg_bin())
        .args(args)
        .env(HOOK, n.to_string())
        .output()
        .expect("run vimg");
    match out.status.signal() {
        Some(9) => true,
        Some(sig) => panic!("vimg {args:?} died of signal {sig}"),
        None => {
            assert!(
                out.status.success() || out.status.code() == Some(3),
                "vimg {args:?} with {HOOK}={n} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            false
        }
    }
}

/// `qemu-img check` exit code (0 clean, 3 leaks only); panics on corruption.
fn qemu_check_no_corruption(img: &Path, what: &str) -> i32 {
    let out = run_cmd("qemu-img", &["check", "-f", "qcow2", s(img)]);
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check exit {code}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    code
}

fn virtual_size(img: &Path) -> u64 {
    let j = qemu_img(&["info", "--output=json", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&j).expect("json");
    v["virtual-size"].as_u64().expect("virtual-size")
}

fn guest_raw(img: &Path, fmt: &str, dir: &Path) -> Vec<u8> {
    let raw = dir.join("guest.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_img(&["convert", "-f", fmt, "-O", "raw", s(img), s(&raw)]);
    std::fs::read(&raw).expect("read raw")
}

/// Every `cs`-byte cluster of `got` equals the same cluster of `old` or of `new` (missing
/// bytes read as zeros).
fn assert_old_or_new(got: &[u8], old: &[u8], new: &[u8], cs: usize, what: &str) {
    let at = |v: &[u8], i: usize, n: usize| -> Vec<u8> {
        let mut b = vec![0u8; n];
        if i < v.len() {
            let m = (v.len() - i).min(n);
            b[..m].copy_from_slice(&v[i..i + m]);
        }
        b
    };
    let mut i = 0;
    while i < got.len() {
        let n = cs.min(got.len() - i);
        let g = &got[i..i + n];
        assert!(
            g == at(old, i, n) || g == at(new, i, n),
            "{what}: guest cluster at {i:#x} is neither old nor new"
        );
        i += n;
    }
}

struct Case {
    name: &'static str,
    /// Builds the image (qcow2) in `dir`; returns its path.
    setup: fn(&Path) -> PathBuf,
    /// vimg's arguments, with `{}` for the image.
    args: &'static [&'static str],
    /// qemu-img's arguments for the same operation (None: compare with vimg's own result).
    qemu: Option<&'static [&'static str]>,
    cluster: usize,
    /// The virtual disk is too large to read whole: the operation must leave the content
    /// as it was (grow), which `qemu-img compare` checks.
    big: bool,
}

fn same_content(a: &Path, b: &Path, what: &str) {
    let out = run_cmd(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "qcow2", s(a), s(b)],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn with_img(args: &[&str], img: &Path) -> Vec<String> {
    args.iter()
        .map(|a| {
            if *a == "{}" {
                s(img).to_string()
            } else {
                a.to_string()
            }
        })
        .collect()
}

fn run_case(c: &Case) -> (u64, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pristine = (c.setup)(d);
    let old_guest = if c.big {
        Vec::new()
    } else {
        guest_raw(&pristine, "qcow2", d)
    };
    // The expected result: the operation done whole (by qemu-img when it does the same).
    let done = d.join("done.qcow2");
    std::fs::copy(&pristine, &done).expect("copy");
    match c.qemu {
        Some(q) => {
            let a = with_img(q, &done);
            let refs: Vec<&str> = a.iter().map(String::as_str).collect();
            run_ok("qemu-img", &refs);
        }
        None => {
            let a = with_img(c.args, &done);
            let refs: Vec<&str> = a.iter().map(String::as_str).collect();
            let out = vimg_raw(&refs);
            assert!(out.status.code().is_some_and(|c| c == 0 || c == 3));
        }
    }
    let new_guest = if c.big {
        Vec::new()
    } else {
        guest_raw(&done, "qcow2", d)
    };
    let sizes = [virtual_size(&pristine), virtual_size(&done)];
    let work = d.join("work.qcow2");
    let mut kills = 0u64;
    let mut leaky = 0u64;
    // The large case has ~270 points and a 41 GiB virtual disk to compare after each (a
    // second of qemu-img compare): every 11th point (a prime, every phase of the refcount
    // block pattern) unless VIMG_KILL_EVERY_POINT is set; the others are sampled
    // (common::kill::sampled).
    let points: Box<dyn Iterator<Item = u64>> =
        if c.big && std::env::var_os("VIMG_KILL_EVERY_POINT").is_none() {
            Box::new((0..).step_by(11))
        } else {
            Box::new(common::kill::points())
        };
    for n in points {
        assert!(n < 100_000, "{}: no end in sight", c.name);
        std::fs::copy(&pristine, &work).expect("copy");
        let a = with_img(c.args, &work);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let killed = run_killed(&refs, n);
        let what = format!("{} killed before point {n}", c.name);
        if qemu_check_no_corruption(&work, &what) == 3 {
            leaky += 1;
        }
        let vs = virtual_size(&work);
        assert!(sizes.contains(&vs), "{what}: virtual size {vs}");
        let got = if c.big {
            same_content(&pristine, &work, &what);
            Vec::new()
        } else {
            let got = guest_raw(&work, "qcow2", d);
            assert_old_or_new(&got, &old_guest, &new_guest, c.cluster, &what);
            got
        };
        // Leaks go with check -r leaks.
        let out = vimg_raw(&["check", "-r", "leaks", s(&work)]);
        assert_eq!(out.status.code(), Some(0), "{what}: vimg check -r leaks");
        assert_eq!(
            qemu_check_no_corruption(&work, &what),
            0,
            "{what}: leaks left"
        );
        if !killed {
            assert!(got == new_guest, "{}: finished run differs", c.name);
            assert_eq!(virtual_size(&work), virtual_size(&done), "{}", c.name);
            if c.big {
                same_content(&done, &work, &what);
            }
            break;
        }
        kills += 1;
        // Done again after the crash, the operation gives the expected content.
        let out = vimg_raw(&refs);
        assert!(
            out.status.code().is_some_and(|c| c == 0 || c == 3),
            "{what}: rerun failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if c.big {
            same_content(&done, &work, &what);
        } else {
            assert!(guest_raw(&work, "qcow2", d) == new_guest, "{what}: rerun");
        }
        assert_eq!(virtual_size(&work), virtual_size(&done), "{what}: rerun");
        qemu_check_no_corruption(&work, &what);
    }
    eprintln!("{}: {kills} kill points, {leaky} left leaks", c.name);
    assert!(kills > 0, "{}: the hook never fired", c.name);
    (kills, leaky)
}

fn create(dir: &Path, opts: &str, size: &str, writes: &[&str]) -> PathBuf {
    let img = dir.join("pristine.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, s(&img), size]);
    qemu_io("qcow2", &img, writes);
    img
}

fn small_512(dir: &Path) -> PathBuf {
    create(
        dir,
        "cluster_size=512",
        "1M",
        &[
            "write -P 1 0 100k",
            "write -P 2 900k 124k",
            "write -z 300k 8k",
        ],
    )
}

fn default_64k(dir: &Path) -> PathBuf {
    create(
        dir,
        "cluster_size=65536",
        "64M",
        &[
            "write -P 3 0 1M",
            "write -P 4 60M 4M",
            "write -c -P 5 8M 128k",
        ],
    )
}

fn leaky(dir: &Path) -> PathBuf {
    let img = default_64k(dir);
    let len = std::fs::metadata(&img).expect("stat").len();
    let c = len.div_ceil(65536);
    set_refcount(&img, c, 1);
    set_refcount(&img, c + 2, 3);
    img
}

#[test]
fn kill_resize_grow_l1() {
    if !qemu_available("kill_resize_grow_l1") {
        return;
    }
    // 1 MiB -> 9 MiB with 512-byte clusters (absolute sizes: a rerun after a crash must not
    // add twice): the L1 table grows to 288 entries (2 clusters).
    run_case(&Case {
        name: "resize 1M -> 9M (L1 grows)",
        setup: small_512,
        args: &["resize", "-f", "qcow2", "{}", "9M"],
        qemu: Some(&["resize", "-f", "qcow2", "{}", "9M"]),
        cluster: 512,
        big: false,
    });
}

#[test]
fn kill_resize_grow_refcount_table() {
    if !qemu_available("kill_resize_grow_refcount_table") {
        return;
    }
    // 1 MiB -> 41 GiB with 512-byte clusters: a 10 MiB L1 table needs new refcount blocks and a
    // larger refcount table (one 512-byte cluster covers 8 MiB).
    let (kills, _) = run_case(&Case {
        name: "resize 1M -> 41985M (refcount table grows)",
        setup: small_512,
        args: &["resize", "-f", "qcow2", "{}", "41985M"],
        qemu: Some(&["resize", "-f", "qcow2", "{}", "41985M"]),
        cluster: 512,
        big: true,
    });
    // Every 11th of about 270 points is visited (run_case).
    assert!(kills > 20, "expected many kill points, got {kills}");
}

#[test]
fn kill_resize_shrink() {
    if !qemu_available("kill_resize_shrink") {
        return;
    }
    run_case(&Case {
        name: "resize --shrink 30M",
        setup: default_64k,
        args: &["resize", "--shrink", "-f", "qcow2", "{}", "30M"],
        qemu: Some(&["resize", "--shrink", "-f", "qcow2", "{}", "30M"]),
        cluster: 65536,
        big: false,
    });
    run_case(&Case {
        name: "resize --shrink 500k (512-byte clusters)",
        setup: small_512,
        args: &["resize", "--shrink", "-f", "qcow2", "{}", "500k"],
        qemu: Some(&["resize", "--shrink", "-f", "qcow2", "{}", "500k"]),
        cluster: 512,
        big: false,
    });
}

#[test]
fn kill_check_repair_leaks() {
    if !qemu_available("kill_check_repair_leaks") {
        return;
    }
    run_case(&Case {
        name: "check -r leaks",
        setup: leaky,
        args: &["check", "-r", "leaks", "{}"],
        qemu: Some(&["check", "-r", "leaks", "{}"]),
        cluster: 65536,
        big: false,
    });
    run_case(&Case {
        name: "check -r all",
        setup: leaky,
        args: &["check", "-r", "all", "{}"],
        qemu: Some(&["check", "-r", "all", "{}"]),
        cluster: 65536,
        big: false,
    });
}

#[test]
fn kill_amend() {
    if !qemu_available("kill_amend") {
        return;
    }
    run_case(&Case {
        name: "amend -o compat=0.10",
        setup: small_512_no_zero,
        args: &["amend", "-o", "compat=0.10", "{}"],
        qemu: Some(&["amend", "-o", "compat=0.10", "{}"]),
        cluster: 512,
        big: false,
    });
    run_case(&Case {
        name: "amend -o lazy_refcounts=on",
        setup: small_512_no_zero,
        args: &["amend", "-o", "lazy_refcounts=on", "{}"],
        qemu: Some(&["amend", "-o", "lazy_refcounts=on", "{}"]),
        cluster: 512,
        big: false,
    });
}

fn small_512_no_zero(dir: &Path) -> PathBuf {
    create(
        dir,
        "cluster_size=512",
        "1M",
        &["write -P 1 0 100k", "write -P 2 900k 124k"],
    )
}

/// A 1 MiB top image (512-byte clusters, some clusters of its own) over `base.qcow2`, with
/// `new.qcow2` beside it holding other content: `rebase -u` changes what shows through.
fn top_over_base(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    qemu_io("qcow2", &base, &["write -P 7 0 1M"]);
    let new = dir.join("new.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&new), "1M"]);
    qemu_io("qcow2", &new, &["write -P 8 256k 512k"]);
    qcow2_overlay(
        &dir.join("pristine.qcow2"),
        "base.qcow2",
        "cluster_size=512",
        None,
    );
    let img = dir.join("pristine.qcow2");
    qemu_io("qcow2", &img, &["write -P 1 0 100k", "write -P 2 900k 64k"]);
    img
}

/// The backing file name and format `qemu-img info` reports (None: no backing file).
fn backing_of(img: &Path) -> (Option<String>, Option<String>) {
    let v = json(&qemu_img(&["info", "--output=json", "-U", s(img)]));
    let get = |k: &str| v[k].as_str().map(str::to_string);
    (get("backing-filename"), get("backing-filename-format"))
}

#[test]
fn kill_rebase_unsafe() {
    if !qemu_available("kill_rebase_unsafe") {
        return;
    }
    let cases: [(&str, &'static [&'static str]); 2] = [
        (
            "rebase -u -b new.qcow2",
            &["rebase", "-u", "-b", "new.qcow2", "-F", "qcow2", "{}"],
        ),
        ("rebase -u -b \"\"", &["rebase", "-u", "-b", "", "{}"]),
    ];
    for (name, args) in cases {
        // Guest content old or new per cluster, check clean, rerun as qemu-img's result.
        run_case(&Case {
            name,
            setup: top_over_base,
            args,
            qemu: Some(args),
            cluster: 512,
            big: false,
        });
        // And the backing reference itself is the old one or the new one at every point.
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let pristine = top_over_base(d);
        let done = d.join("done.qcow2");
        std::fs::copy(&pristine, &done).expect("copy");
        let a = with_img(args, &done);
        run_ok(
            "qemu-img",
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let (old, new) = (backing_of(&pristine), backing_of(&done));
        assert_ne!(old, new, "{name}: the operation changes nothing");
        let work = d.join("work.qcow2");
        for n in 0.. {
            assert!(n < 1000, "{name}: no end in sight");
            std::fs::copy(&pristine, &work).expect("copy");
            let a = with_img(args, &work);
            let killed = run_killed(&a.iter().map(String::as_str).collect::<Vec<_>>(), n);
            let what = format!("{name} killed before point {n}");
            assert_eq!(qemu_check_no_corruption(&work, &what), 0, "{what}: leaks");
            let got = backing_of(&work);
            assert!(got == old || got == new, "{what}: backing {got:?}");
            if !killed {
                assert_eq!(got, new, "{name}: finished run");
                break;
            }
        }
    }
}

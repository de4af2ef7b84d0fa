//! qcow2 in-place leftovers of issue 15:
//! - `convert -n` into qcow2 allocates a new L2 table before the data clusters it maps, as
//!   QEMU does, so the file's layout (`qemu-img map`'s host offsets, the file length)
//!   is qemu-img's; a run killed at every write leaves an image `qemu-img check` accepts
//!   holding old or new content per cluster;
//! - `resize --shrink` gives the freed clusters back to the filesystem (hole punching),
//!   as qemu-img discards them: the same allocated blocks after as qemu-img's (iotest
//!   250's case, smaller); a kill at every write is covered by `inplace_kill.rs`;
//! - `commit` walks only what the files hold: a top claiming 1 PiB over a file of a few
//!   MiB commits in a moment (a walk in steps over the virtual size took 2^28 steps), with
//!   the same result as qemu-img's commit.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::kill::{assert_old_or_new, check_then_repair, guest, run_killed};
use common::*;

const MIB: u64 = 1 << 20;

fn cp(a: &Path, b: &Path) {
    std::fs::copy(a, b).unwrap();
}

/// `convert -n` by qemu-img and by vimg into copies of `target`: the same map, host
/// offsets included, and the same file length.
fn same_layout_as_qemu(d: &Path, src: &Path, src_fmt: &str, target: &Path, extra: &[&str]) {
    let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
    cp(target, &q);
    cp(target, &v);
    let mut args = vec!["convert", "-n", "-f", src_fmt, "-O", "qcow2"];
    args.extend_from_slice(extra);
    let mut qa = args.clone();
    qa.extend_from_slice(&[s(src), s(&q)]);
    let mut va = args.clone();
    va.extend_from_slice(&[s(src), s(&v)]);
    qemu_img(&qa);
    vimg(&va);
    let what = format!("{:?} into {}", extra, target.display());
    let map = |p: &Path| qemu_img(&["map", "--output=json", "-f", "qcow2", s(p)]);
    assert_eq!(map(&v), map(&q), "{what}: map");
    assert_eq!(size_of(&v), size_of(&q), "{what}: file length");
    qemu_img(&["check", "-q", "-f", "qcow2", s(&v)]);
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "qcow2", s(&v), s(&q)]);
}

#[test]
fn convert_n_places_l2_tables_as_qemu_does() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("s.raw");
    mixed_raw(&src, 16 * MIB);
    // Empty targets: 64 KiB clusters (one L2 table), 4 KiB clusters (an L2 table per
    // 2 MiB: several tables, each placed before its data), compat=0.10.
    for opts in ["cluster_size=65536", "cluster_size=4096", "compat=0.10"] {
        let t = d.join(format!("t-{opts}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, s(&t), "16M"]);
        same_layout_as_qemu(d, &src, "raw", &t, &[]);
    }
    // A target whose tables exist for part of the disk.
    let t = d.join("part.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&t),
        "16M",
    ]);
    qemu_io("qcow2", &t, &["write -P 0x6b 4M 64k"]);
    same_layout_as_qemu(d, &src, "raw", &t, &[]);
    // A qcow2 source over a backing file into a target over the same backing file (-B):
    // only the top's clusters are written (iotest 122's case).
    let base = d.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "16M"]);
    qemu_io("qcow2", &base, &["write -P 0x11 0 16M"]);
    let top = d.join("top.qcow2");
    qcow2_overlay(&top, s(&base), "", None);
    qemu_io(
        "qcow2",
        &top,
        &["write -P 0x22 1M 3M", "write -P 0x33 9M 64k"],
    );
    let t = d.join("over.qcow2");
    qcow2_overlay(&t, s(&base), "", None);
    same_layout_as_qemu(d, &top, "qcow2", &t, &["-B", s(&base)]);
}

#[test]
fn convert_n_new_tables_killed_at_every_write() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("s.raw");
    mixed_raw(&src, 8 * MIB);
    let t0 = d.join("t0.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&t0),
        "8M",
    ]);
    qemu_io("qcow2", &t0, &["write -P 0x6b 2M 64k"]);
    let old = guest(&t0, "qcow2");
    let new = std::fs::read(&src).unwrap();
    let t = d.join("t.qcow2");
    let mut killed = 0;
    for n in 0.. {
        cp(&t0, &t);
        let args = ["convert", "-n", "-f", "raw", "-O", "qcow2", s(&src), s(&t)];
        if !run_killed(&args, n) {
            break;
        }
        killed += 1;
        assert_old_or_new(
            &guest(&t, "qcow2"),
            &old,
            &new,
            4096,
            &format!("killed at {n}"),
        );
        check_then_repair(&t, "qcow2", &format!("killed at {n}"));
        assert!(n < 10_000, "no end to the writes");
    }
    assert!(killed > 5, "only {killed} kill points");
    assert_eq!(guest(&t, "qcow2"), new);
}

/// Runs `prog args` and fails when it takes longer than `limit` (then it is killed).
fn run_within(prog: &str, args: &[&str], limit: Duration) -> Duration {
    let t = Instant::now();
    let mut child = Command::new(prog).args(args).spawn().unwrap();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{prog} {args:?}: {st}");
            return t.elapsed();
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{prog} {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn commit_of_a_huge_sparse_top_is_bounded_by_its_file() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 1 PiB over 2 MiB clusters: an L1 table of 2048 entries, files of a few MiB.
    let base = d.join("base.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        s(&base),
        "1P",
    ]);
    qemu_io(
        "qcow2",
        &base,
        &["write -P 0x11 0 1M", "write -P 0x22 512T 3M"],
    );
    let top = d.join("top.qcow2");
    qcow2_overlay(&top, "base.qcow2", "cluster_size=2M", None);
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x33 512k 1M",
            "write -P 0x44 1000T 64k",
            "write -z 512T 1M",
            "write -P 0x55 1023T 2M",
        ],
    );
    let (qb, qt, vb, vt) = (
        d.join("q/base.qcow2"),
        d.join("q/top.qcow2"),
        d.join("v/base.qcow2"),
        d.join("v/top.qcow2"),
    );
    for sub in ["q", "v"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    cp(&base, &qb);
    cp(&top, &qt);
    cp(&base, &vb);
    cp(&top, &vt);
    assert!(size_of(&vt) < 32 * MIB);
    qemu_img(&["commit", "-q", s(&qt)]);
    let took = run_within(
        s(&vimg_bin()),
        &["commit", "-q", s(&vt)],
        Duration::from_secs(60),
    );
    eprintln!("vimg commit of a 1 PiB top: {took:?}");
    qemu_img(&["check", "-q", "-f", "qcow2", s(&vb)]);
    qemu_img(&["check", "-q", "-f", "qcow2", s(&vt)]);
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        s(&vb),
        s(&qb),
    ]);
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        s(&vt),
        s(&qt),
    ]);
    // The top is empty: everything reads through to the base.
    let map = json(&qemu_img(&["map", "--output=json", "-f", "qcow2", s(&vt)]));
    for e in map.as_array().unwrap() {
        assert_ne!(e["depth"], 0, "{e}");
    }
}

/// Bytes the filesystem holds for `p`.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn shrink_frees_disk_space_as_qemu_does() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // iotest 250's trick, smaller: the data of the disk's start lies at the end of the
    // file and the end's data near the start, so a shrink frees clusters inside the file.
    let make = |p: &Path| {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=1M,preallocation=metadata",
            s(p),
            "200M",
        ]);
        qemu_io(
            "qcow2",
            p,
            &[
                "discard 0 10M",
                "discard 190M 10M",
                "write 190M 10M",
                "write 0 10M",
            ],
        );
    };
    let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
    make(&q);
    make(&v);
    let before = allocated(&v);
    if allocated(&q) != before {
        skipped_line(format_args!(
            "SKIPPED {}: the filesystem allocates two equal images differently",
            test_name()
        ));
        return;
    }
    qemu_img(&["resize", "-q", "--shrink", "-f", "qcow2", s(&q), "5M"]);
    vimg(&["resize", "-q", "--shrink", "-f", "qcow2", s(&v), "5M"]);
    qemu_img(&["check", "-q", "-f", "qcow2", s(&v)]);
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "qcow2", s(&v), s(&q)]);
    assert_eq!(size_of(&v), size_of(&q), "file length");
    let (fq, fv) = (before - allocated(&q), before - allocated(&v));
    eprintln!("freed: qemu-img {fq}, vimg {fv}");
    assert!(fq >= 10 << 20, "qemu-img freed only {fq}");
    // Cluster for cluster (1 MiB each); the filesystem may count a block of its own
    // metadata (an extent tree block) differently between the two files, so a difference
    // below one cluster is the filesystem's, not the shrink's.
    assert!(
        fv.abs_diff(fq) < 64 << 10,
        "bytes freed by the shrink: vimg {fv}, qemu-img {fq}"
    );
}

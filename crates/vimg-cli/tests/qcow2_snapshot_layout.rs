//! qcow2 `snapshot -c` and `snapshot -d` leave the bytes qemu-img leaves (iotests 080 and
//! 261 poke the snapshot table where qemu-img puts it): the same command sequence run by
//! qemu-img on one copy and by vimg on another gives identical files but for the
//! snapshots' creation times. Where vimg cannot reproduce QEMU's layout (a shared table
//! QEMU rewrites, a refcount block QEMU would add) the result differs in layout only: the
//! same snapshots and guest content, `qemu-img check` clean. Killed at every write, flush
//! and truncation, the image is the old one or the new one and `qemu-img check` finds
//! nothing, not even leaks.

mod common;

use std::path::{Path, PathBuf};

use common::kill::*;
use common::*;

/// One step of a sequence, run on both copies.
enum Step {
    /// `qemu-img ARGS` on the qemu-img copy, `vimg ARGS` on vimg's (`{}`: the image).
    Img(&'static [&'static str]),
    /// A qemu-io command on both copies (guest writes between snapshot changes).
    Io(&'static str),
}

use Step::{Img, Io};

struct Seq {
    name: &'static str,
    /// `qemu-img create -o` options and the virtual size.
    opts: &'static str,
    size: &'static str,
    steps: &'static [Step],
}

fn with_img(args: &[&str], img: &Path) -> Vec<String> {
    args.iter()
        .map(|a| if *a == "{}" { s(img) } else { a }.to_string())
        .collect()
}

/// The file with every snapshot table entry's creation time zeroed (the one field two
/// runs a moment apart cannot share).
fn without_dates(img: &Path) -> Vec<u8> {
    let mut b = std::fs::read(img).expect("read image");
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4"));
    let nb = be32(&b, 60);
    let mut at = u64::from_be_bytes(b[64..72].try_into().expect("8")) as usize;
    for _ in 0..nb {
        b[at + 16..at + 24].fill(0);
        let id = u16::from_be_bytes([b[at + 12], b[at + 13]]) as usize;
        let name = u16::from_be_bytes([b[at + 14], b[at + 15]]) as usize;
        let extra = be32(&b, at + 36) as usize;
        at += (40 + extra + id + name).div_ceil(8) * 8;
    }
    b
}

/// The snapshot list (id, name) and the guest content of the active state and of each
/// snapshot, read by qemu-img.
fn guest_state(img: &Path, dir: &Path) -> (Vec<(String, String)>, Vec<Vec<u8>>) {
    let v = json(&qemu_img(&["info", "-f", "qcow2", "--output=json", s(img)]));
    let list: Vec<(String, String)> = v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    (
                        x["id"].as_str().expect("id").to_string(),
                        x["name"].as_str().expect("name").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let raw = dir.join("state.raw");
    let mut content = Vec::new();
    for l in std::iter::once(None).chain(list.iter().map(|(id, _)| Some(id))) {
        let _ = std::fs::remove_file(&raw);
        let sel = l.map(|id| format!("snapshot.id={id}"));
        let mut args = vec!["convert", "-f", "qcow2", "-O", "raw"];
        if let Some(sel) = &sel {
            args.extend(["-l", sel.as_str()]);
        }
        args.extend([s(img), s(&raw)]);
        qemu_img(&args);
        content.push(std::fs::read(&raw).expect("read raw"));
    }
    (list, content)
}

fn assert_clean(img: &Path, what: &str) {
    let (code, text) = qemu_check_output(img, "qcow2");
    assert_eq!(code, 0, "{what}: qemu-img check:\n{text}");
}

/// Runs `seq` with qemu-img and with vimg; returns both files.
fn run_both(seq: &Seq, dir: &Path) -> (PathBuf, PathBuf) {
    let q = dir.join(format!("{}.qemu.qcow2", seq.name));
    qemu_create(&q, "qcow2", seq.opts, seq.size);
    qemu_io("qcow2", &q, &["write -P 1 0 512", "write -P 2 1M 64k"]);
    // Guest writes before the first snapshot change are made once, then copied: compressed
    // writes place their clusters in an order that depends on qemu-io's threads.
    let first = seq
        .steps
        .iter()
        .position(|st| matches!(st, Img(_)))
        .unwrap_or(seq.steps.len());
    for step in &seq.steps[..first] {
        if let Io(cmd) = step {
            qemu_io("qcow2", &q, &[cmd]);
        }
    }
    let v = dir.join(format!("{}.vimg.qcow2", seq.name));
    std::fs::copy(&q, &v).expect("copy");
    for step in &seq.steps[first..] {
        match step {
            Img(args) => {
                let a = with_img(args, &q);
                run_ok(
                    "qemu-img",
                    &a.iter().map(String::as_str).collect::<Vec<_>>(),
                );
                let a = with_img(args, &v);
                vimg(&a.iter().map(String::as_str).collect::<Vec<_>>());
            }
            Io(cmd) => {
                qemu_io("qcow2", &q, &[cmd]);
                qemu_io("qcow2", &v, &[cmd]);
            }
        }
    }
    (q, v)
}

const SAME_BYTES: &[Seq] = &[
    Seq {
        name: "first snapshot",
        opts: "",
        size: "64M",
        steps: &[Img(&["snapshot", "-c", "s1", "{}"])],
    },
    Seq {
        name: "create twice, delete the first, create again",
        opts: "",
        size: "64M",
        steps: &[
            Img(&["snapshot", "-c", "s1", "{}"]),
            Img(&["snapshot", "-c", "s2", "{}"]),
            Img(&["snapshot", "-d", "s1", "{}"]),
            Img(&["snapshot", "-c", "s3", "{}"]),
        ],
    },
    Seq {
        name: "guest writes between, delete both, 4-bit refcounts",
        opts: "cluster_size=4096,refcount_bits=4",
        size: "256M",
        steps: &[
            Io("write -P 3 0 1M"),
            Img(&["snapshot", "-c", "s1", "{}"]),
            Io("write -P 4 0 4k"),
            Img(&["snapshot", "-c", "s2", "{}"]),
            Io("write -P 5 1M 4k"),
            Io("discard 0 64k"),
            Img(&["snapshot", "-d", "s2", "{}"]),
            Img(&["snapshot", "-c", "s3", "{}"]),
            Img(&["snapshot", "-d", "s1", "{}"]),
        ],
    },
    Seq {
        name: "512-byte clusters, compressed data",
        opts: "cluster_size=512",
        size: "64M",
        steps: &[
            Io("write -c -P 6 2M 4k"),
            Img(&["snapshot", "-c", "s1", "{}"]),
            Img(&["snapshot", "-c", "s2", "{}"]),
            Img(&["snapshot", "-d", "s1", "{}"]),
        ],
    },
    Seq {
        name: "version 2",
        opts: "compat=0.10",
        size: "64M",
        steps: &[
            Img(&["snapshot", "-c", "s1", "{}"]),
            Io("write -P 7 0 64k"),
            Img(&["snapshot", "-c", "s2", "{}"]),
            Img(&["snapshot", "-d", "s2", "{}"]),
        ],
    },
    Seq {
        name: "extended L2, several L2 tables",
        opts: "extended_l2=on",
        size: "20G",
        steps: &[
            Io("write -P 8 10G 64k"),
            Io("write -P 9 19G 4k"),
            Img(&["snapshot", "-c", "s1", "{}"]),
            Io("write -z 10G 64k"),
            Img(&["snapshot", "-c", "s2", "{}"]),
            Img(&["snapshot", "-d", "s1", "{}"]),
        ],
    },
];

#[test]
fn snapshot_create_delete_bytes_like_qemu() {
    if !qemu_available("snapshot_create_delete_bytes_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for seq in SAME_BYTES {
        let (q, v) = run_both(seq, dir.path());
        let (a, b) = (without_dates(&q), without_dates(&v));
        assert_eq!(a.len(), b.len(), "{}: file lengths", seq.name);
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        assert!(
            first.is_none(),
            "{}: first differing byte at {first:#x?}",
            seq.name
        );
        assert_clean(&v, seq.name);
    }
}

/// Where QEMU's layout is out of reach, vimg's result is still the same image state.
#[test]
fn other_layouts_same_state() {
    if !qemu_available("other_layouts_same_state") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for seq in [
        // The deleted snapshot shares an L2 table with another snapshot only: QEMU sets
        // copied flags in that table, which the other snapshot still uses in between.
        Seq {
            name: "delete with a table shared by two snapshots",
            opts: "",
            size: "64M",
            steps: &[
                Img(&["snapshot", "-c", "s1", "{}"]),
                Img(&["snapshot", "-c", "s2", "{}"]),
                Io("write -P 3 0 4k"),
                Img(&["snapshot", "-d", "s1", "{}"]),
            ],
        },
        // The L1 copy needs clusters no refcount block covers yet: QEMU adds one.
        Seq {
            name: "refcount block added",
            opts: "cluster_size=512",
            size: "1G",
            steps: &[Img(&["snapshot", "-c", "s1", "{}"])],
        },
    ] {
        let (q, v) = run_both(&seq, dir.path());
        assert_clean(&v, seq.name);
        assert!(
            guest_state(&q, dir.path()) == guest_state(&v, dir.path()),
            "{}: the snapshots or the guest content differ",
            seq.name
        );
    }
}

/// Killed before each write, flush and truncation: the old image or the new one, no
/// finding at all.
#[test]
fn kill_create_and_delete_in_qemu_layout() {
    if !qemu_available("kill_create_and_delete_in_qemu_layout") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pristine = d.join("pristine.qcow2");
    qemu_create(&pristine, "qcow2", "cluster_size=4096", "8M");
    qemu_io(
        "qcow2",
        &pristine,
        &[
            "write -P 1 0 256k",
            "write -c -P 2 1M 8k",
            "write -P 3 6M 4k",
        ],
    );
    qemu_img(&["snapshot", "-c", "s1", s(&pristine)]);
    qemu_io("qcow2", &pristine, &["write -P 4 0 4k"]);
    for args in [
        &["snapshot", "-c", "s2", "{}"][..],
        &["snapshot", "-d", "s1", "{}"][..],
    ] {
        let old = guest_state(&pristine, d);
        let done = d.join("done.qcow2");
        std::fs::copy(&pristine, &done).expect("copy");
        let a = with_img(args, &done);
        vimg(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let new = guest_state(&done, d);
        let work = d.join("work.qcow2");
        let mut kills = 0;
        for n in 0.. {
            assert!(n < 1000, "{args:?}: no end in sight");
            std::fs::copy(&pristine, &work).expect("copy");
            let a = with_img(args, &work);
            let killed = run_killed(&a.iter().map(String::as_str).collect::<Vec<_>>(), n);
            let what = format!("{args:?} killed before point {n}");
            assert_eq!(qemu_check(&work, false, &what), Verdict::Clean, "{what}");
            let st = guest_state(&work, d);
            assert!(st == old || st == new, "{what}: neither old nor new");
            if !killed {
                assert!(
                    without_dates(&work) == without_dates(&done),
                    "{what}: another result than the uninterrupted run"
                );
                break;
            }
            kills += 1;
        }
        // Both switches and the writes between them were hit.
        assert!(kills > 10, "{args:?}: the hook fired {kills} times");
        eprintln!("{args:?}: {kills} kill points, none with a finding");
    }
}

/// iotest 261's last case: 64 KiB of extra data poked into the last entry of a table that
/// ends the file. `check -r all` reads the part past the end as zeros, as qemu-img does,
/// and says what qemu-img says.
#[test]
fn repair_of_extra_data_past_the_end_like_qemu() {
    if !qemu_available("repair_of_extra_data_past_the_end_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let q = d.join("qemu.qcow2");
    qemu_create(&q, "qcow2", "", "64M");
    for name in ["sn0", "sn1", "sn2", "sn3"] {
        qemu_img(&["snapshot", "-c", name, s(&q)]);
    }
    let mut b = std::fs::read(&q).expect("read");
    let mut at = u64::from_be_bytes(b[64..72].try_into().expect("8")) as usize;
    for i in 0..4 {
        let id = u16::from_be_bytes([b[at + 12], b[at + 13]]) as usize;
        let name = u16::from_be_bytes([b[at + 14], b[at + 15]]) as usize;
        let extra = u32::from_be_bytes(b[at + 36..at + 40].try_into().expect("4")) as usize;
        if i == 3 {
            b[at + 36..at + 40].copy_from_slice(&65536u32.to_be_bytes());
        } else {
            at += (40 + extra + id + name).div_ceil(8) * 8;
        }
    }
    assert!(
        at + 40 + 65536 > b.len(),
        "the poke runs past the end of the file"
    );
    std::fs::write(&q, &b).expect("write");
    let v = d.join("vimg.qcow2");
    std::fs::copy(&q, &v).expect("copy");
    let qo = run_cmd("qemu-img", &["check", "-r", "all", s(&q)]);
    let vo = vimg_raw(&["check", "-r", "all", s(&v)]);
    assert_eq!(qo.status.code(), vo.status.code(), "exit codes");
    assert_eq!(
        String::from_utf8_lossy(&qo.stderr),
        String::from_utf8_lossy(&vo.stderr),
        "messages"
    );
    let lines = |o: &std::process::Output| -> Vec<String> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.starts_with("Image end offset"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(lines(&qo), lines(&vo), "report");
    assert_clean(&v, "after the repair");
    assert!(
        guest_state(&q, d) == guest_state(&v, d),
        "the snapshots or the guest content differ"
    );
}

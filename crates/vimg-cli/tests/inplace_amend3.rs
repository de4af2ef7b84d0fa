//! `amend -o data_file=` (issue 15), against qemu-img amend on a copy: another name for
//! the external data file, or (empty) none, on images that have one; refused with
//! qemu-img's words on images that do not, before anything changes; combined with
//! `data_file_raw=off`; a run killed at every write leaves the old name or the new one.

mod common;

use std::path::Path;

use common::*;

fn data_file_of(img: &Path) -> Option<String> {
    let v = json(&qemu_img(&["info", "--output=json", "-f", "qcow2", s(img)]));
    v["format-specific"]["data"]["data-file"]
        .as_str()
        .map(str::to_string)
}

fn data_file_of_err(img: &Path) -> String {
    let out = run_cmd("qemu-img", &["info", "-f", "qcow2", s(img)]);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What qemu-io says opening `img` (which must fail).
fn info_err(img: &Path) -> String {
    let out = run_cmd("qemu-io", &["-f", "qcow2", "-c", "read 0 4k", s(img)]);
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A qcow2 image in `d` with the external data file `d.raw` (raw when `raw`) and data.
fn image(d: &Path, raw: bool) -> std::path::PathBuf {
    let img = d.join("i.qcow2");
    // Absolute names: qemu opens a data file name as given (from its working folder).
    let opts = format!(
        "data_file={},data_file_raw={}",
        s(&d.join("d.raw")),
        if raw { "on" } else { "off" }
    );
    qemu_in(
        d,
        &["create", "-q", "-f", "qcow2", "-o", &opts, "i.qcow2", "1M"],
    );
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x3c 0 64k", "write -P 0x4d 512k 64k"],
    );
    img
}

fn both(d: &Path, img: &Path, opts: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
    std::fs::copy(img, &q).unwrap();
    std::fs::copy(img, &v).unwrap();
    let qo = run_cmd("qemu-img", &["amend", "-f", "qcow2", "-o", opts, s(&q)]);
    let vo = vimg_raw(&["amend", "-f", "qcow2", "-o", opts, s(&v)]);
    assert_eq!(vo.status.code(), qo.status.code(), "{opts}");
    assert_eq!(
        String::from_utf8_lossy(&vo.stderr).replacen("vimg:", "qemu-img:", 1),
        String::from_utf8_lossy(&qo.stderr).replace(s(&q), s(&v)),
        "{opts}"
    );
    (q, v)
}

#[test]
fn data_file_like_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for raw in [false, true] {
        let img = image(d, raw);
        std::fs::copy(d.join("d.raw"), d.join("d2.raw")).unwrap();
        // Another name: stored as given; the image then reads through the new file.
        let d2 = s(&d.join("d2.raw")).to_string();
        for opts in [
            format!("data_file={d2}"),
            format!("data_file={d2},data_file_raw=off"),
        ] {
            let opts = opts.as_str();
            let (q, v) = both(d, &img, opts);
            assert_eq!(data_file_of(&v), Some(d2.clone()), "{opts}");
            assert_eq!(data_file_of(&v), data_file_of(&q), "{opts}");
            let info = |p: &Path| {
                json(&qemu_img(&["info", "--output=json", "-f", "qcow2", s(p)]))["format-specific"]
                    .clone()
            };
            assert_eq!(info(&v), info(&q), "{opts}");
            qemu_img(&["check", "-q", "-f", "qcow2", s(&v)]);
            qemu_img(&[
                "compare",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                s(&v),
                s(&img),
            ]);
            // vimg reads it too (the new name resolves inside the image's folder).
            assert_eq!(
                sha256_file(&d.join("d2.raw")),
                sha256_file(&d.join("d.raw"))
            );
            vimg(&[
                "compare",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                s(&v),
                s(&img),
            ]);
        }
        // No name: the image then needs its data file named when it is opened.
        let (q, v) = both(d, &img, "data_file=");
        assert_eq!(info_err(&v), info_err(&q).replace(s(&q), s(&v)));
        assert!(info_err(&v).contains("'data-file' is required"));
        // A name of a file that does not exist is stored as given, as qemu-img does.
        let (q, v) = both(d, &img, "data_file=gone.raw");
        assert_eq!(
            data_file_of_err(&v),
            data_file_of_err(&q).replace(s(&q), s(&v))
        );
    }
    // An image without an external data file: refused, untouched.
    let plain = d.join("plain.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&plain), "1M"]);
    for opts in [
        "data_file=x.raw",
        "data_file=",
        "lazy_refcounts=on,data_file=x.raw",
    ] {
        let before = sha256_file(&plain);
        let (q, v) = both(d, &plain, opts);
        assert_eq!(sha256_file(&v), before, "{opts}");
        assert_eq!(sha256_file(&q), before, "{opts}");
    }
}

#[test]
fn data_file_killed_at_every_write() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img0 = image(d, false);
    let img0c = d.join("orig.qcow2");
    std::fs::copy(&img0, &img0c).unwrap();
    std::fs::copy(d.join("d.raw"), d.join("d2.raw")).unwrap();
    let img = d.join("k.qcow2");
    let (d1, d2) = (
        s(&d.join("d.raw")).to_string(),
        s(&d.join("d2.raw")).to_string(),
    );
    let opt = format!("data_file={d2}");
    let args = ["amend", "-f", "qcow2", "-o", &opt, s(&img)];
    let killed = common::kill::each_kill_point(&img0c, &img, &args, 100, |n, done| {
        let name = data_file_of(&img);
        assert!(
            name.as_deref() == Some(d1.as_str()) || name.as_deref() == Some(d2.as_str()),
            "killed at {n}: {name:?}"
        );
        qemu_img(&["check", "-q", "-f", "qcow2", s(&img)]);
        qemu_img(&[
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            s(&img),
            s(&img0c),
        ]);
        if done {
            assert_eq!(name.as_deref(), Some(d2.as_str()));
        }
    });
    assert!(killed >= 1);
}

/// The guest content of snapshot `name` of `img`, by qemu-img.
fn snapshot_content(img: &Path, name: &str) -> Vec<u8> {
    let raw = img.with_extension("snap.raw");
    let _ = std::fs::remove_file(&raw);
    let l = format!("snapshot.name={name}");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-l",
        &l,
        "-O",
        "raw",
        s(img),
        s(&raw),
    ]);
    let v = std::fs::read(&raw).unwrap();
    let _ = std::fs::remove_file(&raw);
    v
}

fn compat(img: &Path) -> String {
    let v = json(&qemu_img(&["info", "--output=json", "-f", "qcow2", s(img)]));
    v["format-specific"]["data"]["compat"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `amend -o compat=0.10` of an image whose internal snapshots have zero clusters: qemu-img
/// expands them (as the active ones); so does vimg, with the same content in the active
/// state and in every snapshot, `qemu-img check` clean, and a kill at every write leaving
/// the old image or the new one. (qemu-img 10.0.2 itself gets this case wrong: its `s1`
/// reads zeros where the first cluster held data, and `qemu-img check` then finds two
/// copied-flag errors; so the snapshots are compared with the original, not with
/// qemu-img's result.)
#[test]
fn downgrade_expands_snapshot_zero_clusters_like_qemu_and_killed() {
    if !qemu_available(&test_name()) {
        return;
    }
    for with_backing in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let img = d.join("i.qcow2");
        if with_backing {
            let b = d.join("b.qcow2");
            qemu_img(&["create", "-q", "-f", "qcow2", s(&b), "4M"]);
            qemu_io("qcow2", &b, &["write -P 7 0 4M"]);
            qcow2_overlay(&img, s(&b), "", Some("4M"));
        } else {
            qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
        }
        qemu_io(
            "qcow2",
            &img,
            &[
                "write -P 1 0 256k",
                "write -z 64k 64k",
                "write -z -u 1M 128k",
                "write -P 2 2M 64k",
            ],
        );
        qemu_img(&["snapshot", "-c", "s1", s(&img)]);
        qemu_io("qcow2", &img, &["write -P 3 64k 64k", "write -z 2M 64k"]);
        qemu_img(&["snapshot", "-c", "s2", s(&img)]);
        qemu_io("qcow2", &img, &["write -z 0 64k", "write -P 4 3M 64k"]);
        let what = format!("backing {with_backing}");
        let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
        std::fs::copy(&img, &q).unwrap();
        std::fs::copy(&img, &v).unwrap();
        qemu_img(&["amend", "-f", "qcow2", "-o", "compat=0.10", s(&q)]);
        vimg(&["amend", "-f", "qcow2", "-o", "compat=0.10", s(&v)]);
        assert_eq!(compat(&v), "0.10", "{what}");
        qemu_img(&["check", "-q", "-f", "qcow2", s(&v)]);
        qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "qcow2", s(&v), s(&q)]);
        let active = common::kill::guest(&img, "qcow2");
        assert!(common::kill::guest(&v, "qcow2") == active, "{what}");
        let snaps: Vec<Vec<u8>> = ["s1", "s2"]
            .iter()
            .map(|n| snapshot_content(&img, n))
            .collect();
        for (n, want) in ["s1", "s2"].iter().zip(&snaps) {
            assert!(snapshot_content(&v, n) == *want, "{what}: snapshot {n}");
        }
        // Applying a snapshot of the downgraded image gives its content back.
        vimg(&["snapshot", "-a", "s1", s(&v)]);
        assert!(
            common::kill::guest(&v, "qcow2") == snaps[0],
            "{what}: applied s1"
        );
        qemu_img(&["check", "-q", "-f", "qcow2", s(&v)]);
        // Killed at every write: the old image or the new one, never anything else.
        let k = d.join("k.qcow2");
        let args = ["amend", "-f", "qcow2", "-o", "compat=0.10", s(&k)];
        let killed = common::kill::each_kill_point(&img, &k, &args, 1000, |n, done| {
            let c = compat(&k);
            assert!(
                c == "1.1" || c == "0.10",
                "{what}, killed at {n}: compat {c}"
            );
            common::kill::check_then_repair(&k, "qcow2", &format!("{what}, killed at {n}"));
            assert!(
                common::kill::guest(&k, "qcow2") == active,
                "{what}, killed at {n}"
            );
            for (name, want) in ["s1", "s2"].iter().zip(&snaps) {
                assert!(
                    snapshot_content(&k, name) == *want,
                    "{what}, killed at {n}: {name}"
                );
            }
            if done {
                assert_eq!(c, "0.10");
            }
        });
        assert!(killed > 2, "{what}: {killed} kill points");
    }
}

/// `resize` of an image with internal snapshots over a longer backing file: the new area
/// reads as zeros (not the backing file's data), as qemu-img makes it; the snapshots keep
/// their content and size; `qemu-img check` clean; a kill at every write leaves the old
/// image or the new one.
#[test]
fn resize_over_longer_backing_with_snapshots_like_qemu_and_killed() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = d.join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&b), "8M"]);
    qemu_io("qcow2", &b, &["write -P 7 0 8M"]);
    let img = d.join("i.qcow2");
    qcow2_overlay(&img, s(&b), "", Some("4M"));
    qemu_io(
        "qcow2",
        &img,
        &["write -P 1 0 128k", "write -z 1M 64k", "write -P 2 3M 1M"],
    );
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 3 64k 64k", "write -P 4 3M 64k"]);
    let s1 = snapshot_content(&img, "s1");
    let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
    std::fs::copy(&img, &q).unwrap();
    std::fs::copy(&img, &v).unwrap();
    qemu_img(&["resize", "-q", "-f", "qcow2", s(&q), "8M"]);
    vimg(&["resize", "-q", "-f", "qcow2", s(&v), "8M"]);
    qemu_img(&["check", "-q", "-f", "qcow2", s(&v)]);
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "qcow2", s(&v), s(&q)]);
    let new = common::kill::guest(&v, "qcow2");
    assert_eq!(new.len(), 8 << 20);
    assert!(
        new[4 << 20..].iter().all(|&x| x == 0),
        "the new area is not zeros"
    );
    // convert -l reads a snapshot at the image's current size: its first 4 MiB are the
    // snapshot's, and qemu-img reads the same from both.
    let vs = snapshot_content(&v, "s1");
    assert!(vs[..4 << 20] == s1[..], "the snapshot changed");
    assert!(
        vs == snapshot_content(&q, "s1"),
        "the snapshot reads otherwise than qemu-img's"
    );
    vimg(&["snapshot", "-a", "s1", s(&v)]);
    qemu_img(&["snapshot", "-a", "s1", s(&q)]);
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "qcow2", s(&v), s(&q)]);
    qemu_img(&["check", "-q", "-f", "qcow2", s(&v)]);
    let old = common::kill::guest(&img, "qcow2");
    let k = d.join("k.qcow2");
    let args = ["resize", "-q", "-f", "qcow2", s(&k), "8M"];
    let killed = common::kill::each_kill_point(&img, &k, &args, 1000, |n, done| {
        common::kill::check_then_repair(&k, "qcow2", &format!("killed at {n}"));
        let g = common::kill::guest(&k, "qcow2");
        assert!(g == old || g == new, "killed at {n}: neither old nor new");
        let ks = snapshot_content(&k, "s1");
        assert!(
            ks[..4 << 20] == s1[..],
            "killed at {n}: the snapshot changed"
        );
        if done {
            assert!(g == new);
        }
    });
    assert!(killed > 2);
}

/// `resize` of an image with extended L2 entries over a longer backing file: the new
/// area's subclusters read as zeros, as qemu-img makes them: the same map (data, zero,
/// depth) and content as qemu-img's, check clean, a kill at every write leaves the old
/// image or the new one.
#[test]
fn resize_over_longer_backing_with_extended_l2_like_qemu_and_killed() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = d.join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&b), "8M"]);
    qemu_io("qcow2", &b, &["write -P 7 0 8M"]);
    let img = d.join("i.qcow2");
    qcow2_overlay(&img, s(&b), "extended_l2=on", Some("4M"));
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 1 0 128k",
            "write -P 2 4032k 64k",
            "write -z 2M 4k",
        ],
    );
    let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
    std::fs::copy(&img, &q).unwrap();
    std::fs::copy(&img, &v).unwrap();
    qemu_img(&["resize", "-q", "-f", "qcow2", s(&q), "8M"]);
    vimg(&["resize", "-q", "-f", "qcow2", s(&v), "8M"]);
    qemu_img(&["check", "-q", "-f", "qcow2", s(&v)]);
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "qcow2", s(&v), s(&q)]);
    let new = common::kill::guest(&v, "qcow2");
    assert!(
        new[4 << 20..].iter().all(|&x| x == 0),
        "the new area is not zeros"
    );
    let flags = |p: &Path| -> Vec<serde_json::Value> {
        json(&qemu_img(&["map", "--output=json", "-f", "qcow2", s(p)]))
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.as_object_mut().unwrap().remove("offset");
                e
            })
            .collect()
    };
    assert_eq!(flags(&v), flags(&q));
    let old = common::kill::guest(&img, "qcow2");
    let k = d.join("k.qcow2");
    let args = ["resize", "-q", "-f", "qcow2", s(&k), "8M"];
    let killed = common::kill::each_kill_point(&img, &k, &args, 1000, |n, _| {
        common::kill::check_then_repair(&k, "qcow2", &format!("killed at {n}"));
        let g = common::kill::guest(&k, "qcow2");
        assert!(g == old || g == new, "killed at {n}: neither old nor new");
    });
    assert!(killed > 2);
}

/// `resize` (and `amend -o size=`) over a longer backing file when the old size ends
/// inside a cluster: that cluster keeps its content up to the old end (the backing file's
/// where the image has nothing) and reads zeros after it, as qemu-img makes it (it
/// allocates the cluster); then zero clusters. Same content and map flags as qemu-img's,
/// check clean, killed at every write: old or new.
#[test]
fn resize_over_longer_backing_from_unaligned_size_like_qemu_and_killed() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = d.join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&b), "8M"]);
    qemu_io("qcow2", &b, &["write -P 7 0 8M"]);
    let flags = |p: &Path| -> Vec<serde_json::Value> {
        json(&qemu_img(&["map", "--output=json", "-f", "qcow2", s(p)]))
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.as_object_mut().unwrap().remove("offset");
                e
            })
            .collect()
    };
    // The last cluster (from 2944k) unallocated in the image, or holding data.
    for (opts, writes) in [
        ("", vec!["write -P 1 0 64k"]),
        ("", vec!["write -P 1 0 64k", "write -P 2 2950k 8k"]),
        ("extended_l2=on", vec!["write -P 2 2950k 8k"]),
    ] {
        let img = d.join("i.qcow2");
        let _ = std::fs::remove_file(&img);
        qcow2_overlay(&img, s(&b), opts, Some("3000k"));
        qemu_io("qcow2", &img, &writes);
        let what = format!("{opts} {writes:?}");
        for cmd in [
            vec!["resize", "-q", "-f", "qcow2", "{}", "8M"],
            vec!["amend", "-f", "qcow2", "-o", "size=8M", "{}"],
        ] {
            let with = |p: &Path| -> Vec<String> {
                cmd.iter()
                    .map(|a| {
                        if *a == "{}" {
                            s(p).to_string()
                        } else {
                            a.to_string()
                        }
                    })
                    .collect()
            };
            let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
            std::fs::copy(&img, &q).unwrap();
            std::fs::copy(&img, &v).unwrap();
            let qa = with(&q);
            qemu_img(&qa.iter().map(String::as_str).collect::<Vec<_>>());
            let va = with(&v);
            vimg(&va.iter().map(String::as_str).collect::<Vec<_>>());
            qemu_img(&["check", "-q", "-f", "qcow2", s(&v)]);
            qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "qcow2", s(&v), s(&q)]);
            assert_eq!(flags(&v), flags(&q), "{what} {cmd:?}");
        }
        let old = common::kill::guest(&img, "qcow2");
        let new = common::kill::guest(&d.join("v.qcow2"), "qcow2");
        assert!(new[3000 << 10..].iter().all(|&x| x == 0), "{what}");
        let k = d.join("k.qcow2");
        let args = ["resize", "-q", "-f", "qcow2", s(&k), "8M"];
        let killed = common::kill::each_kill_point(&img, &k, &args, 1000, |n, _| {
            common::kill::check_then_repair(&k, "qcow2", &format!("{what}: killed at {n}"));
            let g = common::kill::guest(&k, "qcow2");
            assert!(
                g == old || g == new,
                "{what}: killed at {n}: neither old nor new"
            );
        });
        assert!(killed > 2);
    }
}

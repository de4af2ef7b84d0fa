//! `create -o preallocation=` for vmdk, vdi, qed, vpc, qcow, parallels and raw: qemu-img
//! takes the file protocol's option (off, falloc, full), and those drivers write the same
//! image as without it;
//! vimg accepts the same values, writes the image it writes without the option (both tools
//! put random ids in these formats, so compared by size, allocation and map), and refuses
//! the rest with qemu-img's words and exit code.

mod common;

use common::*;

fn text(o: &std::process::Output) -> (Option<i32>, String, String) {
    let err = String::from_utf8_lossy(&o.stderr).replacen("qemu-img:", "vimg:", 1);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        err,
    )
}

#[test]
fn formats_take_file_preallocation_like_qemu_img() {
    if !qemu_available("formats_take_file_preallocation_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (fmt, extra) in [
        ("vmdk", ""),
        ("vmdk", ",subformat=monolithicFlat"),
        ("vmdk", ",subformat=streamOptimized"),
        ("vdi", ""),
        ("vdi", ",static=on"),
        ("qed", ""),
        ("vpc", ""),
        ("vpc", ",subformat=fixed"),
        ("qcow", ""),
        ("parallels", ""),
    ] {
        for mode in ["off", "falloc", "full", "metadata", "bogus"] {
            let o = format!("preallocation={mode}{extra}");
            let v = dir.path().join(format!("v.{fmt}"));
            let q = dir.path().join(format!("q.{fmt}"));
            let vo = vimg_raw(&["create", "-f", fmt, "-o", &o, s(&v), "3M"]);
            let qo = run_cmd("qemu-img", &["create", "-f", fmt, "-o", &o, s(&q), "3M"]);
            let (vt, qt) = (text(&vo), text(&qo));
            assert_eq!(vt.0, qt.0, "{fmt} {o}: exit code");
            assert_eq!(vt.1.replace("v.", "q."), qt.1, "{fmt} {o}: Formatting line");
            assert_eq!(vt.2.replace("v.", "q."), qt.2, "{fmt} {o}: message");
            if vo.status.success() {
                // The image vimg writes without the option (apart from the random ids
                // qemu-img writes too): same size, same allocation, same map.
                let plain = dir.path().join(format!("w.{fmt}")); // as long a name as v.{fmt}: descriptors name extents
                let mut args = vec!["create", "-q", "-f", fmt];
                let rest = extra.trim_start_matches(',');
                if !rest.is_empty() {
                    args.extend(["-o", rest]);
                }
                args.extend([s(&plain), "3M"]);
                vimg(&args);
                // A flat vmdk is a text descriptor (whose CID is random and written as %x,
                // so its length varies) naming a -flat extent: compare the descriptors
                // without the CID line, and the extents' size and allocation.
                let (sized_v, sized_plain) = if extra.contains("Flat") {
                    let text = |p: &std::path::Path, me: &str| -> String {
                        std::fs::read_to_string(p)
                            .unwrap()
                            .lines()
                            .filter(|l| !l.starts_with("CID="))
                            .map(|l| l.replace(me, "X-flat"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    };
                    assert_eq!(
                        text(&v, "v-flat"),
                        text(&plain, "w-flat"),
                        "{fmt} {o}: descriptor"
                    );
                    (
                        dir.path().join(format!("v-flat.{fmt}")),
                        dir.path().join(format!("w-flat.{fmt}")),
                    )
                } else {
                    (v.clone(), plain.clone())
                };
                let (mv, mp) = (
                    std::fs::metadata(&sized_v).unwrap(),
                    std::fs::metadata(&sized_plain).unwrap(),
                );
                assert_eq!(mv.len(), mp.len(), "{fmt} {o}: size");
                use std::os::unix::fs::MetadataExt;
                assert_eq!(mv.blocks(), mp.blocks(), "{fmt} {o}: allocation");
                assert_eq!(
                    qemu_img(&["map", "--output=json", s(&v)]),
                    qemu_img(&["map", "--output=json", s(&plain)]),
                    "{fmt} {o}: map against vimg's plain image"
                );
                // qemu-img's own image is the same with and without the option too.
                let qp = dir.path().join(format!("r.{fmt}"));
                let mut qargs = args.clone();
                let n = qargs.len();
                qargs[n - 2] = s(&qp);
                qemu_img(&qargs);
                assert_eq!(
                    qemu_img(&["map", "--output=json", s(&q)]),
                    qemu_img(&["map", "--output=json", s(&qp)]),
                    "{fmt} {o}: qemu-img's map with and without the option"
                );
                // Across the tools, the maps match, a flat extent's included: qemu's file
                // protocol allocates its first 4 KiB (with or without the option), vimg too.
                // (Not a fixed VHD, which qemu-img maps as raw: vimg leaves its first 4 KiB
                // a hole, with or without the option; same guest content.)
                if extra != ",subformat=fixed" {
                    assert_eq!(
                        qemu_img(&["map", "--output=json", s(&v)]),
                        qemu_img(&["map", "--output=json", s(&q)]),
                        "{fmt} {o}: map"
                    );
                }
                if extra.contains("Flat") {
                    let flat = |p: &str| {
                        let p = dir.path().join(format!("{p}-flat.{fmt}"));
                        (
                            std::fs::metadata(&p).unwrap().blocks(),
                            qemu_img(&["map", "--output=json", "-f", "raw", s(&p)]),
                        )
                    };
                    assert_eq!(flat("v"), flat("q"), "{fmt} {o}: flat extent allocation");
                }
                qemu_img(&["compare", "-q", "-f", fmt, "-F", fmt, s(&v), s(&q)]);
                if !matches!(fmt, "vpc" | "qcow") {
                    // (qemu-img has no check for these.)
                    qemu_img(&["check", "-q", s(&v)]);
                }
            }
            for e in std::fs::read_dir(dir.path()).unwrap() {
                std::fs::remove_file(e.unwrap().path()).unwrap();
            }
        }
    }
}

/// raw takes the file protocol's modes itself; `metadata`, which the protocol knows but
/// refuses, is refused in qemu-img's words ("Unsupported preallocation mode"), a mode it
/// does not know as "invalid parameter value", with qemu-img's exit code and Formatting
/// line. qemu-img leaves an empty file behind; vimg leaves nothing.
#[test]
fn raw_refuses_preallocation_metadata_like_qemu_img() {
    if !qemu_available("raw_refuses_preallocation_metadata_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for mode in ["metadata", "bogus"] {
        let o = format!("preallocation={mode}");
        let v = dir.path().join("v.raw");
        let q = dir.path().join("q.raw");
        let vo = vimg_raw(&["create", "-f", "raw", "-o", &o, s(&v), "1M"]);
        let qo = run_cmd("qemu-img", &["create", "-f", "raw", "-o", &o, s(&q), "1M"]);
        let (vt, qt) = (text(&vo), text(&qo));
        assert_eq!(vt.0, qt.0, "{o}: exit code");
        assert_ne!(vt.0, Some(0), "{o}");
        assert_eq!(vt.1.replace("v.", "q."), qt.1, "{o}: Formatting line");
        assert_eq!(vt.2.replace("v.", "q."), qt.2, "{o}: message");
        assert!(!v.exists(), "{o}: vimg left a file");
    }
}

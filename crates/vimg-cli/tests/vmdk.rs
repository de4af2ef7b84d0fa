//! vmdk against qemu-img both ways, vmdkinfo as a second reader, the shared corpus, and
//! hostile images built by patching qemu-img's output.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use vimg::{ErrorKind, Image, OpenOptions};

const SUBFORMATS: [&str; 5] = [
    "monolithicSparse",
    "streamOptimized",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
];

/// `vmdkinfo` must open the image and say nothing about errors.
fn assert_vmdkinfo_accepts(img: &Path) {
    let out = run_cmd("vmdkinfo", &[s(img)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "vmdkinfo {}:\n{text}", img.display());
    assert!(
        !text.to_lowercase().contains("error") && !text.to_lowercase().contains("unable"),
        "vmdkinfo {}:\n{text}",
        img.display()
    );
}

fn create_type(img: &Path) -> String {
    let v = json(&qemu_img(&["info", "--output=json", s(img)]));
    v["format-specific"]["data"]["create-type"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Asserts vimg's `format-specific` block and cluster size equal qemu-img's.
fn assert_vmdk_info_like_qemu(img: &Path) {
    assert_info_like_qemu(img, &["format-specific", "cluster-size", "virtual-size"]);
    let v = json(&vimg(&["info", "--output=json", s(img)]));
    assert_eq!(v["format"], "vmdk");
}

#[test]
fn vimg_reads_every_subformat_qemu_writes() {
    if !qemu_available("vimg_reads_every_subformat_qemu_writes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 24 << 20);
    let variants: Vec<String> = SUBFORMATS
        .iter()
        .map(|f| format!("subformat={f}"))
        .chain([
            "zeroed_grain=on".to_string(),
            "adapter_type=lsilogic,hwversion=11".to_string(),
            "compat6=on,adapter_type=buslogic".to_string(),
            "subformat=streamOptimized,adapter_type=legacyESX,toolsversion=1234".to_string(),
        ])
        .collect();
    for (i, o) in variants.iter().enumerate() {
        let sub = dir.path().join(format!("q{i}"));
        fs::create_dir(&sub).unwrap();
        let img = sub.join("disk.vmdk");
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            o,
            s(&src),
            s(&img),
        ]);
        assert_reads_like_qemu(&img, "vmdk", &sub);
        assert_vmdk_info_like_qemu(&img);
    }
}

#[test]
fn vimg_reads_qemu_io_patterns_and_zeroed_grains() {
    if !qemu_available("vimg_reads_qemu_io_patterns_and_zeroed_grains") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, opts) in [
        "zeroed_grain=on",
        "subformat=monolithicSparse",
        "subformat=twoGbMaxExtentSparse,zeroed_grain=on",
        "subformat=monolithicFlat",
    ]
    .iter()
    .enumerate()
    {
        let sub = dir.path().join(format!("p{i}"));
        fs::create_dir(&sub).unwrap();
        let img = sub.join("io.vmdk");
        qemu_img(&["create", "-q", "-f", "vmdk", "-o", opts, s(&img), "9M"]);
        let mut cmds = vec![
            "write -P 0x5a 0 128k",
            "write -P 0x33 1M 64k",
            "write -P 0x77 3M 1k",
            "write -P 0x11 8M 1M",
        ];
        if opts.contains("zeroed_grain") {
            cmds.push("write -z 1M 64k");
            cmds.push("write -z 4M 128k");
        }
        qemu_io("vmdk", &img, &cmds);
        assert_reads_like_qemu(&img, "vmdk", &sub);
        if opts.contains("zeroed_grain") {
            // The zeroed grain maps as zero, not as data.
            let im = Image::open(&img, &OpenOptions::default()).unwrap();
            let (e, _, _) = im.map_flat(1 << 20, 64 << 10).unwrap();
            assert_eq!(e.kind, vimg::MapKind::Zero, "{opts}");
        }
    }
}

#[test]
fn qemu_reads_every_subformat_vimg_writes() {
    if !qemu_available("qemu_reads_every_subformat_vimg_writes") {
        return;
    }
    let vmdkinfo = tool_available("qemu_reads_every_subformat_vimg_writes", "vmdkinfo");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, 24 << 20);
    let mut cases: Vec<(String, &str)> = SUBFORMATS
        .iter()
        .map(|f| (format!("subformat={f}"), *f))
        .collect();
    cases.push((
        "zeroed_grain=on,adapter_type=lsilogic".into(),
        "monolithicSparse",
    ));
    cases.push(("compat6=on".into(), "monolithicSparse"));
    cases.push((
        "subformat=streamOptimized,hwversion=14,adapter_type=lsilogic".into(),
        "streamOptimized",
    ));
    cases.push((
        "subformat=twoGbMaxExtentSparse,toolsversion=10304".into(),
        "twoGbMaxExtentSparse",
    ));
    for (i, (o, ct)) in cases.iter().enumerate() {
        let sub = dir.path().join(format!("v{i}"));
        fs::create_dir(&sub).unwrap();
        let img = sub.join("out.vmdk");
        vimg(&["convert", "-O", "vmdk", "-o", o, s(&src), s(&img)]);
        assert_qemu_accepts(&img, "vmdk", &src, "raw");
        assert_eq!(create_type(&img), *ct, "{o}");
        if vmdkinfo {
            assert_vmdkinfo_accepts(&img);
        }
        assert_vmdk_info_like_qemu(&img);
        // And vimg reads back its own output.
        let back = sub.join("back.raw");
        vimg(&["convert", "-O", "raw", s(&img), s(&back)]);
        assert_same_file(&src, &back);
        // The extent files carry qemu-img's names.
        let mut names: Vec<String> = fs::read_dir(&sub)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("out"))
            .collect();
        names.sort();
        let want: Vec<&str> = match *ct {
            "monolithicFlat" => vec!["out-flat.vmdk", "out.vmdk"],
            "twoGbMaxExtentFlat" => vec!["out-f001.vmdk", "out.vmdk"],
            "twoGbMaxExtentSparse" => vec!["out-s001.vmdk", "out.vmdk"],
            _ => vec!["out.vmdk"],
        };
        assert_eq!(names, want, "{o}");
    }
}

#[test]
fn options_are_checked_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    write_sparse_raw(&src, 1 << 20, &[(0, &[1u8; 4096])]);
    for (o, msg) in [
        ("adapter_type=foo", "invalid parameter value: foo"),
        ("subformat=foo", "invalid parameter value: foo"),
        (
            "compat6=on,hwversion=7",
            "compat6 cannot be enabled with hwversion set",
        ),
        (
            "subformat=monolithicFlat,zeroed_grain=on",
            "Flat image can't enable zeroed grain",
        ),
        ("backing_fmt=qcow2", "backing_file must be a vmdk image"),
    ] {
        let dst = dir.path().join("x.vmdk");
        let out = vimg_raw(&["convert", "-O", "vmdk", "-o", o, s(&src), s(&dst)]);
        assert_eq!(out.status.code(), Some(1), "{o}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{o}: {err}");
        assert!(!dst.exists());
    }
    // -n writes into an existing image (tests/inplace_vmdk.rs has the cases): the
    // source reads back from it.
    let existing = dir.path().join("e.vmdk");
    vimg(&["create", "-q", "-f", "vmdk", s(&existing), "1M"]);
    vimg(&["convert", "-n", "-O", "vmdk", s(&src), s(&existing)]);
    let out = vimg_raw(&["compare", s(&src), s(&existing)]);
    assert_eq!(out.status.code(), Some(0));
    // -c: qemu-img refuses flat targets, and writes sparse ones uncompressed.
    let out = vimg_raw(&[
        "convert",
        "-c",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&src),
        s(&dir.path().join("f.vmdk")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid cluster size"));
    vimg(&[
        "convert",
        "-c",
        "-O",
        "vmdk",
        s(&src),
        s(&dir.path().join("c.vmdk")),
    ]);
    let v = json(&vimg(&[
        "info",
        "--output=json",
        s(&dir.path().join("c.vmdk")),
    ]));
    assert_eq!(
        v["format-specific"]["data"]["create-type"],
        "monolithicSparse"
    );
}

#[test]
fn stream_round_trip_keeps_content() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // Not a multiple of the grain: the last grain is short.
    mixed_raw(&src, (40 << 20) + 4096 * 3);
    let so = dir.path().join("so.vmdk");
    vimg(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&src),
        s(&so),
    ]);
    let back = dir.path().join("back.raw");
    vimg(&["convert", "-O", "raw", s(&so), s(&back)]);
    assert_same_file(&src, &back);
    // Through a vdi-less chain of vmdk subformats and back.
    let flat = dir.path().join("flat.vmdk");
    vimg(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&so),
        s(&flat),
    ]);
    let sparse = dir.path().join("sparse.vmdk");
    vimg(&["convert", "-O", "vmdk", s(&flat), s(&sparse)]);
    let back2 = dir.path().join("back2.raw");
    vimg(&["convert", "-O", "raw", s(&sparse), s(&back2)]);
    assert_same_file(&src, &back2);
    if qemu_available("stream_round_trip_keeps_content") {
        qemu_img(&["compare", "-f", "vmdk", "-F", "raw", s(&so), s(&src)]);
        // A source that ends mid-sector: every subformat rounds the disk up to a sector.
        let odd = dir.path().join("odd.raw");
        let tail = pattern(70_000, 4);
        write_sparse_raw(
            &odd,
            (1 << 20) + 1000,
            &[((1 << 20) + 1000 - 70_000, &tail)],
        );
        for sub in SUBFORMATS {
            let v = dir.path().join(format!("odd-{sub}.vmdk"));
            vimg(&[
                "convert",
                "-O",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                s(&odd),
                s(&v),
            ]);
            qemu_img(&["compare", "-f", "vmdk", "-F", "raw", s(&v), s(&odd)]);
            let back = dir.path().join(format!("odd-{sub}.raw"));
            vimg(&["convert", "-O", "raw", s(&v), s(&back)]);
            let b = fs::read(&back).unwrap();
            assert_eq!(b.len(), (1 << 20) + 1024, "{sub}");
            assert_eq!(
                &b[..(1 << 20) + 1000],
                &fs::read(&odd).unwrap()[..],
                "{sub}"
            );
        }
    }
}

/// Decompresses a corpus file into `dir` (by its extension), returns the path.
fn unpack(corpus: &Path, rel: &str, dir: &Path) -> PathBuf {
    let src = corpus.join(rel);
    let name = Path::new(rel)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let (tool, base) = if let Some(b) = name.strip_suffix(".xz") {
        ("xz", b.to_string())
    } else if let Some(b) = name.strip_suffix(".bz2") {
        ("bzip2", b.to_string())
    } else if let Some(b) = name.strip_suffix(".gz") {
        ("gzip", b.to_string())
    } else {
        let dst = dir.join(&name);
        fs::copy(&src, &dst).unwrap();
        return dst;
    };
    let dst = dir.join(&base);
    let out = std::process::Command::new(tool)
        .args(["-dc", s(&src)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{tool} -dc {rel}");
    fs::write(&dst, out.stdout).unwrap();
    dst
}

/// DIGESTS.tsv's digest of an image's content, computed through vimg's mapping so holes
/// cost nothing: sha256 over (index as u64 BE, bytes) of every non-zero 64 KiB block, then
/// the length as u64 BE.
fn content_digest(img: &Image) -> String {
    use sha2::{Digest, Sha256};
    const B: u64 = 64 << 10;
    let size = img.virtual_size();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; B as usize];
    let mut next_block = 0u64;
    let mut pos = 0;
    while pos < size {
        let (e, _, _) = img.map_flat(pos, size - pos).unwrap();
        if e.kind.has_data() {
            let first = (e.start.get() / B).max(next_block);
            let last = (e.end() - 1) / B;
            for blk in first..=last {
                let off = blk * B;
                let n = B.min(size - off) as usize;
                img.read_at(&mut buf[..n], off).unwrap();
                if buf[..n].iter().any(|&x| x != 0) {
                    h.update(blk.to_be_bytes());
                    h.update(&buf[..n]);
                }
            }
            next_block = last + 1;
        }
        pos = e.end();
    }
    h.update(size.to_be_bytes());
    hex(&h.finalize())
}

#[test]
fn corpus_vmdk_rows() {
    let Some(corpus) = corpus_dir() else { return };
    let manifest = fs::read_to_string(corpus.join("MANIFEST.tsv")).unwrap();
    let digests: std::collections::HashMap<String, String> =
        fs::read_to_string(corpus.join("DIGESTS.tsv"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                let mut c = l.split('\t');
                Some((c.next()?.to_string(), c.next()?.to_string()))
            })
            .collect();
    let mut seen = 0;
    for line in manifest.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 8 || !cols[0].contains(".vmdk") {
            continue;
        }
        let (file, expected, notes) = (cols[0], cols[6], cols[7]);
        let dir = tempfile::tempdir().unwrap();
        let img = unpack(&corpus, file, dir.path());
        // Companions: "needs companions: a.xz, b.xz (decompress side by side)".
        if let Some(rest) = notes.split("needs companions: ").nth(1) {
            let list = rest.split(" (").next().unwrap_or("");
            let folder = Path::new(file).parent().unwrap();
            for c in list.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                unpack(&corpus, &folder.join(c).to_string_lossy(), dir.path());
            }
        }
        // image_t4: the libvmdk answer is the truth (qemu rejects a valid VMFS line); it is
        // the content of image_t0..t3 and t5.
        let t4 = file.ends_with("image_t4.vmdk.xz");
        let (expected, digest) = if t4 {
            (
                "0edb04037124ebd942f48c8899ddc4ab742c2e5759b138a986d864bdc8799bc6",
                digests.get("bwlehrpool/image_t0.vmdk.xz").cloned(),
            )
        } else {
            (expected, digests.get(file).cloned())
        };
        let out = dir.path().join("out.raw");
        if expected.starts_with("ERROR") {
            let r = vimg_raw(&["convert", "-O", "raw", s(&img), s(&out)]);
            assert_eq!(r.status.code(), Some(1), "{file} should fail");
            assert!(!out.exists(), "{file}: no output on error");
            let err = String::from_utf8_lossy(&r.stderr);
            assert!(err.contains("capacity"), "{file}: {err}");
            let e = Image::open(&img, &OpenOptions::default()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Invalid, "{file}");
            seen += 1;
            continue;
        }
        if !t4 && qemu_available("corpus_vmdk_rows") {
            assert_vmdk_info_like_qemu(&img);
        }
        let image = Image::open(&img, &OpenOptions::default()).unwrap();
        let digest = digest.unwrap_or_else(|| panic!("{file}: no digest"));
        assert_eq!(content_digest(&image), digest, "{file}");
        if image.virtual_size() <= 64 << 20 {
            let r = vimg_raw(&["convert", "-O", "raw", s(&img), s(&out)]);
            assert!(
                r.status.success(),
                "{file}: {}",
                String::from_utf8_lossy(&r.stderr)
            );
            assert_eq!(sha256_file(&out), expected, "{file}");
        }
        seen += 1;
    }
    assert!(seen >= 11, "only {seen} vmdk rows found");
    // dfvfs/image.vmdk has no row; qemu-img is the oracle for it.
    let dir = tempfile::tempdir().unwrap();
    let img = unpack(&corpus, "dfvfs/image.vmdk.xz", dir.path());
    if qemu_available("corpus_vmdk_rows") {
        assert_reads_like_qemu(&img, "vmdk", dir.path());
    }
}

/// The `CID` (or `parentCID`) qemu-img reports for `img`, as the descriptor spells it.
fn qemu_cid(img: &Path, key: &str) -> String {
    let v = json(&qemu_img(&["info", "--output=json", s(img)]));
    format!(
        "{:08x}",
        v["format-specific"]["data"][key].as_u64().unwrap()
    )
}

#[test]
fn delta_link_over_a_changed_parent_is_refused() {
    if !qemu_available("delta_link_over_a_changed_parent_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&base), "4M"]);
    qemu_io("vmdk", &base, &["write -P 0x11 0 2M"]);
    // A delta link in a monolithic sparse file (embedded descriptor) and one in a
    // descriptor file of its own.
    let children: Vec<PathBuf> = ["monolithicSparse", "twoGbMaxExtentSparse"]
        .iter()
        .map(|sub| {
            let c = d.join(format!("child-{sub}.vmdk"));
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                "-b",
                "base.vmdk",
                "-F",
                "vmdk",
                s(&c),
            ]);
            qemu_io("vmdk", &c, &["write -P 0x22 1M 64k"]);
            c
        })
        .collect();
    let old_cid = qemu_cid(&base, "cid");
    for c in &children {
        assert_eq!(qemu_cid(c, "parent-cid"), old_cid);
        // The intact chain opens and reads as qemu-img reads it.
        assert_reads_like_qemu(c, "vmdk", d);
    }

    // The parent is written to after the children were made: qemu gives it a new CID.
    qemu_io("vmdk", &base, &["write -P 0x33 3M 64k"]);
    let new_cid = qemu_cid(&base, "cid");
    assert_ne!(new_cid, old_cid);
    for c in &children {
        let name = c.file_name().unwrap().to_str().unwrap();
        let out = d.join("out.raw");
        let r = vimg_raw(&["convert", "-O", "raw", s(c), s(&out)]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{err}");
        assert!(err.contains("Backing chain mismatch"), "{err}");
        assert!(err.contains(name) && err.contains("base.vmdk"), "{err}");
        assert!(err.contains(&format!("parentCID {old_cid}")), "{err}");
        assert!(err.contains(&format!("has CID {new_cid}")), "{err}");
        assert!(!out.exists(), "no output from a refused chain");
        let e = Image::open(c, &OpenOptions::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        // Without its chain the image itself is fine: info works, as qemu-img's does.
        let v = json(&vimg(&["info", "--output=json", s(c)]));
        assert_eq!(v["backing-filename"], "base.vmdk");
        // qemu-img 10.0.2 opens the chain and `info` works too, but every read that reaches
        // the parent fails (vmdk_co_preadv -> vmdk_is_cid_valid -> -EINVAL): convert exits
        // 1 with "error while reading at byte 0: Invalid argument". vimg refuses at open,
        // naming both CIDs, as VMware and libvmdk (set_parent_handle) do.
        let q = run_cmd("qemu-img", &["convert", "-O", "raw", s(c), s(&out)]);
        assert!(!q.status.success());
        assert!(
            String::from_utf8_lossy(&q.stderr).contains("Invalid argument"),
            "{}",
            String::from_utf8_lossy(&q.stderr)
        );
        let _ = fs::remove_file(&out);
    }

    // parentCID ffffffff ("no parent") next to a parentFileNameHint: checked like any other
    // value (qemu and libvmdk compare it too), so refused over a parent with a real CID.
    let desc = &children[1];
    let text = fs::read_to_string(desc).unwrap();
    // qemu writes the CID as `%x`, without leading zeros; vimg's messages pad to 8 digits.
    let line = format!("parentCID={:x}", u32::from_str_radix(&old_cid, 16).unwrap());
    assert!(text.contains(&line), "{text}");
    fs::write(desc, text.replace(&line, "parentCID=ffffffff")).unwrap();
    let e = Image::open(desc, &OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("parentCID ffffffff"), "{e}");
}

#[test]
fn delta_link_reads_as_a_backing_chain() {
    if !qemu_available("delta_link_reads_as_a_backing_chain") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&base), "4M"]);
    qemu_io("vmdk", &base, &["write -P 0x11 0 2M"]);
    let top = dir.path().join("top.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        s(&top),
    ]);
    qemu_io("vmdk", &top, &["write -P 0x22 1M 64k"]);
    assert_reads_like_qemu(&top, "vmdk", dir.path());
    let v = json(&vimg(&["info", "--output=json", s(&top)]));
    assert_eq!(v["backing-filename"], "base.vmdk");
    assert_eq!(v["backing-filename-format"], "vmdk");
    let refs = v["vimg-external-references"].as_array().unwrap();
    assert!(refs.iter().any(|r| r["field"] == "parentFileNameHint"));
    // vimg writes delta links too: the same writes on a vimg-made and a qemu-made overlay
    // give the same disk, and qemu-img checks it clean.
    let vtop = dir.path().join("vtop.vmdk");
    vimg(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        s(&vtop),
    ]);
    qemu_io("vmdk", &vtop, &["write -P 0x22 1M 64k"]);
    qemu_img(&["compare", s(&vtop), s(&top)]);
    qemu_img(&["check", s(&vtop)]);
    let q = json(&qemu_img(&["info", "--output=json", s(&vtop)]));
    assert_eq!(q["backing-filename"], "base.vmdk");
    let base_cid = json(&qemu_img(&["info", "--output=json", s(&base)]))["format-specific"]["data"]
        ["cid"]
        .clone();
    assert_eq!(q["format-specific"]["data"]["parent-cid"], base_cid);
    assert_reads_like_qemu(&vtop, "vmdk", dir.path());
    // A flat image cannot have one, as in qemu-img.
    let out = vimg_raw(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        s(&dir.path().join("f.vmdk")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Flat image can't have backing file"));
}

/// Replaces the first occurrence of `from` with `to` (same length) in a file.
fn patch_text(path: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len(), "patches keep the length");
    let mut b = fs::read(path).unwrap();
    let at = b
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("'{from}' not in {}", path.display()));
    b.splice(at..at + from.len(), to.bytes());
    fs::write(path, b).unwrap();
}

fn patch_u32(path: &Path, at: u64, v: u32) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&v.to_le_bytes(), at).unwrap();
}

fn patch_u64(path: &Path, at: u64, v: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&v.to_le_bytes(), at).unwrap();
}

/// Opening `img` fails with `kind`; converting it fails and leaves nothing behind.
fn assert_refused(img: &Path, kind: ErrorKind, what: &str) {
    let e = Image::open(img, &OpenOptions::default())
        .err()
        .unwrap_or_else(|| panic!("{what}: opened"));
    assert_eq!(e.kind(), kind, "{what}: {e}");
    let out = img.with_extension("out");
    let r = vimg_raw(&["convert", "-O", "raw", s(img), s(&out)]);
    assert_eq!(r.status.code(), Some(1), "{what}");
    assert!(!out.exists(), "{what}: output left behind");
}

#[test]
fn hostile_extent_names_are_refused() {
    if !qemu_available("hostile_extent_names_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir(d.join("img")).unwrap();
    let secret = d.join("secret");
    fs::write(&secret, vec![0x5eu8; 1 << 20]).unwrap();
    let img = d.join("img/disk.vmdk");
    qemu_create(&img, "vmdk", "subformat=monolithicFlat", "1M");
    let original = fs::read_to_string(&img).unwrap();
    for (name, kind) in [
        ("/etc/passwd", ErrorKind::UnsafeReference),
        ("../secret", ErrorKind::UnsafeReference),
        ("json:{}", ErrorKind::UnsafeReference),
        ("missing-flat.vmdk", ErrorKind::Io),
    ] {
        fs::write(&img, original.replace("disk-flat.vmdk", name)).unwrap();
        assert_refused(&img, kind, name);
        // --allow-external would read it, but nothing of the secret reached any output.
        for e in fs::read_dir(d.join("img")).unwrap() {
            let p = e.unwrap().path();
            let bytes = fs::read(&p).unwrap();
            assert!(
                !bytes.windows(64).any(|w| w.iter().all(|&b| b == 0x5e)),
                "{}",
                p.display()
            );
        }
    }
    // One sparse file named by many extent lines (cost amplification) is refused.
    let split = d.join("img/split.vmdk");
    qemu_create(&split, "vmdk", "subformat=twoGbMaxExtentSparse", "1M");
    let text = fs::read_to_string(&split).unwrap();
    let line = "RW 2048 SPARSE \"split-s001.vmdk\"\n";
    assert!(text.contains(line), "{text}");
    fs::write(&split, text.replace(line, &line.repeat(1000))).unwrap();
    assert_refused(
        &split,
        ErrorKind::Invalid,
        "one sparse file as 1000 extents",
    );
    // The parent hint of a delta link is judged by the same gate.
    let base = d.join("base.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", s(&base), "1M"]);
    let top = d.join("img/top.vmdk");
    fs::copy(&base, d.join("img/base.vmdk")).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        s(&top),
    ]);
    // Same length: the descriptor is embedded in the sparse file.
    patch_text(
        &top,
        "parentFileNameHint=\"base.vmdk\"",
        "parentFileNameHint=\"../b.vmdk\"",
    );
    fs::rename(&base, d.join("b.vmdk")).unwrap();
    let r = vimg_raw(&["convert", "-O", "raw", s(&top), s(&d.join("img/t.raw"))]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("parentFileNameHint"));
    assert!(!d.join("img/t.raw").exists());
    let e = Image::open(&top, &OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnsafeReference);
    // info without the chain still shows the reference.
    let v = json(&vimg(&["info", "--output=json", s(&top)]));
    assert_eq!(v["backing-filename"], "../b.vmdk");
}

#[test]
fn hostile_tables_are_refused() {
    if !qemu_available("hostile_tables_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // 64 MiB: two grain tables; data in both.
    let data = pattern(128 << 10, 3);
    write_sparse_raw(&src, 64 << 20, &[(0, &data), (40 << 20, &data)]);
    let good = dir.path().join("good.vmdk");
    qemu_img(&["convert", "-O", "vmdk", s(&src), s(&good)]);
    // qemu's layout for 64 MiB: rgd 21, gd 21+1+8 = 30, GT 0 at 31, grains from 128.
    let gd = 30 * 512;
    let gt0 = 31 * 512;
    type Patch = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Patch, ErrorKind)> = vec![
        (
            "grain table past EOF",
            Box::new(move |p| patch_u32(p, gd, 0x7fff_0000)),
            ErrorKind::Corrupt,
        ),
        (
            "two directory entries at one table",
            Box::new(move |p| patch_u32(p, gd + 4, 31)),
            ErrorKind::Corrupt,
        ),
        (
            "grain past EOF",
            Box::new(move |p| patch_u32(p, gt0, 0x00ff_0000)),
            ErrorKind::Corrupt,
        ),
        (
            "two entries at one grain",
            Box::new(move |p| patch_u32(p, gt0 + 4, 128)),
            ErrorKind::Corrupt,
        ),
        (
            "grain in the grain directory",
            Box::new(move |p| patch_u32(p, gt0, 30)),
            ErrorKind::Corrupt,
        ),
        (
            "2^50-sector capacity",
            Box::new(|p| patch_u64(p, 0x0c, 1 << 50)),
            ErrorKind::Invalid,
        ),
        (
            "grain size 3",
            Box::new(|p| patch_u64(p, 0x14, 3)),
            ErrorKind::Invalid,
        ),
        (
            "1024 entries per table",
            Box::new(|p| patch_u32(p, 0x2c, 1024)),
            ErrorKind::Invalid,
        ),
        (
            "version 4",
            Box::new(|p| patch_u32(p, 0x04, 4)),
            ErrorKind::Unsupported,
        ),
    ];
    for (what, patch, kind) in cases {
        let img = dir.path().join("bad.vmdk");
        fs::copy(&good, &img).unwrap();
        patch(&img);
        assert_refused(&img, kind, what);
    }
}

/// The grain directory and the redundant one disagree, as a writer killed between the
/// two tables (or the two directories) leaves them: QEMU's check follows the main
/// directory only and reports nothing, and the image reads by the main directory, so
/// vimg's check says what qemu-img's says (text, JSON, exit code) for each disagreement
/// (issue 15).
#[test]
fn check_of_disagreeing_redundant_directory_is_qemu_img_check() {
    if !qemu_available("check_of_disagreeing_redundant_directory_is_qemu_img_check") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    write_sparse_raw(&src, 8 << 20, &[(0, &pattern(64 << 10, 1))]);
    let good = dir.path().join("c.vmdk");
    qemu_img(&["convert", "-O", "vmdk", s(&src), s(&good)]);
    let rd = |p: &Path, at: u64| {
        let b = fs::read(p).unwrap();
        u64::from(u32::from_le_bytes(
            b[at as usize..at as usize + 4].try_into().unwrap(),
        ))
    };
    // Header: rgdOffset at 48, gdOffset at 56 (sectors).
    let rgd = rd(&good, 48) * 512;
    let gd = rd(&good, 56) * 512;
    let (gt0, rgt0) = (rd(&good, gd) * 512, rd(&good, rgd) * 512);
    assert!(gt0 != 0 && rgt0 != 0);
    let cases: [(&str, u64); 4] = [
        ("redundant table entry lost", rgt0),
        ("main table entry lost", gt0),
        ("redundant directory entry lost", rgd),
        ("main directory entry lost", gd),
    ];
    for (what, at) in cases {
        let img = dir.path().join("k.vmdk");
        fs::copy(&good, &img).unwrap();
        patch_u32(&img, at, 0);
        for json in [false, true] {
            let mut args = vec!["check"];
            if json {
                args.push("--output=json");
            }
            args.push(s(&img));
            let v = vimg_raw(&args);
            let q = run_cmd("qemu-img", &args);
            assert_eq!(v.stdout, q.stdout, "{what}, json {json}");
            assert_eq!(v.stderr, q.stderr, "{what}, json {json}");
            assert_eq!(v.status.code(), q.status.code(), "{what}, json {json}");
            assert_eq!(v.status.code(), Some(0), "{what}");
        }
        // Both read the main directory.
        let out = dir.path().join("k.raw");
        vimg(&["convert", "-O", "raw", s(&img), s(&out)]);
        assert!(
            fs::read(&out).unwrap() == common::kill::guest(&img, "vmdk"),
            "{what}: guest content"
        );
    }
    // vimg's own output checks clean.
    let v = dir.path().join("v.vmdk");
    vimg(&["convert", "-O", "vmdk", s(&src), s(&v)]);
    let r = Image::open(&v, &OpenOptions::default())
        .unwrap()
        .reader()
        .check()
        .unwrap();
    assert_eq!(r.corruptions, 0);
}

/// The committed fixture, truncated at ten points, errors without panicking.
#[test]
fn truncated_fixtures_error_without_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata");
    for name in ["small-stream.vmdk", "small-vimg-stream.vmdk"] {
        let full = fs::read(root.join(name)).unwrap();
        // The whole fixture reads as small.raw.
        let img = Image::open(root.join(name), &OpenOptions::default()).unwrap();
        assert_eq!(img.virtual_size(), 64 << 20);
        for i in 1..=10 {
            let cut = full.len() * i / 11;
            let st = std::sync::Arc::new(vimg::storage::MemStorage::new(full[..cut].to_vec()));
            // A cut through tables or grains is an error; a cut that only drops trailing
            // padding (qemu-img pads its stream files) must still read the same.
            if let Ok(cut_img) = Image::open_storage(st, None, &OpenOptions::default()) {
                let mut a = vec![0u8; 1 << 20];
                let mut b = vec![0u8; 1 << 20];
                for off in (0..64u64 << 20).step_by(1 << 20) {
                    img.read_at(&mut a, off).unwrap();
                    let r = cut_img.read_at(&mut b, off);
                    assert!(r.is_err() || a == b, "{name} cut at {cut} reads wrong data");
                }
            }
            vimg::fuzzing::open_and_read_all(&full[..cut], Some(vimg::Format::Vmdk));
        }
    }
}

/// The split subformats past one 2 GiB extent, with data across the boundary.
#[test]
fn split_subformats_past_two_gib() {
    if !qemu_available("split_subformats_past_two_gib") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let size = (2u64 << 30) + (3 << 20);
    let a = pattern(256 << 10, 5);
    write_sparse_raw(
        &src,
        size,
        &[
            (0, &a),
            ((2 << 30) - (128 << 10), &a),
            (size - 4096, &a[..4096]),
        ],
    );
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let d = dir.path().join(sub);
        fs::create_dir(&d).unwrap();
        let v = d.join("v.vmdk");
        vimg(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            s(&src),
            s(&v),
        ]);
        qemu_img(&["compare", "-f", "vmdk", "-F", "raw", s(&v), s(&src)]);
        let n = fs::read_dir(&d).unwrap().count();
        assert_eq!(n, 3, "{sub}: descriptor and two extents");
        let q = d.join("q.vmdk");
        qemu_img(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            s(&src),
            s(&q),
        ]);
        // Both read it alike; compared by qemu-img, which skips holes (reading 2 GiB into
        // memory would dominate the test).
        let (qr, vr) = (d.join("q.raw"), d.join("v.raw"));
        qemu_img(&["convert", "-O", "raw", s(&q), s(&qr)]);
        vimg(&["convert", "-O", "raw", s(&q), s(&vr)]);
        qemu_img(&["compare", "-s", "-f", "raw", "-F", "raw", s(&qr), s(&vr)]);
        assert_vmdk_info_like_qemu(&q);
    }
}

/// libyal's libvmdk (Debian's python3-libvmdk) as a second reader of content: every
/// subformat vimg writes reads back as the source. Skips visibly when pyvmdk is missing
/// (`.ci/run` does not install it yet).
#[test]
fn libvmdk_reads_what_vimg_writes() {
    let py = "/usr/bin/python3";
    let have = std::process::Command::new(py)
        .args(["-c", "import pyvmdk"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        skipped_line(format_args!(
            "SKIPPED libvmdk_reads_what_vimg_writes: python3-libvmdk (pyvmdk) not installed"
        ));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    mixed_raw(&src, (24 << 20) + 4096 * 3);
    let script = "import pyvmdk,sys,hashlib\nh=pyvmdk.handle()\nh.open(sys.argv[1])\n\
                  h.open_extent_data_files()\nn=h.get_media_size()\nd=hashlib.sha256()\no=0\n\
                  while o<n:\n k=min(1<<20,n-o)\n d.update(h.read_buffer_at_offset(k,o))\n o+=k\n\
                  print(d.hexdigest())\n";
    let want = sha256_file(&src);
    for o in SUBFORMATS
        .iter()
        .map(|f| format!("subformat={f}"))
        .chain(["zeroed_grain=on".to_string()])
    {
        let sub = dir.path().join(o.replace(['=', ','], "_"));
        fs::create_dir(&sub).unwrap();
        let img = sub.join("x.vmdk");
        vimg(&["convert", "-O", "vmdk", "-o", &o, s(&src), s(&img)]);
        let got = run_ok(py, &["-c", script, s(&img)]);
        assert_eq!(got.trim(), want, "{o}");
    }
}

/// A conversion that fails half-way leaves none of the files of a multi-file vmdk, and a
/// destination that is one of the source's extent files is refused before anything is
/// written.
#[test]
fn multi_file_output_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    write_sparse_raw(
        &src,
        8 << 20,
        &[(0, &pattern(1 << 20, 9)), (6 << 20, &[7u8; 65536])],
    );
    let so = dir.path().join("so.vmdk");
    vimg(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&src),
        s(&so),
    ]);
    // Garble the compressed bytes of the grain at 6 MiB: the image opens (its tables are
    // sound) and the copy fails when that grain is decoded.
    let mut b = fs::read(&so).unwrap();
    let marker = b
        .chunks(512)
        .position(|c| c[..8] == (12288u64).to_le_bytes() && c[8..12] != [0, 0, 0, 0])
        .expect("grain marker of the grain at 6 MiB");
    let at = marker * 512 + 12;
    b[at + 2..at + 40].fill(0xff);
    fs::write(&so, &b).unwrap();
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    for sub in [
        "twoGbMaxExtentFlat",
        "twoGbMaxExtentSparse",
        "monolithicFlat",
    ] {
        let r = vimg_raw(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            s(&so),
            s(&out.join("d.vmdk")),
        ]);
        assert_eq!(r.status.code(), Some(1), "{sub}");
        assert_eq!(
            fs::read_dir(&out).unwrap().count(),
            0,
            "{sub}: files left behind"
        );
    }
    // The destination is the source's own flat extent.
    let flat = dir.path().join("f.vmdk");
    vimg(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&src),
        s(&flat),
    ]);
    let before = fs::read(dir.path().join("f-flat.vmdk")).unwrap();
    let r = vimg_raw(&[
        "convert",
        "-O",
        "raw",
        s(&flat),
        s(&dir.path().join("f-flat.vmdk")),
    ]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("same file"));
    assert_eq!(fs::read(dir.path().join("f-flat.vmdk")).unwrap(), before);
}

//! Guest writes into encrypted qcow2 images in place (issues 15 and 14): LUKS
//! (`encrypt.format=luks`, IVs from host sectors) and the legacy AES (IVs from guest
//! sectors), through `convert -n`, `commit` (iotest 198's command line, with
//! `backing.encrypt.key-secret`) and `resize`. qemu-img is the oracle: it reads what vimg
//! wrote, with the secret, as the content vimg was asked to write, and `qemu-img check`
//! finds the image clean; a kill at every write point leaves no corruption and every
//! cluster old or new.

mod common;

use std::path::Path;

use common::kill::{assert_old_or_new, run_killed};
use common::*;

const SECRET: &str = "secret,id=sec0,data=astrochicken";
const SECRET1: &str = "secret,id=sec1,data=furby";

/// `--image-opts` spelling of an encrypted qcow2 image keyed with `sec`.
fn spec(img: &Path, sec: &str) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret={sec}",
        s(img)
    )
}

/// A new encrypted qcow2 image made by qemu-img: `format` is `luks` or `aes`.
fn create(img: &Path, format: &str, sec: &str, extra: &str, size: &str) {
    let obj = if sec == "sec0" { SECRET } else { SECRET1 };
    let mut o = format!("encrypt.format={format},encrypt.key-secret={sec}");
    if format == "luks" {
        o.push_str(",encrypt.iter-time=10");
    }
    if !extra.is_empty() {
        o.push(',');
        o.push_str(extra);
    }
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        obj,
        "-o",
        &o,
        s(img),
        size,
    ]);
}

/// qemu-io commands on an encrypted image (both secrets defined).
fn qio(img: &Path, sec: &str, cmds: &[&str]) {
    qio_spec(&spec(img, sec), cmds);
}

/// qemu-io commands on the image `sp` names (`--image-opts`).
fn qio_spec(sp: &str, cmds: &[&str]) {
    let mut args = vec!["--object", SECRET, "--object", SECRET1];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push("--image-opts");
    args.push(sp);
    run_ok("qemu-io", &args);
}

/// The guest content of an encrypted image (and its chain, keys from `backing`), read by
/// qemu-img.
fn guest_of(img_spec: &str, dir: &Path) -> Vec<u8> {
    let raw = dir.join("guest.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_img(&[
        "convert",
        "--object",
        SECRET,
        "--object",
        SECRET1,
        "--image-opts",
        img_spec,
        "-O",
        "raw",
        s(&raw),
    ]);
    let v = std::fs::read(&raw).expect("read raw");
    let _ = std::fs::remove_file(&raw);
    v
}

/// `qemu-img check` of an encrypted image: its exit code (0 clean, 3 leaks); panics on
/// corruption.
fn check(img: &Path, sec: &str) -> i32 {
    let sp = spec(img, sec);
    let out = run_cmd(
        "qemu-img",
        &[
            "check",
            "--object",
            SECRET,
            "--object",
            SECRET1,
            "--image-opts",
            &sp,
        ],
    );
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "qemu-img check of {}: exit {code}\n{}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    code
}

/// A raw source with data at cluster-unaligned places and zero runs.
fn source(p: &Path, size: u64) -> Vec<u8> {
    let a = pattern(100_000, 3);
    let b = pattern(70_001, 9);
    write_sparse_raw(
        p,
        size,
        &[(4_096, &a), (1_500_000, &b), (size - 512, &[7u8; 512])],
    );
    std::fs::read(p).expect("read source")
}

fn convert_n_into(format: &str, compat: &str) {
    let test = format!("convert_n_into_{format}_{compat}");
    if !qemu_available(&test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let want = source(&src, 4 << 20);
    // `prog` (vimg or qemu-img) converts into a filled image: old content everywhere the
    // new one must replace (and must not show through).
    let convert_n = |prog: &Path, name: &str| -> (std::path::PathBuf, String) {
        let img = dir.path().join(name);
        create(&img, format, "sec0", &format!("compat={compat}"), "4M");
        qio(&img, "sec0", &["write -P 0xee 0 4M"]);
        let sp = spec(&img, "sec0");
        let args = [
            "convert",
            "-n",
            "--object",
            SECRET,
            "-f",
            "raw",
            "--target-image-opts",
            s(&src),
            &sp,
        ];
        run_ok(prog, &args);
        (img, sp)
    };
    let (img, sp) = convert_n(&vimg_bin(), "t.qcow2");
    assert!(
        guest_of(&sp, dir.path()) == want,
        "{test}: qemu-img reads other content"
    );
    assert_eq!(check(&img, "sec0"), 0, "{test}");
    // qemu-img doing the same gives the same guest content and map.
    let (_q, qs) = convert_n(Path::new("qemu-img"), "q.qcow2");
    let map = |sp: &str| {
        qemu_img(&[
            "map",
            "--output=json",
            "--object",
            SECRET,
            "--image-opts",
            sp,
        ])
    };
    assert_eq!(map(&sp), map(&qs), "{test}: map differs from qemu-img's");
}

#[test]
fn convert_n_into_luks_qcow2() {
    convert_n_into("luks", "1.1");
}

#[test]
fn convert_n_into_luks_qcow2_v2() {
    convert_n_into("luks", "0.10");
}

#[test]
fn convert_n_into_aes_qcow2() {
    convert_n_into("aes", "1.1");
}

/// iotest 198's chain: an encrypted base holding old data, an encrypted overlay (other
/// secret, 4 KiB clusters so that commit writes parts of the base's 64 KiB clusters) with
/// data at unaligned places.
fn chain(dir: &Path, base_fmt: &str) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let base = dir.join("b.qcow2");
    let top = dir.join("t.qcow2");
    create(&base, base_fmt, "sec0", "", "2M");
    qio(&base, "sec0", &["write -P 0x0a 0 2M"]);
    create(
        &top,
        "luks",
        "sec1",
        &format!(
            "cluster_size=4096,backing_file={},backing_fmt=qcow2",
            s(&base)
        ),
        "2M",
    );
    let sp = format!(
        "{},backing.driver=qcow2,backing.file.filename={},backing.encrypt.key-secret=sec0",
        spec(&top, "sec1"),
        s(&base)
    );
    qio_spec(
        &sp,
        &[
            "write -P 0x09 4096 8192",
            "write -P 0x0b 200704 4096",
            "write -z 1048576 65536",
            "write -P 0x0c 2093056 4096",
        ],
    );
    (base, top, sp)
}

fn commit_into(base_fmt: &str) {
    let test = format!("commit_into_{base_fmt}");
    if !qemu_available(&test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, _top, sp) = chain(dir.path(), base_fmt);
    let want = guest_of(&sp, dir.path());
    let out = vimg(&[
        "commit",
        "--object",
        SECRET,
        "--object",
        SECRET1,
        "--image-opts",
        &sp,
    ]);
    assert_eq!(out, "Image committed.\n");
    let bs = spec(&base, "sec0");
    assert!(
        guest_of(&bs, dir.path()) == want,
        "{test}: base does not hold the top's data"
    );
    assert!(
        guest_of(&sp, dir.path()) == want,
        "{test}: the chain reads other content"
    );
    assert_eq!(check(&base, "sec0"), 0, "{test}");
    // The same commit by qemu-img on a copy of the chain: same guest content of the base.
    let d2 = dir.path().join("q");
    std::fs::create_dir(&d2).unwrap();
    let (qbase, _qtop, qsp) = chain(&d2, base_fmt);
    qemu_img(&[
        "commit",
        "--object",
        SECRET,
        "--object",
        SECRET1,
        "--image-opts",
        &qsp,
    ]);
    assert!(
        guest_of(&spec(&qbase, "sec0"), &d2) == want,
        "{test}: qemu-img's base differs"
    );
}

#[test]
fn commit_into_luks_base_as_iotest_198() {
    commit_into("luks");
}

#[test]
fn commit_into_aes_base() {
    commit_into("aes");
}

#[test]
fn commit_without_the_base_key_is_refused_before_writing() {
    if !qemu_available("commit_without_the_base_key_is_refused_before_writing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, _top, _sp) = chain(dir.path(), "luks");
    let before = sha256_file(&base);
    let top_only = spec(&dir.path().join("t.qcow2"), "sec1");
    let out = vimg_raw(&["commit", "--object", SECRET1, "--image-opts", &top_only]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("encrypt.key-secret"), "{err}");
    assert_eq!(sha256_file(&base), before, "the base changed");
}

#[test]
fn backing_options_naming_another_file_are_refused() {
    if !qemu_available("backing_options_naming_another_file_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_base, top, _sp) = chain(dir.path(), "luks");
    let other = dir.path().join("other.qcow2");
    create(&other, "luks", "sec0", "", "2M");
    let sp = format!(
        "{},backing.file.filename={},backing.encrypt.key-secret=sec0",
        spec(&top, "sec1"),
        s(&other)
    );
    let out = vimg_raw(&[
        "compare",
        "--object",
        SECRET,
        "--object",
        SECRET1,
        "--image-opts",
        &sp,
        &sp,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("backing file"));
}

#[test]
fn info_names_a_keyed_image_as_qemu_img_does() {
    if !qemu_available("info_names_a_keyed_image_as_qemu_img_does") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qcow2");
    create(&img, "luks", "sec0", "", "1M");
    let sp = spec(&img, "sec0");
    let args = ["info", "--object", SECRET, "--image-opts", sp.as_str()];
    let first = |t: String| t.lines().next().unwrap_or_default().to_string();
    assert_eq!(first(vimg(&args)), first(qemu_img(&args)));
    let j = |t: String| json(&t)["filename"].clone();
    let mut jargs = args.to_vec();
    jargs.push("--output=json");
    assert_eq!(j(vimg(&jargs)), j(qemu_img(&jargs)));
}

#[test]
fn resize_of_a_luks_image_reads_back() {
    if !qemu_available("resize_of_a_luks_image_reads_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qcow2");
    create(&img, "luks", "sec0", "", "1M");
    qio(&img, "sec0", &["write -P 0x5a 1000 5000"]);
    let sp = spec(&img, "sec0");
    let before = guest_of(&sp, dir.path());
    vimg(&["resize", "--object", SECRET, "--image-opts", &sp, "3M"]);
    let mut want = before;
    want.resize(3 << 20, 0);
    assert!(guest_of(&sp, dir.path()) == want);
    assert_eq!(check(&img, "sec0"), 0);
    // Without the key, as qemu-img: refused.
    let out = vimg_raw(&["resize", "-f", "qcow2", s(&img), "4M"]);
    assert!(!out.status.success());
}

/// Killed before every write, flush and truncation of a commit into a LUKS base: no
/// corruption, every base cluster old or new, and the commit run again finishes with
/// the data qemu-img expects.
#[test]
fn commit_into_luks_base_killed_at_every_write() {
    if !qemu_available("commit_into_luks_base_killed_at_every_write") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, _top, sp) = chain(dir.path(), "luks");
    let bs = spec(&base, "sec0");
    let old = guest_of(&bs, dir.path());
    let new = guest_of(&sp, dir.path());
    let pristine_base = dir.path().join("b.pristine");
    let pristine_top = dir.path().join("t.pristine");
    std::fs::copy(&base, &pristine_base).unwrap();
    std::fs::copy(dir.path().join("t.qcow2"), &pristine_top).unwrap();
    let args = [
        "commit",
        "--object",
        SECRET,
        "--object",
        SECRET1,
        "--image-opts",
        &sp,
    ];
    let mut n = 0;
    while run_killed(&args, n) {
        let what = format!("killed before write {n}");
        check(&base, "sec0");
        let got = guest_of(&bs, dir.path());
        assert_old_or_new(&got, &old, &new, 65536, &what);
        // The chain still reads as before the commit (the top still holds its data).
        assert!(
            guest_of(&sp, dir.path()) == new,
            "{what}: the chain changed"
        );
        // Run again to the end: the base holds the new data.
        vimg(&args);
        assert!(
            guest_of(&bs, dir.path()) == new,
            "{what}: the rerun's base differs"
        );
        std::fs::copy(&pristine_base, &base).unwrap();
        std::fs::copy(&pristine_top, dir.path().join("t.qcow2")).unwrap();
        n += 1;
        assert!(n < 400, "the commit never finished");
    }
    assert!(n > 3, "the commit wrote too little to test ({n} points)");
}

//! Issues 15/14, LUKS volumes changed in place, qemu-img as the oracle: key slots vimg adds
//! (luks and qcow2 `encrypt.*`) open in qemu-io and cryptsetup, key slots qemu-img adds open
//! in vimg; the same amend sequence run by vimg and by qemu-img on copies gives the same
//! messages, exit codes and slot states; an erased slot's key material is gone (a restored
//! header does not bring it back, iotest 294); resize grows and shrinks as qemu-img does,
//! named by `--image-opts` (iotest 048); a kill at any write of an amend leaves every
//! enabled slot openable.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

const SECRETS: [&str; 5] = [
    "secret,id=sec0,data=hunter0",
    "secret,id=sec1,data=hunter1",
    "secret,id=sec2,data=hunter2",
    "secret,id=sec3,data=hunter3",
    "secret,id=sec4,data=hunter4",
];

fn objects() -> Vec<String> {
    SECRETS
        .iter()
        .flat_map(|s| ["--object".to_string(), s.to_string()])
        .collect()
}

fn luks_opts(img: &Path, key: &str) -> String {
    format!("driver=luks,file.filename={},key-secret={key}", s(img))
}

fn qcow2_opts(img: &Path, key: &str) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret={key}",
        s(img)
    )
}

/// A 4 MiB luks volume made by qemu-img (key sec0 in slot 0) with a pattern written.
fn qemu_luks(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        SECRETS[0],
        "-o",
        "key-secret=sec0,iter-time=10",
        s(&img),
        "4M",
    ]);
    assert!(io_opens(&img, "luks", "sec0", "write -P 0x5a 0 64k"));
    img
}

/// qemu-io with key `key` runs `cmd` on `img`; true when it opened and ran cleanly.
fn io_opens(img: &Path, fmt: &str, key: &str, cmd: &str) -> bool {
    let o = match fmt {
        "luks" => luks_opts(img, key),
        _ => qcow2_opts(img, key),
    };
    let mut args = objects();
    args.extend(["--image-opts".into(), o, "-c".into(), cmd.into()]);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = run_cmd("qemu-io", &a);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success()
        && !text.contains("can't open")
        && !text.contains("Pattern verification failed")
}

/// `PROG amend` with all secrets, `--image-opts NAME`, `-o OPTS` (and `--force`).
fn amend(prog: &str, name: &str, o: &str, force: bool) -> Output {
    let mut args = vec!["amend".to_string()];
    args.extend(objects());
    args.extend(["--image-opts".into(), name.into(), "-o".into(), o.into()]);
    if force {
        args.push("--force".into());
    }
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    match prog {
        "vimg" => vimg_raw(&a),
        _ => run_cmd("qemu-img", &a),
    }
}

/// Active flags of the key slots, from qemu-img info.
fn slots(img: &Path, fmt: &str) -> Vec<bool> {
    let v = json(&qemu_img(&["info", "-f", fmt, "--output=json", s(img)]));
    let spec = &v["format-specific"]["data"];
    let slots = match fmt {
        "luks" => &spec["slots"],
        _ => &spec["encrypt"]["slots"],
    };
    slots
        .as_array()
        .expect("slots")
        .iter()
        .map(|s| s["active"].as_bool().expect("active"))
        .collect()
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr)
        .replace("vimg: ", "")
        .replace("qemu-img: ", "")
        .replace("vimg.img", "IMG")
        .replace("qemu.img", "IMG")
        .replace("mine.luks", "IMG")
        .replace("theirs.luks", "IMG")
}

#[test]
fn vimg_adds_keys_qemu_and_cryptsetup_open_them() {
    if !qemu_available("vimg_adds_keys_qemu_and_cryptsetup_open_them") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_luks(dir.path(), "a.luks");
    let o = amend(
        "vimg",
        &luks_opts(&img, "sec0"),
        "state=active,new-secret=sec1,iter-time=10",
        false,
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    let o = amend(
        "vimg",
        &luks_opts(&img, "sec1"),
        "state=active,new-secret=sec2,iter-time=10,keyslot=6",
        false,
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(
        slots(&img, "luks"),
        [true, true, false, false, false, false, true, false]
    );
    for key in ["sec0", "sec1", "sec2"] {
        assert!(io_opens(&img, "luks", key, "read -P 0x5a 0 64k"), "{key}");
    }
    assert!(!io_opens(&img, "luks", "sec3", "read 0 512"));
    if !tool_available("vimg_adds_keys_qemu_and_cryptsetup_open_them", "cryptsetup") {
        return;
    }
    let dump = run_ok("cryptsetup", &["luksDump", s(&img)]);
    assert!(dump.contains("Key Slot 1: ENABLED"), "{dump}");
    assert!(dump.contains("Key Slot 6: ENABLED"), "{dump}");
    for (slot, pw) in [("1", "hunter1"), ("6", "hunter2"), ("0", "hunter0")] {
        let pwfile = dir.path().join(format!("pw{slot}"));
        fs::write(&pwfile, pw).unwrap();
        run_ok(
            "cryptsetup",
            &[
                "open",
                "--test-passphrase",
                "--key-slot",
                slot,
                "--key-file",
                s(&pwfile),
                s(&img),
            ],
        );
    }
}

#[test]
fn qemu_adds_keys_vimg_opens_them() {
    if !qemu_available("qemu_adds_keys_vimg_opens_them") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_luks(dir.path(), "q.luks");
    let o = amend(
        "qemu-img",
        &luks_opts(&img, "sec0"),
        "state=active,new-secret=sec3,iter-time=10,keyslot=3",
        false,
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    let want = dir.path().join("want.raw");
    let got = dir.path().join("got.raw");
    let mut a = vec!["convert".to_string()];
    a.extend(objects());
    a.extend([
        "--image-opts".into(),
        luks_opts(&img, "sec0"),
        "-O".into(),
        "raw".into(),
        s(&want).into(),
    ]);
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    qemu_img(&a);
    let mut b = vec!["convert".to_string()];
    b.extend(objects());
    b.extend([
        "--image-opts".into(),
        luks_opts(&img, "sec3"),
        "-O".into(),
        "raw".into(),
        s(&got).into(),
    ]);
    let b: Vec<&str> = b.iter().map(|s| s.as_str()).collect();
    vimg(&b);
    assert_eq!(fs::read(&want).unwrap(), fs::read(&got).unwrap());
    // And vimg erases the slot qemu-img added, which qemu then refuses.
    let o = amend(
        "vimg",
        &luks_opts(&img, "sec0"),
        "state=inactive,old-secret=sec3",
        false,
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(!io_opens(&img, "luks", "sec3", "read 0 512"));
    assert!(io_opens(&img, "luks", "sec0", "read -P 0x5a 0 64k"));
}

/// The amend steps of the rules test: (key-secret, options, --force).
const STEPS: &[(&str, &str, bool)] = &[
    (
        "sec0",
        "state=active,new-secret=sec4,iter-time=10,keyslot=4",
        false,
    ),
    ("sec0", "state=active,new-secret=sec1,iter-time=10", false),
    (
        "sec0",
        "state=active,new-secret=sec2,iter-time=10,keyslot=4",
        false,
    ),
    (
        "sec0",
        "state=active,new-secret=sec2,iter-time=10,keyslot=9",
        false,
    ),
    ("sec0", "state=active,new-secret=sec2,keyslot=-1", false),
    (
        "sec0",
        "state=active,new-secret=sec2,keyslot=4294967296",
        false,
    ),
    ("sec0", "state=inactive,keyslot=-3", false),
    ("sec0", "state=inactive,keyslot=99999999999", false),
    ("sec0", "state=active,iter-time=10", false),
    (
        "sec0",
        "state=active,new-secret=sec2,old-secret=sec0",
        false,
    ),
    ("sec0", "state=active,new-secret=sec7,iter-time=10", false),
    ("sec0", "state=inactive", false),
    ("sec0", "state=inactive,new-secret=sec1,keyslot=1", false),
    ("sec0", "state=inactive,iter-time=10,keyslot=1", false),
    ("sec0", "state=inactive,keyslot=2", false),
    ("sec0", "state=inactive,keyslot=2", true),
    ("sec0", "state=inactive,keyslot=8", false),
    ("sec0", "state=inactive,old-secret=sec5", false),
    ("sec0", "state=inactive,old-secret=sec3", false),
    ("sec0", "state=inactive,old-secret=sec0,keyslot=4", false),
    ("sec1", "state=inactive,old-secret=sec4,keyslot=4", false),
    ("sec1", "state=inactive,old-secret=sec0", false),
    ("sec1", "state=inactive,old-secret=sec1", false),
    ("sec1", "state=inactive,keyslot=1", false),
    (
        "sec1",
        "state=active,new-secret=sec2,iter-time=10,keyslot=1",
        true,
    ),
    ("sec2", "state=inactive,old-secret=sec2", false),
    ("sec2", "state=inactive,keyslot=1", true),
    ("sec2", "state=active,new-secret=sec2,iter-time=10", false),
];

fn run_rules(fmt: &str, prefix: &str) {
    let dir = tempfile::tempdir().unwrap();
    let base = match fmt {
        "luks" => qemu_luks(dir.path(), "base"),
        _ => qemu_qcow2(dir.path(), "base"),
    };
    let mine = dir.path().join("vimg.img");
    let theirs = dir.path().join("qemu.img");
    fs::copy(&base, &mine).unwrap();
    fs::copy(&base, &theirs).unwrap();
    let name = |img: &Path, key: &str| match fmt {
        "luks" => luks_opts(img, key),
        _ => qcow2_opts(img, key),
    };
    for (key, o, force) in STEPS {
        let o: String = o
            .split(',')
            .map(|kv| format!("{prefix}{kv}"))
            .collect::<Vec<_>>()
            .join(",");
        let q = amend("qemu-img", &name(&theirs, key), &o, *force);
        let v = amend("vimg", &name(&mine, key), &o, *force);
        let what = format!("{fmt}: amend key-secret={key} -o {o} force={force}");
        assert_eq!(
            v.status.code(),
            q.status.code(),
            "{what}: {}",
            stderr_of(&v)
        );
        assert_eq!(stderr_of(&v), stderr_of(&q), "{what}");
        assert_eq!(slots(&mine, fmt), slots(&theirs, fmt), "{what}");
    }
    for key in ["sec0", "sec1", "sec2", "sec3", "sec4"] {
        assert_eq!(
            io_opens(&mine, fmt, key, "read -P 0x5a 0 64k"),
            io_opens(&theirs, fmt, key, "read -P 0x5a 0 64k"),
            "{fmt}: {key}"
        );
    }
}

/// A 4 MiB qcow2 image with LUKS encryption made by qemu-img (key sec0), a pattern written.
fn qemu_qcow2(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRETS[0],
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        s(&img),
        "4M",
    ]);
    assert!(io_opens(&img, "qcow2", "sec0", "write -P 0x5a 0 64k"));
    img
}

#[test]
fn luks_amend_rules_match_qemu() {
    if qemu_available("luks_amend_rules_match_qemu") {
        run_rules("luks", "");
    }
}

#[test]
fn qcow2_amend_rules_match_qemu() {
    if qemu_available("qcow2_amend_rules_match_qemu") {
        run_rules("qcow2", "encrypt.");
    }
}

#[test]
fn qcow2_key_added_by_vimg_opens_and_checks_clean() {
    if !qemu_available("qcow2_key_added_by_vimg_opens_and_checks_clean") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_qcow2(dir.path(), "k.qcow2");
    let o = amend(
        "vimg",
        &qcow2_opts(&img, "sec0"),
        "encrypt.state=active,encrypt.new-secret=sec3,encrypt.iter-time=10,encrypt.keyslot=2",
        false,
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(
        slots(&img, "qcow2"),
        [true, false, true, false, false, false, false, false]
    );
    assert!(io_opens(&img, "qcow2", "sec3", "read -P 0x5a 0 64k"));
    let mut a = vec!["check".to_string()];
    a.extend(objects());
    a.extend(["--image-opts".into(), qcow2_opts(&img, "sec3")]);
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let out = qemu_img(&a);
    assert!(out.contains("No errors were found"), "{out}");
}

#[test]
fn qcow2_without_luks_refused_as_qemu() {
    if !qemu_available("qcow2_without_luks_refused_as_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("plain.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let before = fs::read(&img).unwrap();
    let name = format!("driver=qcow2,file.filename={}", s(&img));
    let o = "encrypt.state=active,encrypt.new-secret=sec1";
    let q = amend("qemu-img", &name, o, false);
    let v = amend("vimg", &name, o, false);
    assert_eq!(v.status.code(), q.status.code());
    assert_eq!(stderr_of(&v), stderr_of(&q));
    assert_eq!(fs::read(&img).unwrap(), before);
}

#[test]
fn luks_option_refusals_as_qemu() {
    if !qemu_available("luks_option_refusals_as_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_luks(dir.path(), "o.luks");
    let before = fs::read(&img).unwrap();
    for o in [
        "cipher-alg=aes-128",
        "size=8M",
        "state=active,new-secret=sec1,bogus=1",
        "state=sideways",
        "state=active,new-secret=sec1,iter-time=ten",
    ] {
        let q = amend("qemu-img", &luks_opts(&img, "sec0"), o, false);
        let v = amend("vimg", &luks_opts(&img, "sec0"), o, false);
        assert_eq!(v.status.code(), q.status.code(), "{o}");
        assert_eq!(stderr_of(&v), stderr_of(&q), "{o}");
    }
    // Without a key-secret the volume does not open, as in qemu-img.
    let mut a = vec!["amend".to_string()];
    a.extend(objects());
    a.extend(["-f", "luks", s(&img), "-o", "state=active,new-secret=sec1"].map(String::from));
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let q = run_cmd("qemu-img", &a);
    let v = vimg_raw(&a);
    assert_eq!(v.status.code(), q.status.code());
    assert_eq!(stderr_of(&v), stderr_of(&q));
    assert_eq!(fs::read(&img).unwrap(), before);
}

#[test]
fn erased_key_material_is_gone() {
    // iotest 294: restoring the header of an erased slot does not bring its key back.
    if !qemu_available("erased_key_material_is_gone") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_luks(dir.path(), "e.luks");
    let o = amend(
        "vimg",
        &luks_opts(&img, "sec0"),
        "state=active,new-secret=sec1,keyslot=1,iter-time=10",
        false,
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    let head = fs::read(&img).unwrap()[..4096].to_vec();
    let o = amend(
        "vimg",
        &luks_opts(&img, "sec1"),
        "state=inactive,keyslot=0",
        false,
    );
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(!io_opens(&img, "luks", "sec0", "read 0 512"));
    patch(&img, 0, &head);
    assert!(!io_opens(&img, "luks", "sec0", "read 0 512"));
    assert!(io_opens(&img, "luks", "sec1", "read -P 0x5a 0 64k"));
}

fn resize(prog: &str, img: &Path, extra: &[&str], size: &str) -> Output {
    let mut args = vec!["resize".to_string()];
    args.extend(objects());
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--image-opts".into(), luks_opts(img, "sec0"), size.into()]);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    match prog {
        "vimg" => vimg_raw(&a),
        _ => run_cmd("qemu-img", &a),
    }
}

#[test]
fn resize_matches_qemu() {
    if !qemu_available("resize_matches_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_luks(dir.path(), "r.luks");
    let mine = dir.path().join("mine.luks");
    let theirs = dir.path().join("theirs.luks");
    fs::copy(&base, &mine).unwrap();
    fs::copy(&base, &theirs).unwrap();
    for (extra, size) in [
        (&[][..], "+1M"),
        (&[][..], "-512K"),
        (&["--shrink"][..], "-512K"),
        (&["--preallocation=full"][..], "+64K"),
        (&[][..], "8M"),
    ] {
        let q = resize("qemu-img", &theirs, extra, size);
        let v = resize("vimg", &mine, extra, size);
        let what = format!("resize {extra:?} {size}");
        assert_eq!(
            v.status.code(),
            q.status.code(),
            "{what}: {}",
            stderr_of(&v)
        );
        assert_eq!(stderr_of(&v), stderr_of(&q), "{what}");
        assert_eq!(v.stdout, q.stdout, "{what}");
        assert_eq!(size_of(&mine), size_of(&theirs), "{what}");
        assert!(
            io_opens(&mine, "luks", "sec0", "read -P 0x5a 0 64k"),
            "{what}"
        );
    }
    assert_eq!(slots(&mine, "luks"), slots(&theirs, "luks"));
}

#[test]
fn killed_amend_leaves_openable_slots() {
    if !qemu_available("killed_amend_leaves_openable_slots") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_luks(dir.path(), "k.luks");
    let img = dir.path().join("kill.luks");
    let args = |img: &Path, key: &str, o: &str| -> Vec<String> {
        let mut a = vec!["amend".to_string()];
        a.extend(objects());
        a.extend([
            "--image-opts".into(),
            luks_opts(img, key),
            "-o".into(),
            o.into(),
        ]);
        a
    };
    // Adding sec1: killed before each write or flush, the image opens with sec0, and sec1
    // opens exactly when slot 1 is enabled.
    let mut n = 0;
    loop {
        fs::copy(&base, &img).unwrap();
        let a = args(&img, "sec0", "state=active,new-secret=sec1,iter-time=10");
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        let killed = common::kill::run_killed(&a, n);
        assert!(
            io_opens(&img, "luks", "sec0", "read -P 0x5a 0 64k"),
            "add, kill {n}"
        );
        let on = slots(&img, "luks")[1];
        assert_eq!(
            io_opens(&img, "luks", "sec1", "read -P 0x5a 0 64k"),
            on,
            "add, kill {n}"
        );
        if !killed {
            assert!(on);
            break;
        }
        n += 1;
    }
    assert!(n >= 6, "the add made {n} writes and flushes");
    // Erasing sec0 (slot 0): sec1 always opens; sec0 opens exactly while slot 0 is enabled.
    let added = dir.path().join("added.luks");
    fs::copy(&img, &added).unwrap();
    let mut n = 0;
    loop {
        fs::copy(&added, &img).unwrap();
        let a = args(&img, "sec1", "state=inactive,old-secret=sec0");
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        let killed = common::kill::run_killed(&a, n);
        assert!(
            io_opens(&img, "luks", "sec1", "read -P 0x5a 0 64k"),
            "erase, kill {n}"
        );
        let on = slots(&img, "luks")[0];
        assert_eq!(
            io_opens(&img, "luks", "sec0", "read 0 512"),
            on,
            "erase, kill {n}"
        );
        if !killed {
            assert!(!on);
            break;
        }
        n += 1;
    }
}

/// A 4 MiB qcow2 source: data, a zero run, data ending inside a sector, data at the end.
fn convert_source(dir: &Path) -> PathBuf {
    let src = dir.join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&src), "4M"]);
    let io = |c: &str| {
        let o = run_cmd("qemu-io", &["-f", "qcow2", "-c", c, s(&src)]);
        assert!(o.status.success());
    };
    io("write -P 0x11 0 1M");
    io("write -z 1M 1M");
    io("write -P 0x22 2200k 300");
    io("write -P 0x33 3M 1M");
    src
}

/// `PROG convert -n` of `src` into the volume `img` named by `--target-image-opts` with
/// key `key`.
fn convert_n(prog: &str, src: &Path, img: &Path, key: &str) -> Output {
    let mut args = vec!["convert".to_string(), "-n".into()];
    args.extend(objects());
    args.extend([
        "--target-image-opts".into(),
        s(src).into(),
        luks_opts(img, key),
    ]);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    match prog {
        "vimg" => vimg_raw(&a),
        _ => run_cmd("qemu-img", &a),
    }
}

/// `qemu-img compare` of `src` with the volume `img` opened with `key`: its exit code.
fn compare_with_key(src: &Path, img: &Path, key: &str) -> i32 {
    let mut args = vec!["compare".to_string()];
    args.extend(objects());
    args.extend([
        "--image-opts".into(),
        format!("driver=qcow2,file.filename={}", s(src)),
        luks_opts(img, key),
    ]);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    run_cmd("qemu-img", &a).status.code().unwrap_or(-1)
}

/// The decrypted payload of `img` (key sec0), by qemu-img.
fn payload(img: &Path) -> Vec<u8> {
    let raw = img.with_extension("payload.raw");
    let _ = fs::remove_file(&raw);
    let mut args = vec!["convert".to_string()];
    args.extend(objects());
    args.extend([
        "--image-opts".into(),
        luks_opts(img, "sec0"),
        "-O".into(),
        "raw".into(),
        s(&raw).into(),
    ]);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    assert!(run_cmd("qemu-img", &a).status.success());
    let v = fs::read(&raw).unwrap();
    let _ = fs::remove_file(&raw);
    v
}

#[test]
fn convert_n_into_luks_matches_qemu() {
    if !qemu_available("convert_n_into_luks_matches_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = convert_source(dir.path());
    let base = qemu_luks(dir.path(), "base.luks");
    let mine = dir.path().join("mine.luks");
    let theirs = dir.path().join("theirs.luks");
    fs::copy(&base, &mine).unwrap();
    fs::copy(&base, &theirs).unwrap();
    let o = convert_n("vimg", &src, &mine, "sec0");
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(convert_n("qemu-img", &src, &theirs, "sec0")
        .status
        .success());
    // Same key, same IVs: the same ciphertext, byte for byte, zero runs included.
    assert!(fs::read(&mine).unwrap() == fs::read(&theirs).unwrap());
    assert_eq!(compare_with_key(&src, &mine, "sec0"), 0);
    // A json: target with -O luks, as qemu-img accepts it.
    fs::copy(&base, &mine).unwrap();
    let json = format!(
        "json:{{\"driver\":\"luks\",\"key-secret\":\"sec0\",\"file\":{{\"filename\":\"{}\"}}}}",
        s(&mine)
    );
    let mut args = vec!["convert".to_string(), "-n".into()];
    args.extend(objects());
    args.extend(["-O".into(), "luks".into(), s(&src).into(), json]);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = vimg_raw(&a);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(fs::read(&mine).unwrap() == fs::read(&theirs).unwrap());
    // A source smaller than the volume, of a size that ends inside a sector: the sector is
    // read, patched and rewritten; the rest of the volume is left as it was.
    let odd = dir.path().join("odd.raw");
    let data: Vec<u8> = (0..(1 << 20) + 100).map(|i| (i % 251) as u8 + 1).collect();
    fs::write(&odd, &data).unwrap();
    fs::copy(&base, &mine).unwrap();
    fs::copy(&base, &theirs).unwrap();
    for (prog, img) in [("vimg", &mine), ("qemu-img", &theirs)] {
        let mut args = vec!["convert".to_string(), "-n".into()];
        args.extend(objects());
        args.extend([
            "--target-image-opts".into(),
            s(&odd).into(),
            luks_opts(img, "sec0"),
        ]);
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let o = match prog {
            "vimg" => vimg_raw(&a),
            _ => run_cmd("qemu-img", &a),
        };
        assert!(o.status.success(), "{prog}: {}", stderr_of(&o));
    }
    assert!(fs::read(&mine).unwrap() == fs::read(&theirs).unwrap());
    let (old, new) = (payload(&base), payload(&mine));
    assert_eq!(&new[..data.len()], &data[..]);
    assert_eq!(&new[2 << 20..], &old[2 << 20..]);
}

#[test]
fn convert_n_into_luks_refusals_as_qemu() {
    if !qemu_available("convert_n_into_luks_refusals_as_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = convert_source(dir.path());
    let base = qemu_luks(dir.path(), "base.luks");
    let img = dir.path().join("mine.luks");
    fs::copy(&base, &img).unwrap();
    let before = fs::read(&img).unwrap();
    let big = dir.path().join("big.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&big), "5M"]);
    let objs = objects();
    let o: Vec<&str> = objs.iter().map(|s| s.as_str()).collect();
    let opts_nokey = format!("driver=luks,file.filename={}", s(&img));
    let opts = luks_opts(&img, "sec0");
    let wrong = luks_opts(&img, "sec1");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["convert", "-n", "-O", "luks", s(&src), s(&img)],
            "Parameter 'key-secret' is required for cipher",
        ),
        (
            [
                &["convert", "-n"][..],
                &o,
                &["--target-image-opts", s(&src), &opts_nokey],
            ]
            .concat(),
            "Parameter 'key-secret' is required for cipher",
        ),
        (
            [
                &["convert", "-n"][..],
                &o,
                &["--target-image-opts", s(&src), &wrong],
            ]
            .concat(),
            "Invalid password, cannot unlock any keyslot",
        ),
        (
            [
                &["convert", "-n"][..],
                &o,
                &["--target-image-opts", s(&big), &opts],
            ]
            .concat(),
            "output file is smaller than input file",
        ),
        (
            [
                &["convert", "-n"][..],
                &o,
                &["-O", "luks", "-o", "key-secret=sec0", s(&src), s(&img)],
            ]
            .concat(),
            "-o has no effect when skipping image creation",
        ),
    ];
    for (args, reason) in cases {
        for prog in ["vimg", "qemu-img"] {
            let out = match prog {
                "vimg" => vimg_raw(&args),
                _ => run_cmd("qemu-img", &args),
            };
            assert_eq!(out.status.code(), Some(1), "{prog} {args:?}");
            let e = stderr_of(&out);
            assert!(e.contains(reason), "{prog} {args:?}: {e}");
            assert!(fs::read(&img).unwrap() == before, "{prog} {args:?} wrote");
        }
    }
}

#[test]
fn killed_convert_n_into_luks_leaves_old_or_new_sectors() {
    if !qemu_available("killed_convert_n_into_luks_leaves_old_or_new_sectors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = convert_source(dir.path());
    let base = qemu_luks(dir.path(), "base.luks");
    let old = payload(&base);
    let new = common::kill::guest(&src, "qcow2");
    let img = dir.path().join("kill.luks");
    let mut args = vec!["convert".to_string(), "-n".into()];
    args.extend(objects());
    args.extend([
        "--target-image-opts".into(),
        s(&src).into(),
        luks_opts(&img, "sec0"),
    ]);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let mut n = 0;
    loop {
        fs::copy(&base, &img).unwrap();
        let killed = common::kill::run_killed(&a, n);
        let got = payload(&img);
        common::kill::assert_old_or_new(&got, &old, &new, 512, &format!("kill {n}"));
        if !killed {
            assert_eq!(compare_with_key(&src, &img, "sec0"), 0);
            break;
        }
        // A rerun completes.
        let o = vimg_raw(&a);
        assert!(
            o.status.success(),
            "rerun after kill {n}: {}",
            stderr_of(&o)
        );
        assert_eq!(
            compare_with_key(&src, &img, "sec0"),
            0,
            "rerun after kill {n}"
        );
        n += 1;
    }
    assert!(n >= 4, "the convert made {n} writes and flushes");
}

//! The trusted command line and the untrusted image (issues 14 and 18, docs/security.md):
//! - names the user typed (`-b`, `-B`, `-o backing_file=`, `-o data_file=`) are used as given;
//! - a name read from an image is judged by where it resolves: inside the image's folder (an
//!   absolute spelling too), under a folder the operator trusts (`--allow-external=DIR`,
//!   `$VIMG_ALLOW_EXTERNAL`, the system list), or anywhere when invoked as `qemu-img`;
//! - a refusal reveals nothing about the host: the same text, apart from the name as the
//!   image spelled it (control characters escaped), whatever the name leads to or whether
//!   anything is there.

mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// Runs vimg (or `bin`) in `cwd` with no trust from the environment or the system list
/// unless `env` adds it.
fn run_in(bin: &Path, cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(bin);
    c.args(args)
        .current_dir(cwd)
        .env_remove("VIMG_ALLOW_EXTERNAL")
        .env(
            "VIMG_ALLOW_EXTERNAL_CONFIG",
            "/nonexistent/vimg-allow-external",
        );
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Nova's layout: `instances/_base/base` (raw data, as qcow2) and `instances/uuid/disk`, a
/// qcow2 overlay naming the base by absolute path. Returns (root, disk, expected raw bytes).
fn nova(root: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let base_dir = root.join("instances/_base");
    fs::create_dir_all(&base_dir).unwrap();
    fs::create_dir_all(root.join("instances/uuid")).unwrap();
    let data = pattern(1 << 20, 7);
    let raw = root.join("data.raw");
    write_sparse_raw(&raw, 2 << 20, &[(0, &data)]);
    let base = base_dir.join("base.qcow2");
    vimg(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&base)]);
    let disk = root.join("instances/uuid/disk");
    vimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&disk),
    ]);
    (base_dir, disk, fs::read(&raw).unwrap())
}

fn convert_to_raw(
    bin: &Path,
    cwd: &Path,
    env: &[(&str, &str)],
    extra: &[&str],
    src: &Path,
) -> Output {
    let out = cwd.join("out.raw");
    let _ = fs::remove_file(&out);
    let mut args = vec!["convert"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-O", "raw", s(src), s(&out)]);
    run_in(bin, cwd, env, &args)
}

#[test]
fn nova_layout_needs_scoped_trust() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let (base_dir, disk, want) = nova(root);
    let v = vimg_bin();
    // Refused by default, and nothing is left behind.
    let o = convert_to_raw(&v, root, &[], &[], &disk);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.starts_with("vimg: "), "{e}");
    assert!(
        e.contains("does not resolve to a file inside the image's folder"),
        "{e}"
    );
    assert!(!root.join("out.raw").exists());
    // Nova's own snapshot command line, refused the same way.
    let snap = root.join("snap.qcow2");
    let o = run_in(
        &v,
        root,
        &[],
        &["convert", "-f", "qcow2", "-O", "qcow2", s(&disk), s(&snap)],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(!snap.exists());

    let dir_flag = format!("--allow-external={}", base_dir.display());
    let check = |o: Output, how: &str| {
        ok(&o);
        assert_eq!(fs::read(root.join("out.raw")).unwrap(), want, "{how}");
    };
    check(
        convert_to_raw(&v, root, &[], &[&dir_flag], &disk),
        "--allow-external=DIR",
    );
    // A relative DIR, and DIR repeated with an unrelated folder first.
    let o = convert_to_raw(
        &v,
        root,
        &[],
        &[
            "--allow-external=instances/uuid",
            "--allow-external=instances/_base",
        ],
        &disk,
    );
    check(o, "relative, repeated");
    // The environment variable (colon-separated; a missing folder is skipped).
    let env_val = format!("/nonexistent:{}", base_dir.display());
    check(
        convert_to_raw(&v, root, &[("VIMG_ALLOW_EXTERNAL", &env_val)], &[], &disk),
        "VIMG_ALLOW_EXTERNAL",
    );
    // The system list.
    let conf = root.join("allow-external");
    fs::write(
        &conf,
        format!("# Nova\n\n{}  # base images\n", base_dir.display()),
    )
    .unwrap();
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o644)).unwrap();
    let conf_env = [("VIMG_ALLOW_EXTERNAL_CONFIG", s(&conf))];
    check(
        convert_to_raw(&v, root, &conf_env, &[], &disk),
        "config file",
    );
    // ... ignored, with a warning, when others may write it.
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o666)).unwrap();
    let o = convert_to_raw(&v, root, &conf_env, &[], &disk);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("warning: ignoring"), "{}", stderr(&o));
    // Bare --allow-external still trusts everything.
    check(
        convert_to_raw(&v, root, &[], &["--allow-external"], &disk),
        "bare flag",
    );
    // Trusting one folder does not trust its neighbours.
    let other = root.join("instances/other");
    fs::create_dir_all(&other).unwrap();
    let o = convert_to_raw(
        &v,
        root,
        &[],
        &[&format!("--allow-external={}", other.display())],
        &disk,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("or an allowed folder"),
        "{}",
        stderr(&o)
    );
    // A folder given on the command line must exist.
    let o = convert_to_raw(&v, root, &[], &["--allow-external=no/such/dir"], &disk);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a folder"), "{}", stderr(&o));
}

#[test]
fn invoked_as_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let (_, disk, want) = nova(root);
    let bin = root.join("bin");
    fs::create_dir(&bin).unwrap();
    let q = bin.join("qemu-img");
    symlink(vimg_bin(), &q).unwrap();
    // qemu-img's open semantics: the absolute name is followed.
    ok(&convert_to_raw(&q, root, &[], &[], &disk));
    assert_eq!(fs::read(root.join("out.raw")).unwrap(), want);
    // Nova's snapshot command line as it is.
    let snap = root.join("snap.qcow2");
    ok(&run_in(
        &q,
        root,
        &[],
        &["convert", "-f", "qcow2", "-O", "qcow2", s(&disk), s(&snap)],
    ));
    // qemu-img's message prefix.
    let o = run_in(&q, root, &[], &["info", "no-such-image"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("qemu-img: "), "{}", stderr(&o));
    // --version: qemu-img's first line, as version-parsing callers read it, then vimg's.
    for flag in ["--version", "-V"] {
        let out = ok(&run_in(&q, root, &[], &[flag]));
        let mut lines = out.lines();
        let first = lines.next().unwrap();
        let rest = first.strip_prefix("qemu-img version ").expect(first);
        let ver = rest.split(' ').next().unwrap();
        let parts: Vec<u32> = ver.split('.').map(|p| p.parse().unwrap()).collect();
        assert_eq!(parts.len(), 3, "{first}");
        assert!(parts[0] >= 10, "{first}");
        assert!(
            out.contains(&format!("vimg {}", env!("CARGO_PKG_VERSION"))),
            "{out}"
        );
    }
    // Under its own name the same binary stays safe.
    let o = convert_to_raw(&vimg_bin(), root, &[], &[], &disk);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).starts_with("vimg: "));
}

/// Builds `dir/img.qcow2` naming `name` as its raw backing file, with vimg's own `create`
/// (the user's command line: used as given, never opened).
fn image_naming(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join("img.qcow2");
    let _ = fs::remove_file(&img);
    vimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        name,
        "-F",
        "raw",
        s(&img),
        "1M",
    ]);
    img
}

/// The `gate` verdict `info --output=json` gives the image's first reference.
fn gate_field(cwd: &Path, img: &Path) -> String {
    let o = run_in(&vimg_bin(), cwd, &[], &["info", "--output=json", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    v["image-service"]["references"][0]["gate"]
        .as_str()
        .unwrap_or_else(|| panic!("no gate field: {v}"))
        .to_string()
}

#[test]
fn refusals_reveal_nothing_about_the_host() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let folder = root.join("images");
    let work = root.join("work");
    fs::create_dir_all(&folder).unwrap();
    fs::create_dir_all(&work).unwrap();
    fs::write(root.join("secret.raw"), vec![0x5e; 4096]).unwrap();
    symlink(root.join("secret.raw"), folder.join("to-secret")).unwrap();
    symlink(root.join("missing.raw"), folder.join("to-missing")).unwrap();
    let up = "../../../../../../../../../../../../../../..";
    let names = [
        format!("{up}/proc/self/cwd"),
        format!("{up}/proc/self/exe"),
        format!("{up}/proc/self/fd/0"),
        format!("{up}/proc/self/root/etc/shadow"),
        format!("{up}/etc/shadow"),
        format!("{up}/etc/no-such-file"),
        "/proc/self/cwd".into(),
        "/proc/self/fd/0".into(),
        "/etc/shadow".into(),
        "/etc/passwd".into(),
        "/etc/no-such-file".into(),
        "/no-such-dir/x".into(),
        s(&root.join("secret.raw")).into(),
        s(&root.join("missing.raw")).into(),
        "../secret.raw".into(),
        "../missing.raw".into(),
        "to-secret".into(),
        "to-missing".into(),
        "sub\\..\\..\\x".into(),
        "C:\\Windows\\x.vhd".into(),
    ];
    let v = vimg_bin();
    let cwd = s(&work).to_string();
    let exe = vimg_bin().display().to_string();
    let (mut errors, mut gates) = (Vec::new(), Vec::new());
    for n in &names {
        let img = image_naming(&folder, n);
        let o = convert_to_raw(&v, &work, &[], &[], &img);
        assert_eq!(o.status.code(), Some(1), "{n}");
        let e = stderr(&o);
        let g = gate_field(&work, &img);
        for text in [&e, &g] {
            for leak in [cwd.as_str(), exe.as_str(), "/dev/", "pipe:", "No such file"] {
                assert!(!text.contains(leak), "{n}: leaks {leak:?}: {text}");
            }
        }
        let spelled = n.replace('\\', "\\\\");
        errors.push(e.replace(&spelled, "NAME"));
        gates.push(g.replace(&spelled, "NAME"));
    }
    for (i, n) in names.iter().enumerate() {
        assert_eq!(
            errors[i], errors[0],
            "error for {n} differs from {}",
            names[0]
        );
        assert_eq!(gates[i], gates[0], "gate for {n} differs from {}", names[0]);
    }
    // A missing file whose place is inside the folder may be reported as missing.
    let img = image_naming(&folder, "base.raw");
    let e = stderr(&convert_to_raw(&v, &work, &[], &[], &img));
    assert!(
        e.contains("cannot be opened: No such file or directory"),
        "{e}"
    );
    assert!(!e.contains("os error"), "{e}");
}

#[test]
fn control_characters_in_names_are_escaped() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    for name in ["/etc/\x1b[2Kall good\r.raw", "x\x07\x1b]0;title\x07.raw"] {
        let img = image_naming(root, name);
        let o = convert_to_raw(&vimg_bin(), root, &[], &[], &img);
        assert_eq!(o.status.code(), Some(1));
        let e = stderr(&o);
        assert!(!e.trim_end().chars().any(|c| c.is_control()), "{e:?}");
        assert!(e.contains("\\x1b"), "{e}");
        let g = gate_field(root, &img);
        assert!(!g.chars().any(|c| c.is_control()), "{g:?}");
    }
}

#[test]
fn absolute_names_inside_the_folder_pass() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let folder = root.join("images");
    fs::create_dir_all(folder.join("sub")).unwrap();
    let data = pattern(1 << 20, 3);
    write_sparse_raw(&folder.join("sub/base.raw"), 1 << 20, &[(0, &data)]);
    // Spelled absolutely, through a symlinked folder, and with `..` that comes back.
    symlink(&folder, root.join("alias")).unwrap();
    for name in [
        s(&folder.join("sub/base.raw")).to_string(),
        s(&root.join("alias/sub/base.raw")).to_string(),
        s(&folder.join("sub/../sub/base.raw")).to_string(),
        "sub/../sub/base.raw".to_string(),
    ] {
        let img = image_naming(&folder, &name);
        let o = convert_to_raw(&vimg_bin(), root, &[], &[], &img);
        ok(&o);
        assert_eq!(fs::read(root.join("out.raw")).unwrap(), data, "{name}");
        assert_eq!(gate_field(root, &img), "allowed", "{name}");
    }
}

#[test]
fn hard_links_into_the_folder_need_trust() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let folder = root.join("images");
    fs::create_dir_all(&folder).unwrap();
    fs::write(root.join("secret.raw"), vec![0x5e; 1 << 20]).unwrap();
    fs::hard_link(root.join("secret.raw"), folder.join("base.raw")).unwrap();
    let img = image_naming(&folder, "base.raw");
    let o = convert_to_raw(&vimg_bin(), root, &[], &[], &img);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("2 hard links"), "{e}");
    assert!(!e.contains("secret"), "{e}");
    assert!(!root.join("out.raw").exists());
    // Trusted: by the folder, or entirely.
    let flag = format!("--allow-external={}", folder.display());
    ok(&convert_to_raw(&vimg_bin(), root, &[], &[&flag], &img));
    assert_eq!(fs::read(root.join("out.raw")).unwrap(), vec![0x5e; 1 << 20]);
    ok(&convert_to_raw(
        &vimg_bin(),
        root,
        &[],
        &["--allow-external"],
        &img,
    ));
    // With the other name gone, the file has one link and is the folder's own.
    fs::remove_file(root.join("secret.raw")).unwrap();
    ok(&convert_to_raw(&vimg_bin(), root, &[], &[], &img));
}

#[test]
fn users_names_are_used_as_given() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let data_dir = root.join("data");
    let img_dir = root.join("img");
    fs::create_dir_all(&data_dir).unwrap();
    fs::create_dir_all(&img_dir).unwrap();
    // -o data_file= with an absolute path elsewhere: created where the user said.
    let img = img_dir.join("t.qcow2");
    let df = data_dir.join("t.data");
    let opt = format!("data_file={}", df.display());
    ok(&run_in(
        &vimg_bin(),
        root,
        &[],
        &["create", "-q", "-f", "qcow2", "-o", &opt, s(&img), "1M"],
    ));
    assert_eq!(fs::metadata(&df).unwrap().len(), 1 << 20);
    // Reading it back is judged like any name from an image: outside, so it needs trust.
    let o = convert_to_raw(&vimg_bin(), root, &[], &[], &img);
    assert_eq!(o.status.code(), Some(1));
    let flag = format!("--allow-external={}", data_dir.display());
    ok(&convert_to_raw(&vimg_bin(), root, &[], &[&flag], &img));
    // -b with an absolute path outside the folder: the user's, written as given.
    let base = data_dir.join("b.qcow2");
    vimg(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    let top = img_dir.join("top.qcow2");
    ok(&run_in(
        &vimg_bin(),
        root,
        &[],
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "qcow2",
            s(&top),
        ],
    ));
    let info = ok(&run_in(
        &vimg_bin(),
        root,
        &[],
        &["info", "--output=json", s(&top)],
    ));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["backing-filename"], s(&base));
    assert_eq!(v["virtual-size"], 1 << 20);
}

/// iotests build chains with absolute names inside one folder (`$TEST_DIR/t.qcow2.base`):
/// they work without any flag, and read as qemu-img reads them.
#[test]
fn iotest_style_absolute_chains() {
    if !qemu_available("iotest_style_absolute_chains") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let t = d.path();
    let base = t.join("t.qcow2.base");
    let mid = t.join("t.qcow2.mid");
    let top = t.join("t.qcow2");
    vimg(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    vimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&mid),
    ]);
    vimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&mid),
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io("qcow2", &base, &["write -P 0x11 0 1M"]);
    qemu_io("qcow2", &mid, &["write -P 0x22 1M 1M"]);
    qemu_io("qcow2", &top, &["write -P 0x33 2M 64k"]);
    for img in [&base, &mid, &top] {
        qemu_img(&["check", "-q", s(img)]);
    }
    let ours = t.join("ours.raw");
    let theirs = t.join("theirs.raw");
    vimg(&["convert", "-O", "raw", s(&top), s(&ours)]);
    qemu_img(&["convert", "-O", "raw", s(&top), s(&theirs)]);
    assert_eq!(fs::read(&ours).unwrap(), fs::read(&theirs).unwrap());
    // -B with an absolute name, as iotests write it.
    let out = t.join("t.qcow2.out");
    vimg(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        s(&mid),
        "-F",
        "qcow2",
        s(&top),
        s(&out),
    ]);
    qemu_img(&["check", "-q", s(&out)]);
    qemu_img(&["compare", s(&top), s(&out)]);
    vimg(&["compare", s(&top), s(&out)]);
    let json = vimg(&["info", "--backing-chain", "--output=json", s(&top)]);
    assert!(json.contains(s(&base)), "{json}");
}

/// `file:`, `file:///`, `json:{...}` and `--image-opts` names from the user open the file they
/// name, as qemu-img opens it; inside an image the same spellings stay refused.
#[test]
fn users_protocol_names_are_read_as_qemu_reads_them() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let img = root.join("a.qcow2");
    let data = pattern(1 << 20, 5);
    let raw = root.join("a.raw");
    write_sparse_raw(&raw, 2 << 20, &[(1 << 20, &data)]);
    vimg(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&img)]);
    let want = fs::read(&raw).unwrap();
    let json_name = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}","locking":"off"}}}}"#,
        img.display()
    );
    let names: Vec<(Vec<&str>, String)> = vec![
        (vec![], format!("file:{}", img.display())),
        (vec![], format!("file://{}", img.display())),
        (vec![], "file:a.qcow2".into()),
        (vec![], json_name.clone()),
        (
            vec!["--image-opts"],
            format!("driver=qcow2,file.filename={}", img.display()),
        ),
        (
            vec!["--image-opts"],
            "driver=qcow2,file.driver=file,file.filename=a.qcow2".into(),
        ),
    ];
    for (flags, name) in &names {
        let mut args = vec!["info", "--output=json"];
        args.extend(flags.iter().copied());
        args.push(name);
        let ours: serde_json::Value =
            serde_json::from_str(&ok(&run_in(&vimg_bin(), root, &[], &args))).unwrap();
        assert_eq!(ours["format"], "qcow2", "{name}");
        assert_eq!(ours["virtual-size"], 2 << 20, "{name}");
        if have("qemu-img") {
            let q = run_in(Path::new("qemu-img"), root, &[], &args);
            let theirs: serde_json::Value = serde_json::from_str(&ok(&q)).unwrap();
            assert_eq!(ours["filename"], theirs["filename"], "{name}");
        }
        let mut conv = vec!["convert"];
        conv.extend(flags.iter().copied());
        let out = root.join("out.raw");
        conv.extend_from_slice(&["-O", "raw", name, s(&out)]);
        ok(&run_in(&vimg_bin(), root, &[], &conv));
        assert_eq!(fs::read(&out).unwrap(), want, "{name}");
    }
    // The raw driver's window, as qemu-img reads it.
    let windows = [
        format!(
            "driver=raw,offset=1M,size=512k,file.filename={}",
            raw.display()
        ),
        format!("driver=raw,offset=1536k,file.filename={}", raw.display()),
    ];
    for (i, w) in windows.iter().enumerate() {
        let out = root.join("win.raw");
        ok(&run_in(
            &vimg_bin(),
            root,
            &[],
            &["convert", "--image-opts", "-O", "raw", w, s(&out)],
        ));
        let (start, end) = if i == 0 {
            (1 << 20, 1536 << 10)
        } else {
            (1536 << 10, 2 << 20)
        };
        assert_eq!(fs::read(&out).unwrap(), want[start..end], "{w}");
    }
    for w in [
        format!("driver=raw,offset=3M,file.filename={}", raw.display()),
        format!(
            "driver=raw,offset=1M,size=2M,file.filename={}",
            raw.display()
        ),
        format!("driver=raw,size=1000,file.filename={}", raw.display()),
    ] {
        let o = run_in(&vimg_bin(), root, &[], &["info", "--image-opts", &w]);
        assert_eq!(o.status.code(), Some(1), "{w}");
        if have("qemu-img") {
            let q = run_in(
                Path::new("qemu-img"),
                root,
                &[],
                &["info", "--image-opts", &w],
            );
            assert_eq!(q.status.code(), Some(1), "{w}");
            let ours = stderr(&o);
            let theirs = String::from_utf8_lossy(&q.stderr).into_owned();
            assert_eq!(
                ours.strip_prefix("vimg"),
                theirs.strip_prefix("qemu-img"),
                "{w}"
            );
        }
    }
    // What vimg cannot honour is refused, not ignored.
    for (flags, name) in [
        (
            vec![],
            r#"json:{"driver":"qcow2","file":{"driver":"nbd","host":"h"}}"#.to_string(),
        ),
        // (encrypt.key-secret is honoured since LUKS: tests/luks.rs.)
        (vec!["-f", "raw"], json_name.clone()),
    ] {
        let mut args = vec!["info"];
        args.extend(flags.iter().copied());
        args.push(&name);
        let o = run_in(&vimg_bin(), root, &[], &args);
        assert_eq!(o.status.code(), Some(1), "{name}");
    }
    // Inside an image, the same spellings are protocol paths and refused.
    for name in [json_name.as_str(), "file:a.qcow2"] {
        let top = image_naming(root, name);
        let o = convert_to_raw(&vimg_bin(), root, &[], &["--allow-external"], &top);
        assert_eq!(o.status.code(), Some(1), "{name}");
        assert!(
            stderr(&o).contains("protocol paths in an image are refused"),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn object_secrets_are_parsed() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let img = root.join("a.qcow2");
    vimg(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    fs::write(root.join("pw"), "hunter2").unwrap();
    for obj in [
        "secret,id=sec0,data=hunter2",
        "secret,id=sec0,data=aHVudGVyMg==,format=base64",
        "secret,id=sec0,file=pw",
    ] {
        ok(&run_in(
            &vimg_bin(),
            root,
            &[],
            &["info", "--object", obj, s(&img)],
        ));
    }
    for obj in [
        "secret,id=sec0",
        "secret,data=hunter2",
        "secret,id=sec0,file=no-such-file",
        "secret,id=sec0,data=hunter2,keyid=m,iv=x",
        "throttle-group,id=t",
    ] {
        let o = run_in(&vimg_bin(), root, &[], &["info", "--object", obj, s(&img)]);
        assert_eq!(o.status.code(), Some(1), "{obj}");
        assert!(!stderr(&o).contains("hunter2"), "{}", stderr(&o));
    }
    let o = run_in(
        &vimg_bin(),
        root,
        &[],
        &[
            "info",
            "--object",
            "secret,id=a,data=x",
            "--object",
            "secret,id=a,data=y",
            s(&img),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
}

/// A deep chain that breaks says where, in one line, not one nested clause per layer.
#[test]
fn deep_chain_errors_name_the_layer() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    vimg(&["create", "-q", "-f", "qcow2", s(&root.join("l0")), "1M"]);
    for i in 1..=70 {
        let (b, t) = (format!("l{}", i - 1), root.join(format!("l{i}")));
        vimg(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &b,
            "-F",
            "qcow2",
            s(&t),
        ]);
    }
    let o = convert_to_raw(&vimg_bin(), root, &[], &[], &root.join("l70"));
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.len() < 300, "{e}");
    assert!(
        e.contains("layer 65 of the backing chain") && e.contains("longer than 64"),
        "{e}"
    );
    fs::remove_file(root.join("l30")).unwrap();
    let e = stderr(&convert_to_raw(
        &vimg_bin(),
        root,
        &[],
        &[],
        &root.join("l40"),
    ));
    assert_eq!(e.matches("Could not open backing file").count(), 1, "{e}");
    assert!(e.contains("'l30' (layer 10 of the backing chain)"), "{e}");
}

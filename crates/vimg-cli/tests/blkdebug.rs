//! QEMU's blkdebug error-injection layer and `convert --salvage` (issue 14), against
//! qemu-img as the oracle: the same names open the same way, injected errors fail the same
//! requests, salvaging writes the same bytes and warns with the same words in the same order,
//! and a name inside an image never reaches blkdebug (the gate).

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// stderr with the program's prefix made neutral, for comparing qemu-img's and vimg's.
fn err_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .map(|l| {
            l.strip_prefix("qemu-img: ")
                .or_else(|| l.strip_prefix("vimg: "))
                .unwrap_or(l)
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn sorted(t: &str) -> Vec<String> {
    let mut v: Vec<String> = t.lines().map(str::to_string).collect();
    v.sort();
    v
}

/// The offsets the warnings name, in the order printed; status before read at one offset.
fn offsets(t: &str) -> Vec<(u64, bool)> {
    t.lines()
        .map(|l| {
            let n = l
                .split("offset ")
                .nth(1)
                .unwrap()
                .split(':')
                .next()
                .unwrap();
            (n.parse().unwrap(), !l.contains("block status"))
        })
        .collect()
}

fn sorted_offsets(t: &str) -> Vec<(u64, bool)> {
    let mut v = offsets(t);
    v.sort();
    v
}

/// A 4 MiB image of `fmt` filled with a pattern, and the blkdebug json name over it with
/// status errors at `status` and read errors at `reads` (byte offsets).
fn setup(d: &Path, fmt: &str, status: &[u64], reads: &[u64]) -> String {
    let img = d.join(format!("src.{fmt}"));
    qemu_img(&["create", "-q", "-f", fmt, s(&img), "4M"]);
    qemu_io(fmt, &img, &["write -P 42 0 4M"]);
    let mut rules = Vec::new();
    for o in status {
        rules.push(format!(
            "{{'event':'none','iotype':'block-status','errno':5,'sector':{}}}",
            o / 512
        ));
    }
    for o in reads {
        rules.push(format!(
            "{{'event':'none','iotype':'read','errno':5,'sector':{}}}",
            o / 512
        ));
    }
    format!(
        "json:{{'driver':'blkdebug','image':{{'driver':'{fmt}','file':{{'driver':'file','filename':'{}'}}}},'inject-error':[{}]}}",
        s(&img),
        rules.join(",")
    )
}

#[test]
fn salvage_through_blkdebug_writes_and_warns_as_qemu_img() {
    if !qemu_available(&test_name()) {
        return;
    }
    for fmt in ["qcow2", "raw", "vmdk", "qed"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let status = [1 << 20 | 8192, 2 << 20 | 512];
        let reads = [(2 << 20) - 65536, 2 << 20 | 512, 3 << 20, 3 << 20 | 1536];
        let name = setup(d, fmt, &status, &reads);
        let (q, v) = (d.join("q.raw"), d.join("v.raw"));
        let qo = run_cmd(
            "qemu-img",
            &["convert", "--salvage", "-O", "raw", &name, s(&q)],
        );
        let vo = vimg_raw(&["convert", "--salvage", "-O", "raw", &name, s(&v)]);
        assert!(qo.status.success(), "{fmt}: {}", err_text(&qo));
        assert!(vo.status.success(), "{fmt}: {}", err_text(&vo));
        // qemu-img's coroutines may print a later chunk's warning before an earlier one's
        // retries are done; vimg prints them in guest order. The same warnings, either way.
        assert_eq!(
            sorted(&err_text(&vo)),
            sorted(&err_text(&qo)),
            "{fmt}: warnings"
        );
        // The walk before the copy warns about the status errors once, then the copy warns
        // about everything in guest order.
        let all = err_text(&vo);
        let copy_pass: Vec<&str> = all.lines().skip(status.len()).collect();
        let copy_pass = copy_pass.join("\n");
        assert_eq!(
            offsets(&copy_pass),
            sorted_offsets(&copy_pass),
            "guest order"
        );
        assert!(err_text(&vo).contains("error while reading offset 3147264: Input/output error"));
        assert_eq!(
            std::fs::read(&v).unwrap(),
            std::fs::read(&q).unwrap(),
            "{fmt}"
        );
        // The unreadable sectors are zeros, the rest the pattern.
        let data = std::fs::read(&v).unwrap();
        for r in reads {
            assert!(data[r as usize..r as usize + 512].iter().all(|&b| b == 0));
        }
        assert_eq!(data[(1 << 20) + 8192], 42, "a status error is read as data");
        // -q: salvaged silently.
        let vq = d.join("vq.raw");
        let o = vimg_raw(&["convert", "-q", "--salvage", "-O", "raw", &name, s(&vq)]);
        assert!(
            o.status.success() && o.stderr.is_empty(),
            "{}",
            err_text(&o)
        );
        assert_eq!(std::fs::read(&vq).unwrap(), data);
    }
}

#[test]
fn salvage_into_qcow2_reads_back_identically_and_checks_clean() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let name = setup(d, "qcow2", &[65536], &[0, 70000, 1 << 20]);
    let (q, v) = (d.join("q.qcow2"), d.join("v.qcow2"));
    let qo = run_cmd(
        "qemu-img",
        &["convert", "--salvage", "-O", "qcow2", &name, s(&q)],
    );
    let vo = vimg_raw(&["convert", "--salvage", "-O", "qcow2", &name, s(&v)]);
    assert!(
        qo.status.success() && vo.status.success(),
        "{}",
        err_text(&vo)
    );
    assert_eq!(err_text(&vo), err_text(&qo));
    qemu_img(&["check", s(&v)]);
    let o = run_cmd("qemu-img", &["compare", s(&q), s(&v)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn without_salvage_a_read_error_fails_and_leaves_nothing() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let name = setup(d, "qcow2", &[], &[1 << 20]);
    let (q, v) = (d.join("q.raw"), d.join("v.raw"));
    let qo = run_cmd("qemu-img", &["convert", "-O", "raw", &name, s(&q)]);
    let vo = vimg_raw(&["convert", "-O", "raw", &name, s(&v)]);
    assert!(!qo.status.success());
    assert_eq!(vo.status.code(), Some(1), "{}", err_text(&vo));
    assert!(
        err_text(&vo).contains("Input/output error"),
        "{}",
        err_text(&vo)
    );
    assert!(!v.exists(), "a failed convert leaves no output");
    // A status error without --salvage fails too.
    let name = setup(d, "raw", &[4096], &[]);
    let vo = vimg_raw(&["convert", "-O", "raw", &name, s(&v)]);
    assert_eq!(vo.status.code(), Some(1));
    assert!(!v.exists());
}

#[test]
fn compare_reports_an_injected_read_error_as_qemu_img() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = d.join("a.qcow2");
    let b = d.join("b.qcow2");
    let empty = d.join("e.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&a), "64M"]);
    std::fs::copy(&a, &b).unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", s(&empty), "0"]);
    qemu_io("qcow2", &a, &["write -P 102 512 512"]);
    let conf = d.join("bd.conf");
    std::fs::write(
        &conf,
        "# iotest 074's rule\n[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nonce =\"off\"\n",
    )
    .unwrap();
    let name = format!("blkdebug:{}:{}", s(&conf), s(&a));
    for other in [&b, &empty] {
        let qo = run_cmd("qemu-img", &["compare", &name, s(other)]);
        let vo = vimg_raw(&["compare", &name, s(other)]);
        assert_eq!(vo.status.code(), Some(4));
        assert_eq!(vo.status.code(), qo.status.code());
        assert_eq!(err_text(&vo), err_text(&qo));
        assert_eq!(vo.stdout, qo.stdout);
        assert!(err_text(&vo).starts_with(&format!("Error while reading offset 0 of {name}:")));
    }
    // Without the rule (`blkdebug::FILE`) the layer passes everything through.
    let plain = format!("blkdebug::{}", s(&a));
    let vo = vimg_raw(&["compare", &plain, s(&a)]);
    assert_eq!(vo.status.code(), Some(0), "{}", err_text(&vo));
}

#[test]
fn once_and_states_and_image_opts_behave_as_in_qemu() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    qemu_io("qcow2", &img, &["write -P 7 0 4M"]);
    let cases = [
        // once: the first data read fails; salvaging retries per sector and all succeed.
        format!(
            "json:{{'driver':'qcow2','file':{{'driver':'blkdebug','image':{{'driver':'file','filename':'{}'}},'inject-error':[{{'event':'read_aio','once':true}}]}}}}",
            s(&img)
        ),
        // A state set by the first data read arms a rule waiting in that state.
        format!(
            "json:{{'driver':'qcow2','file':{{'driver':'blkdebug','image':{{'driver':'file','filename':'{}'}},\
             'inject-error':[{{'event':'read_aio','state':2,'errno':28,'once':true}}],\
             'set-state':[{{'event':'read_aio','state':1,'new_state':2}}]}}}}",
            s(&img)
        ),
    ];
    for (i, name) in cases.iter().enumerate() {
        for salvage in [false, true] {
            let (q, v) = (d.join(format!("q{i}.raw")), d.join(format!("v{i}.raw")));
            let mut args = vec!["convert", "-O", "raw"];
            if salvage {
                args.push("--salvage");
            }
            args.push(name);
            let mut qa = args.clone();
            qa.push(s(&q));
            let mut va = args.clone();
            va.push(s(&v));
            let qo = run_cmd("qemu-img", &qa);
            let vo = vimg_raw(&va);
            assert_eq!(
                vo.status.success(),
                qo.status.success(),
                "case {i} salvage {salvage}: {} / {}",
                err_text(&vo),
                err_text(&qo)
            );
            if salvage {
                assert_eq!(err_text(&vo), err_text(&qo), "case {i}");
                assert_eq!(std::fs::read(&v).unwrap(), std::fs::read(&q).unwrap());
            }
            let _ = std::fs::remove_file(&q);
            let _ = std::fs::remove_file(&v);
        }
    }
    // --image-opts spelling of a file-level layer.
    let opts = format!(
        "driver=qcow2,file.driver=blkdebug,file.image.driver=file,file.image.filename={}",
        s(&img)
    );
    let v = d.join("opts.raw");
    vimg(&["convert", "--image-opts", "-O", "raw", &opts, s(&v)]);
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&v), s(&img)]);
}

#[test]
fn bad_blkdebug_names_and_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("a.raw");
    std::fs::write(&img, vec![1u8; 65536]).unwrap();
    let conf = d.join("bad.conf");
    std::fs::write(&conf, "[inject-error]\nevent = read_aio\n").unwrap();
    let bad = [
        "blkdebug:nocolon".to_string(),
        format!("blkdebug:{}:{}", s(&conf), s(&img)),
        format!("blkdebug:{}/missing.conf:{}", s(d), s(&img)),
        format!(
            "json:{{'driver':'blkdebug','image':{{'driver':'file','filename':'{}'}},'inject-error':[{{'event':'nosuch'}}]}}",
            s(&img)
        ),
        format!(
            "json:{{'driver':'blkdebug','align':3,'image':{{'driver':'file','filename':'{}'}}}}",
            s(&img)
        ),
    ];
    for name in &bad {
        let o = vimg_raw(&["info", name]);
        assert!(!o.status.success(), "{name} opened");
    }
}

#[test]
fn a_backing_name_that_says_blkdebug_goes_through_the_gate() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    std::fs::write(&base, vec![9u8; 1 << 20]).unwrap();
    let top = d.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "blkdebug::base.raw",
        "-F",
        "raw",
        s(&top),
        "1M",
    ]);
    let o = vimg_raw(&["convert", "-O", "raw", s(&top), s(&d.join("out.raw"))]);
    assert!(!o.status.success(), "a blkdebug backing name was followed");
    assert!(!d.join("out.raw").exists());
    assert!(
        err_text(&o).contains("blkdebug::base.raw"),
        "{}",
        err_text(&o)
    );
}

/// A source whose reads really fail: a device-mapper `error` target in the middle of a loop
/// device. Needs root and device-mapper; skipped visibly where they are not there.
#[test]
fn salvage_a_device_with_unreadable_sectors() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let backing = d.join("dm.img");
    std::fs::write(&backing, vec![0x5au8; 4 << 20]).unwrap();
    let lo = run_cmd("losetup", &["-f", "--show", s(&backing)]);
    if !lo.status.success() {
        skipped_line(format_args!(
            "SKIPPED {}: no loop device ({})",
            test_name(),
            String::from_utf8_lossy(&lo.stderr).trim()
        ));
        return;
    }
    let dev = String::from_utf8_lossy(&lo.stdout).trim().to_string();
    let name = format!("vimg-blk-test-{}", std::process::id());
    let table = format!("0 2048 linear {dev} 0\n2048 8 error\n2056 6136 linear {dev} 2056\n");
    let mut child = std::process::Command::new("dmsetup")
        .args(["create", &name])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let created = match &mut child {
        Ok(c) => {
            use std::io::Write;
            if let Some(mut i) = c.stdin.take() {
                let _ = i.write_all(table.as_bytes());
            }
            c.wait().map(|s| s.success()).unwrap_or(false)
        }
        Err(_) => false,
    };
    if !created {
        let _ = run_cmd("losetup", &["-d", &dev]);
        skipped_line(format_args!(
            "SKIPPED {}: device-mapper not available here",
            test_name()
        ));
        return;
    }
    let mapped = format!("/dev/mapper/{name}");
    let (q, v) = (d.join("q.raw"), d.join("v.raw"));
    let qo = run_cmd(
        "qemu-img",
        &[
            "convert",
            "--salvage",
            "-f",
            "raw",
            "-O",
            "raw",
            &mapped,
            s(&q),
        ],
    );
    let vo = vimg_raw(&[
        "convert",
        "--salvage",
        "-f",
        "raw",
        "-O",
        "raw",
        &mapped,
        s(&v),
    ]);
    let plain = vimg_raw(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &mapped,
        s(&d.join("p.raw")),
    ]);
    let _ = run_cmd("dmsetup", &["remove", &name]);
    let _ = run_cmd("losetup", &["-d", &dev]);
    assert!(vo.status.success(), "{}", err_text(&vo));
    assert_eq!(err_text(&vo), err_text(&qo));
    assert_eq!(std::fs::read(&v).unwrap(), std::fs::read(&q).unwrap());
    assert!(!plain.status.success());
}

#[test]
fn in_place_commands_write_through_a_layer_without_rules_and_refuse_unfired_events() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    let top = d.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io("qcow2", &top, &["write -P 3 64k 64k"]);
    let conf = d.join("c.conf");
    // l2_load is not among the events vimg's updater fires (blkdebug_writes.rs tests those).
    std::fs::write(&conf, "[inject-error]\nevent = \"l2_load\"\n").unwrap();
    let before = std::fs::read(&top).unwrap();
    let o = vimg_raw(&["commit", &format!("blkdebug:{}:{}", s(&conf), s(&top))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err_text(&o).contains("blkdebug"), "{}", err_text(&o));
    assert_eq!(std::fs::read(&top).unwrap(), before, "nothing written");
    vimg(&["commit", &format!("blkdebug::{}", s(&top))]);
    qemu_img(&["check", s(&base)]);
    let o = run_cmd(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 3 64k 64k", s(&base)],
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("read 65536/65536"));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed"));
}

#[test]
fn salvage_of_host_sectors_under_a_format_warns_at_guest_offsets() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("g.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    qemu_io("qcow2", &img, &["write -P 9 0 4M"]);
    // Host sectors 650 and 2000 hold guest data (the data clusters start at host 0x50000).
    let name = format!(
        "json:{{'driver':'qcow2','file':{{'driver':'blkdebug','image':{{'driver':'file','filename':'{}'}},\
         'inject-error':[{{'event':'none','iotype':'read','sector':650}},{{'event':'none','iotype':'read','sector':2000}}]}}}}",
        s(&img)
    );
    let (q, v) = (d.join("q.raw"), d.join("v.raw"));
    let qo = run_cmd(
        "qemu-img",
        &["convert", "--salvage", "-O", "raw", &name, s(&q)],
    );
    let vo = vimg_raw(&["convert", "--salvage", "-O", "raw", &name, s(&v)]);
    assert!(
        qo.status.success() && vo.status.success(),
        "{}",
        err_text(&vo)
    );
    assert_eq!(err_text(&vo), err_text(&qo));
    assert_eq!(err_text(&vo).lines().count(), 2);
    assert_eq!(std::fs::read(&v).unwrap(), std::fs::read(&q).unwrap());
    // info says what it cannot describe instead of calling a layer above an image raw.
    let above = format!(
        "json:{{'driver':'blkdebug','image':{{'driver':'qcow2','file':{{'driver':'file','filename':'{}'}}}}}}",
        s(&img)
    );
    let o = vimg_raw(&["info", &above]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err_text(&o).contains("blkdebug"));
    // measure and map go through it as qemu-img does.
    let qm = run_cmd("qemu-img", &["map", "--output=json", &above]);
    let vm = vimg_raw(&["map", "--output=json", &above]);
    assert_eq!(vm.stdout, qm.stdout);
}

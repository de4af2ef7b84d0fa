//! blkdebug rules on the write side (`commit blkdebug:CONF:FILE`), against qemu-img as the
//! oracle: where vimg's qcow2 updater fires an event at the point QEMU's driver does, the
//! same request fails, with qemu-img's message, and the image is left in the state QEMU
//! leaves (checked by `qemu-img check`); where QEMU's next write would follow its own
//! breaking of the refcounts, vimg's image only leaks (a deliberate difference). Rules
//! vimg cannot honour are refused before anything is written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// stderr without the program's prefix and with `dir` spelled `DIR`.
fn err_text(o: &Output, dir: &Path) -> String {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .map(|l| {
            l.strip_prefix("qemu-img: ")
                .or_else(|| l.strip_prefix("vimg: "))
                .unwrap_or(l)
                .replace(s(dir), "DIR")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// In `dir`: a 64 MiB base, a top over it holding 64 KiB of data, and a blkdebug config
/// with one rule of `rule` lines. Returns (base, top, the blkdebug name of the top).
fn setup(dir: &Path, rule: &str) -> (PathBuf, PathBuf, String) {
    std::fs::create_dir_all(dir).unwrap();
    let base = dir.join("t.qcow2.base");
    let top = dir.join("t.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "64M"]);
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
        "64M",
    ]);
    let o = run_cmd("qemu-io", &["-c", "write -P 7 0 64k", s(&top)]);
    assert!(o.status.success());
    let conf = dir.join("blkdebug.conf");
    std::fs::write(&conf, format!("[inject-error]\n{rule}")).unwrap();
    let name = format!("blkdebug:{}:{}", s(&conf), s(&top));
    (base, top, name)
}

/// `qemu-img check` of `img`: (exit code, output with `dir` spelled `DIR`).
fn check(img: &Path, dir: &Path) -> (Option<i32>, String) {
    let o = run_cmd("qemu-img", &["check", s(img)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code(), text.replace(s(dir), "DIR"))
}

/// The guest reads the committed data from the base, and the top through the base.
fn assert_committed(base: &Path, top: &Path) {
    for img in [base, top] {
        let o = run_cmd("qemu-io", &["-r", "-c", "read -P 7 0 64k", s(img)]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains("read 65536/65536") && !out.contains("Pattern verification failed"),
            "{}: {out}",
            img.display()
        );
    }
}

#[test]
fn commit_fails_and_leaves_the_image_as_qemu_img_at_l1_update_and_empty_image_prepare() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (event, extra) in [
        ("l1_update", ""),
        ("empty_image_prepare", ""),
        // The L1 table's first sector (cluster 3 of 64 KiB), zero writes only (QEMU
        // zeroes the table with one), once.
        (
            "l1_update",
            "iotype = \"write-zeroes\"\nsector = \"384\"\nonce = \"on\"\n",
        ),
    ] {
        let rule = format!("event = \"{event}\"\n{extra}");
        let qd = dir.path().join(format!("q-{event}-{}", extra.len()));
        let vd = dir.path().join(format!("v-{event}-{}", extra.len()));
        let (qbase, qtop, qname) = setup(&qd, &rule);
        let (vbase, vtop, vname) = setup(&vd, &rule);
        let qo = run_cmd("qemu-img", &["commit", &qname]);
        let vo = vimg_raw(&["commit", &vname]);
        assert_eq!(vo.status.code(), qo.status.code(), "{event}");
        assert_eq!(vo.status.code(), Some(1));
        assert_eq!(err_text(&vo, &vd), err_text(&qo, &qd), "{event}");
        assert!(
            err_text(&vo, &vd).starts_with(
                "Failed to empty blkdebug:DIR/blkdebug.conf:DIR/t.qcow2: Input/output error"
            ),
            "{}",
            err_text(&vo, &vd)
        );
        // Both dirty, with the same leaks (or none), which `qemu-img check` reports alike.
        let (qc, qt) = check(&qtop, &qd);
        let (vc, vt) = check(&vtop, &vd);
        assert_eq!((vc, &vt), (qc, &qt), "{event}");
        assert!(vc == Some(0) || vc == Some(3), "{vt}");
        assert_eq!(check(&vbase, &vd).0, Some(0));
        assert_committed(&vbase, &vtop);
        assert_committed(&qbase, &qtop);
        // QEMU drops the leaks of a dirty image when it opens it for writing; then both
        // images are clean.
        for t in [&qtop, &vtop] {
            assert!(run_cmd("qemu-io", &["-c", "close", s(t)]).status.success());
        }
        assert_eq!(check(&vtop, &vd), check(&qtop, &qd));
        assert_eq!(check(&vtop, &vd).0, Some(0));
    }
}

#[test]
fn where_qemu_breaks_the_refcounts_first_vimg_fails_alike_but_only_leaks() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for rule in [
        "event = \"reftable_update\"\n",
        "event = \"refblock_alloc\"\n",
        "event = \"empty_image_prepare\"\niotype = \"flush\"\nonce = \"on\"\n",
        "event = \"l1_update\"\nerrno = \"28\"\n",
    ] {
        let tag = rule.len().to_string() + &rule[9..13];
        let qd = dir.path().join(format!("q{tag}"));
        let vd = dir.path().join(format!("v{tag}"));
        let (_, qtop, qname) = setup(&qd, rule);
        let (vbase, vtop, vname) = setup(&vd, rule);
        let qo = run_cmd("qemu-img", &["commit", &qname]);
        let vo = vimg_raw(&["commit", &vname]);
        assert_eq!(vo.status.code(), Some(1), "{rule}");
        assert_eq!(err_text(&vo, &vd), err_text(&qo, &qd), "{rule}");
        // vimg: leaks at worst, never an error `check` counts as corruption.
        let (vc, vt) = check(&vtop, &vd);
        assert!(vc == Some(0) || vc == Some(3), "{rule}: {vt}");
        assert!(!vt.contains("ERROR"), "{rule}: {vt}");
        assert_committed(&vbase, &vtop);
        let _ = qtop;
    }
}

#[test]
fn rules_vimg_cannot_honour_are_refused_before_writing() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // An event the updater never fires: the rule would never become active.
    let (base, top, name) = setup(&d.join("a"), "event = \"l2_load\"\n");
    let before = (std::fs::read(&base).unwrap(), std::fs::read(&top).unwrap());
    let o = vimg_raw(&["commit", &name]);
    assert_eq!(o.status.code(), Some(1));
    let t = err_text(&o, d);
    assert!(t.contains("blkdebug rule on event 'l2_load'"), "{t}");
    assert_eq!(
        (std::fs::read(&base).unwrap(), std::fs::read(&top).unwrap()),
        before
    );
    // `none`: active from the open, before the updater's own reads.
    let (_, top, name) = setup(&d.join("b"), "event = \"none\"\n");
    let before = std::fs::read(&top).unwrap();
    assert_eq!(vimg_raw(&["commit", &name]).status.code(), Some(1));
    assert_eq!(std::fs::read(&top).unwrap(), before);
    // A format whose updater does not pass requests through the rules.
    let qbase = d.join("c.qed.base");
    let qtop = d.join("c.qed");
    qemu_img(&["create", "-q", "-f", "qed", s(&qbase), "4M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        s(&qbase),
        "-F",
        "qed",
        s(&qtop),
    ]);
    let conf = d.join("c.conf");
    std::fs::write(&conf, "[inject-error]\nevent = \"l1_update\"\n").unwrap();
    let before = std::fs::read(&qtop).unwrap();
    let o = vimg_raw(&["commit", &format!("blkdebug:{}:{}", s(&conf), s(&qtop))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err_text(&o, d).contains("only into qcow2"),
        "{}",
        err_text(&o, d)
    );
    assert_eq!(std::fs::read(&qtop).unwrap(), before);
    // `-f` naming another format does not get past the rules either.
    let o = vimg_raw(&[
        "resize",
        "-f",
        "raw",
        &format!("blkdebug:{}:{}", s(&conf), s(&qtop)),
        "8M",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read(&qtop).unwrap(), before);
}

/// `commit` killed before each of its writes, flushes and truncations (the emptying of
/// the top now marks it dirty first, as QEMU does): every state left is one `qemu-img
/// check` finds free of corruption, and the guest still reads what was committed.
#[test]
fn commit_killed_at_any_point_leaves_leaks_at_worst() {
    use std::os::unix::process::ExitStatusExt;
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0u64;
    loop {
        assert!(n < 200, "commit did not finish within 200 writes");
        let d = dir.path().join(format!("k{n}"));
        let (base, top, _) = setup(&d, "event = \"none\"\n");
        let o = std::process::Command::new(vimg_bin())
            .args(["commit", s(&top)])
            .env("VIMG_TEST_CRASH_AFTER_WRITES", n.to_string())
            .output()
            .unwrap();
        let killed = match o.status.signal() {
            Some(9) => true,
            Some(sig) => panic!("vimg commit died of signal {sig}"),
            None => {
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                false
            }
        };
        for img in [&base, &top] {
            let (c, t) = check(img, &d);
            assert!(c == Some(0) || c == Some(3), "kill at {n}: {t}");
        }
        // The guest of the top reads the data throughout; the base holds it at the end.
        let o = run_cmd("qemu-io", &["-r", "-c", "read -P 7 0 64k", s(&top)]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            !out.contains("Pattern verification failed"),
            "kill at {n}: {out}"
        );
        if !killed {
            assert_committed(&base, &top);
        }
        std::fs::remove_dir_all(&d).unwrap();
        if !killed {
            assert!(n > 3);
            break;
        }
        n += 1;
    }
}

/// `snapshot -d` through blkdebug: without rules the file below is changed as qemu-img
/// changes it; with rules vimg refuses (its snapshot changes switch new tables in one
/// header write: QEMU's `cluster_free` and other steps have no counterpart there).
#[test]
fn snapshot_through_blkdebug_passes_without_rules_and_refuses_rules() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for tool in ["q", "v"] {
        let d = dir.path().join(tool);
        std::fs::create_dir_all(&d).unwrap();
        let img = d.join("t.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
        assert!(run_cmd("qemu-io", &["-c", "write 0 64k", s(&img)])
            .status
            .success());
        qemu_img(&["snapshot", "-c", "foo", s(&img)]);
        let conf = d.join("blkdebug.conf");
        std::fs::write(&conf, "[inject-error]\nevent = \"cluster_free\"\n").unwrap();
        if tool == "v" {
            let before = std::fs::read(&img).unwrap();
            let ruled = format!("blkdebug:{}:{}", s(&conf), s(&img));
            let o = vimg_raw(&["snapshot", "-d", "foo", &ruled]);
            assert_eq!(o.status.code(), Some(1));
            assert!(
                err_text(&o, &d).contains("blkdebug rules"),
                "{}",
                err_text(&o, &d)
            );
            assert_eq!(std::fs::read(&img).unwrap(), before);
        }
        let plain = format!("blkdebug::{}", s(&img));
        let o = if tool == "q" {
            run_cmd("qemu-img", &["snapshot", "-d", "foo", &plain])
        } else {
            vimg_raw(&["snapshot", "-d", "foo", &plain])
        };
        assert!(o.status.success(), "{}", err_text(&o, &d));
        let list = run_cmd("qemu-img", &["snapshot", "-l", s(&img)]);
        // (Where the tables end differs: vimg's snapshot changes place new tables.)
        outs.push((list.stdout, check(&img, &d).0));
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[1].1, Some(0));
    let q = dir.path().join("q/t.qcow2");
    let v = dir.path().join("v/t.qcow2");
    qemu_img(&["compare", s(&q), s(&v)]);
}

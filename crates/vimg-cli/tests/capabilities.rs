//! The drivers' declared capabilities as the command line sees them: a create option outside
//! its declared choices is refused in qemu-img's words, and a format that cannot be written
//! in one forward pass is refused on stdout before anything is written (on a FIFO the
//! writer refuses after opening it, so a waiting reader sees its end: destinations.rs).

mod common;

use common::*;

/// The last stderr line of a failed `create`, without the program's name.
fn refusal(prog: &str, out: &std::process::Output) -> String {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().last().unwrap_or_default();
    line.strip_prefix(&format!("{prog}: "))
        .unwrap_or(line)
        .to_string()
}

#[test]
fn values_outside_the_declared_choices_are_refused_like_qemu() {
    if !qemu_available("values_outside_the_declared_choices_are_refused_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (fmt, opt) in [
        ("raw", "preallocation=foo"),
        ("qcow2", "preallocation=foo"),
        ("qcow2", "compression_type=foo"),
        ("vpc", "subformat=foo"),
        ("vhdx", "subformat=foo"),
        ("vhdx", "preallocation=foo"),
        ("vmdk", "subformat=foo"),
        ("vmdk", "adapter_type=foo"),
    ] {
        let q = dir.path().join(format!("q.{fmt}"));
        let v = dir.path().join(format!("v.{fmt}"));
        let qo = run_cmd("qemu-img", &["create", "-f", fmt, "-o", opt, s(&q), "1M"]);
        let vo = vimg_raw(&["create", "-f", fmt, "-o", opt, s(&v), "1M"]);
        let (qe, ve) = (refusal("qemu-img", &qo), refusal("vimg", &vo));
        assert_eq!(
            ve.replacen(s(&v), "FILE", 1),
            qe.replacen(s(&q), "FILE", 1),
            "{fmt} -o {opt}"
        );
        assert!(!v.exists(), "{fmt} -o {opt}");
    }
}

/// A format that cannot be written in one pass is refused on stdout before anything is
/// written, with the reason its driver declares.
#[test]
fn formats_that_seek_are_refused_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    write_sparse_raw(&src, 1 << 20, &[(0, &pattern(4096, 1))]);
    for (fmt, opts, why) in [
        ("qcow2", "", "qcow2 images cannot be written to a stream"),
        ("vpc", "", "use subformat=fixed"),
        ("vdi", "", "use static=on"),
        (
            "vmdk",
            "subformat=monolithicFlat",
            "use subformat=streamOptimized",
        ),
        ("vhdx", "", "cannot be written to a stream"),
    ] {
        let mut args = vec!["convert", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&src), "-"]);
        let o = vimg_raw(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{fmt}");
        assert!(o.stdout.is_empty(), "{fmt}");
        assert!(err.contains(why), "{fmt}: {err}");
        assert!(
            err.contains("cannot be written to a stream"),
            "{fmt}: {err}"
        );
    }
    // The streamable variants go through.
    for (fmt, opts) in [
        ("vpc", "subformat=fixed"),
        ("vdi", "static=on"),
        ("vmdk", "subformat=streamOptimized"),
    ] {
        let o = vimg_raw(&["convert", "-O", fmt, "-o", opts, s(&src), "-"]);
        assert!(
            o.status.success(),
            "{fmt}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!o.stdout.is_empty(), "{fmt}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

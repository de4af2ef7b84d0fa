//! `convert -n` with `-o` (issue 15): qemu-img (5.1 on) refuses every `-o` when it skips
//! image creation, before it looks at the options themselves — `-o backing_file=` is not
//! taken as `-B`, `-o help` prints no help, an unknown option is not reported — and after
//! its command-line checks (a malformed option list, `--skip-broken-bitmaps` without
//! `--bitmaps`, copy offloading with `-c`/`-S`/salvage). vimg says the same words with the
//! same exit code, writes nothing to stdout, and leaves the target untouched.

mod common;

use common::*;

#[test]
fn dash_o_with_dash_n_is_refused_as_qemu_img_refuses_it() {
    if !qemu_available(&test_name()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("a.qcow2");
    let tgt = d.join("b.qcow2");
    let base = d.join("base.raw");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&src), "1M"]);
    qemu_io("qcow2", &src, &["write -P 0x5a 0 64k"]);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&tgt), "1M"]);
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "1M"]);
    let backing = format!("backing_file={},backing_fmt=raw", s(&base));
    let cases: Vec<Vec<&str>> = vec![
        vec!["-O", "qcow2", "-o", &backing],
        vec!["-O", "qcow2", "-o", "backing_file=base.raw"],
        vec!["-O", "qcow2", "-o", "cluster_size=4096"],
        vec!["-o", "cluster_size=4096"],
        vec!["-O", "qcow2", "-o", "help"],
        vec!["-O", "qcow2", "-o", "?"],
        vec!["-O", "qcow2", "-o", "preallocation=metadata"],
        vec!["-O", "qcow2", "-o", "bogus=1"],
        vec!["-c", "-o", "cluster_size=4096"],
        vec!["-O", "qcow2", "-o", "a,,b"],
        vec!["-o", ""],
        vec!["-o", ","],
        vec!["-o", "a,"],
        vec!["-o", ",a"],
        vec!["-o", "a,,,"],
        vec!["-o", "x=1", "--skip-broken-bitmaps"],
        vec!["-C", "-c", "-o", "x=1"],
        vec!["-C", "-S", "4k", "-o", "help", "-O", "qcow2"],
    ];
    let before = sha256_file(&tgt);
    for extra in cases {
        let mut args = vec!["convert", "-n"];
        args.extend_from_slice(&extra);
        args.extend_from_slice(&[s(&src), s(&tgt)]);
        let q = run_cmd("qemu-img", &args);
        let v = vimg_raw(&args);
        let qerr = String::from_utf8_lossy(&q.stderr).into_owned();
        let verr = String::from_utf8_lossy(&v.stderr).replacen("vimg:", "qemu-img:", 1);
        assert_eq!(
            v.status.code(),
            q.status.code(),
            "{args:?}: {verr} / {qerr}"
        );
        assert_eq!(verr, qerr, "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&q.stdout),
            "{args:?}"
        );
        assert_eq!(sha256_file(&tgt), before, "{args:?} changed the target");
    }
}

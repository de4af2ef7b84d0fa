//! `measure -O FMT` for the formats qemu-img does not measure: the same message, in the same
//! order against a bad option or a missing file, and the same exit code as qemu-img.

mod common;

use common::*;

#[test]
fn measure_refuses_what_qemu_img_refuses() {
    if !qemu_available("measure_refuses_what_qemu_img_refuses") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("x.raw");
    write_sparse_raw(&raw, 1 << 20, &[(4096, &[7; 512])]);
    let missing = dir.path().join("missing");
    for fmt in [
        "vmdk",
        "vdi",
        "parallels",
        "qed",
        "qcow",
        "bochs",
        "cloop",
        "dmg",
    ] {
        for tail in [
            &["--size", "1G"][..],
            &["--output=json", "--size", "1G"],
            &[s(&raw)],
            &["-o", "foo=bar", "--size", "1G"],
            &[s(&missing)],
        ] {
            let mut args = vec!["measure", "-O", fmt];
            args.extend_from_slice(tail);
            let v = vimg_raw(&args);
            let q = run_cmd("qemu-img", &args);
            assert_eq!(v.status.code(), q.status.code(), "{args:?}");
            assert_eq!(v.status.code(), Some(1), "{args:?}");
            assert!(v.stdout.is_empty(), "{args:?}");
            let (ve, qe) = (
                String::from_utf8_lossy(&v.stderr),
                String::from_utf8_lossy(&q.stderr),
            );
            if tail[0] == s(&missing) {
                // qemu-img repeats "Could not open '...'" where vimg says it once.
                assert!(ve.starts_with(&format!("vimg: Could not open '{}'", s(&missing))));
                assert!(qe.starts_with(&format!("qemu-img: Could not open '{}'", s(&missing))));
            } else {
                assert_eq!(ve.replace("vimg:", "qemu-img:"), qe, "{args:?}");
            }
        }
    }
}

//! `amend -p` prints qemu-img's `    (NN.NN/100%)` lines at the steps QEMU counts (iotest 061:
//! one per L1 entry of the active and every snapshot's table on a downgrade, two on an
//! upgrade, 0 and 100 always, the newline after an error), and `lazy_refcounts=on` with
//! `compat=0.10` on an image that already has lazy refcounts is no change of that bit, as
//! in qemu-img. Each case runs qemu-img and vimg (as `qemu-img`, its compatibility mode) on
//! copies of the same image and compares stdout and stderr together, in order.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// `tool amend ARGS` with stderr into the same pipe as stdout, as iotests read it.
fn amend(tool: &Path, args: &[&str], img: &Path) -> (Option<i32>, String) {
    let dir = img.parent().unwrap();
    let o = Command::new("sh")
        .arg("-c")
        .arg("\"$0\" amend \"$@\" 2>&1")
        .arg(tool)
        .args(args)
        .arg(img)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).replace(&img.display().to_string(), "IMG"),
    )
}

/// Runs `setup` once per tool on a fresh image, then each `amend` in turn on both.
fn compare(name: &str, setup: &dyn Fn(&Path), steps: &[&[&str]]) {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("qemu-img");
    std::os::unix::fs::symlink(vimg_bin(), &link).unwrap();
    let real = Path::new("qemu-img").to_path_buf();
    let mut outs = Vec::new();
    for (tag, tool) in [("q", &real), ("v", &link)] {
        let sub = dir.path().join(tag);
        std::fs::create_dir(&sub).unwrap();
        let img = sub.join("t.qcow2");
        setup(&img);
        let mut seen = Vec::new();
        for args in steps {
            seen.push(amend(tool, args, &img));
        }
        // The file's end may differ: with snapshots vimg's downgrade writes copies of the
        // tables (docs/iotests.md, 061).
        let (code, check) = qemu_check_output(&img, "qcow2");
        let check: Vec<&str> = check
            .lines()
            .filter(|l| !l.starts_with("Image end offset"))
            .collect();
        seen.push((Some(code), check.join("\n")));
        outs.push(seen);
    }
    for (i, (q, v)) in outs[0].iter().zip(&outs[1]).enumerate() {
        assert_eq!(v, q, "{name}, step {i}: vimg (left), qemu-img (right)");
    }
}

fn chain(img: &Path, snapshot: bool) {
    let base = img.with_extension("base");
    qemu_create(&base, "qcow2", "compat=1.1", "4G");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=1.1",
        "-b",
        "t.base",
        "-F",
        "qcow2",
        s(img),
        "4G",
    ]);
    qemu_io(
        "qcow2",
        img,
        &[
            "write -z 0 64k",
            "write -z 1G 64k",
            "write -z 2G 64k",
            "write -z 3G 64k",
        ],
    );
    if snapshot {
        qemu_img(&["snapshot", "-c", "foo", s(img)]);
    }
}

#[test]
fn downgrade_progress_counts_l1_entries() {
    if !qemu_available("downgrade_progress_counts_l1_entries") {
        return;
    }
    compare(
        "without snapshot",
        &|img| chain(img, false),
        &[&["-p", "-o", "compat=0.10"]],
    );
    compare(
        "with snapshot",
        &|img| chain(img, true),
        &[&["-p", "-o", "compat=0.10"]],
    );
}

#[test]
fn upgrade_features_and_errors_print_like_qemu() {
    if !qemu_available("upgrade_features_and_errors_print_like_qemu") {
        return;
    }
    let v2 = |img: &Path| {
        qemu_create(img, "qcow2", "compat=0.10", "1G");
        qemu_img(&["snapshot", "-c", "s1", s(img)]);
    };
    compare(
        "upgrade, features, errors",
        &v2,
        &[
            &["-p", "-o", "compat=1.1"],
            &["-p", "-o", "lazy_refcounts=on"],
            &["-o", "refcount_bits=8"],
            // Refused after the 100 line, which is ended only after the message.
            &["-p", "-o", "compat=0.10,lazy_refcounts=on"],
            &["-o", "refcount_bits=16"],
            // Lazy refcounts already on: not a change, the downgrade goes ahead.
            &["-p", "-o", "compat=0.10,lazy_refcounts=on"],
            &["-p", "-q", "-o", "compat=1.1"],
        ],
    );
}

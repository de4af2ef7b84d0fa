//! A script written for qemu-img runs unchanged with vimg substituted, on every format, and
//! prints the same (tests/scripts/qemu_workflow.sh).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn run_script(img: &str, dir: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/qemu_workflow.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .env("IMG", img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "script with IMG={img} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn qemu_img_script_runs_unchanged_with_vimg() {
    if !qemu_available("qemu_img_script_runs_unchanged_with_vimg") {
        return;
    }
    let q = tempfile::tempdir().unwrap();
    let v = tempfile::tempdir().unwrap();
    let with_qemu = run_script("qemu-img", q.path());
    let with_vimg = run_script(vimg_bin().to_str().unwrap(), v.path());
    assert_eq!(with_vimg, with_qemu);
}

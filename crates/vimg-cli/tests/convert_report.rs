//! `vimg convert --output=json`: the report of the file written, whose `image-service` block
//! is the one `vimg info --output=json` gives for that file, with the checksum taken while
//! converting as `os_hash_algo`/`os_hash_value` (a .qcow2.xz in, what to register out).

mod common;

use common::*;

#[test]
fn report_of_a_converted_qcow2_xz_is_what_to_register() {
    let test = "report_of_a_converted_qcow2_xz_is_what_to_register";
    if !qemu_available(test) || !tool_available(test, "xz") || !tool_available(test, "sha512sum") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("r.raw");
    write_sparse_raw(&raw, 3 << 30, &[(0, &pattern(1 << 20, 3))]);
    let q = dir.path().join("d.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)]);
    run_ok("xz", &["-1", s(&q)]);
    let xz = dir.path().join("d.qcow2.xz");
    let out = dir.path().join("out.qcow2");
    let r = json(&vimg(&[
        "convert",
        "-O",
        "qcow2",
        "--checksum",
        "sha512",
        "--output=json",
        s(&xz),
        s(&out),
    ]));
    let sum = run_ok("sha512sum", &[s(&out)]);
    let sum = sum.split_whitespace().next().unwrap();
    assert_eq!(r["filename"], s(&out));
    assert_eq!(r["format"], "qcow2");
    assert_eq!(r["vimg-checksum"]["algorithm"], "sha512");
    assert_eq!(r["vimg-checksum"]["value"], sum);
    let svc = &r["image-service"];
    assert_eq!(svc["os_hash_algo"], "sha512");
    assert_eq!(svc["os_hash_value"], sum);
    assert_eq!(
        (
            &svc["disk_format"],
            &svc["container_format"],
            &svc["min_disk"]
        ),
        (&"qcow2".into(), &"bare".into(), &3.into())
    );
    assert!(svc.get("input_container_format").is_none(), "{svc}");
    // The same block `info` gives for the file written, but for the checksum.
    let mut from_info = json(&vimg(&["info", "--output=json", s(&out)]))["image-service"].clone();
    let mut mine = svc.clone();
    for k in ["os_hash_algo", "os_hash_value"] {
        mine.as_object_mut().unwrap().remove(k);
        from_info.as_object_mut().unwrap().remove(k);
    }
    assert_eq!(mine, from_info);
    // qemu-img reads what was written as it reads the source.
    assert_eq!(
        qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(&out)]).trim(),
        "Images are identical."
    );
}

#[test]
fn json_report_is_refused_when_the_image_goes_to_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, pattern(1 << 20, 5)).unwrap();
    let o = vimg_raw(&["convert", "-O", "raw", "--output=json", s(&raw), "-"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty(), "nothing written to stdout");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--output=json"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

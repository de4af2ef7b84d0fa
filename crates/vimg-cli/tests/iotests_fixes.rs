//! Differences QEMU's qemu-iotests found between vimg and qemu-img (issue 14, docs/iotests.md),
//! each reproduced here against qemu-img so it stays fixed without QEMU's test suite.

mod common;

use std::path::Path;

use common::*;

/// `map --output=json` of `img`, as text.
fn map_json(img: &Path) -> String {
    qemu_img(&["map", "--output=json", s(img)])
}

/// iotest 122, "Non-zero -S": converting with `-S 4k`/`-S 8k` into 1 KiB qcow2 clusters
/// writes qemu-img's aligned blocks (data 0-4k, not 0-1k), so the outputs map alike; with
/// `-c`, -S is ignored and each zero cluster is skipped.
#[test]
fn convert_min_sparse_larger_than_cluster_maps_like_qemu_img() {
    if !qemu_available("convert_min_sparse_larger_than_cluster_maps_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=1k",
        s(&src),
        "64M",
    ]);
    qemu_io(
        "qcow2",
        &src,
        &[
            "write -P 0 0 64k",
            "write 0 1k",
            "write 8k 1k",
            "write 17k 1k",
            "write -P 0 65k 1k",
        ],
    );
    for sparse in ["4k", "8k", "3k"] {
        for compress in [false, true] {
            let q = dir.path().join("q.qcow2");
            let v = dir.path().join("v.qcow2");
            let mut args = vec![
                "convert",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=1k",
                "-S",
                sparse,
            ];
            if compress {
                args.push("-c");
            }
            let mut qa = args.clone();
            qa.extend([s(&src), s(&q)]);
            qemu_img(&qa);
            let mut va = args.clone();
            va.extend([s(&src), s(&v)]);
            vimg(&va);
            assert_eq!(
                map_json(&v),
                map_json(&q),
                "-S {sparse} compress={compress}"
            );
        }
    }
}

/// The same rule into raw (512-byte units): the file's data extents past the first 4 KiB
/// (which qemu-img's file driver always allocates at creation) are qemu-img's.
#[test]
fn convert_min_sparse_into_raw_allocates_like_qemu_img() {
    if !qemu_available("convert_min_sparse_into_raw_allocates_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; 1 << 20];
    // Short data pieces at unaligned offsets, gaps of every size around 4k and 8k.
    let mut off = 700usize;
    for (i, gap) in [100usize, 3000, 4096, 5000, 7000, 8192, 9000, 20000]
        .iter()
        .cycle()
        .take(60)
        .enumerate()
    {
        let len = 1 + (i * 613) % 1500;
        if off + len >= data.len() {
            break;
        }
        data[off..off + len].fill(0x5a);
        off += len + gap;
    }
    std::fs::write(&src, &data).unwrap();
    for sparse in ["4k", "8k", "1536", "3k", "64k"] {
        let q = dir.path().join("q.raw");
        let v = dir.path().join("v.raw");
        qemu_img(&["convert", "-O", "raw", "-S", sparse, s(&src), s(&q)]);
        vimg(&["convert", "-O", "raw", "-S", sparse, s(&src), s(&v)]);
        assert_eq!(std::fs::read(&v).unwrap(), data);
        assert_eq!(data_extents(&v), data_extents(&q), "-S {sparse}");
    }
}

/// The file's data extents (SEEK_DATA/SEEK_HOLE) from 4 KiB on.
fn data_extents(p: &Path) -> Vec<(u64, u64)> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(p).unwrap();
    let end = f.metadata().unwrap().len() as i64;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut off = 0i64;
    while off < end {
        // SAFETY: lseek on a file descriptor this function owns (through `f`).
        let d = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        let from = d.max(4096);
        if from < h {
            out.push((from as u64, h as u64));
        }
        off = h;
    }
    out
}

/// Small clusters: where a data run enters a host range no refcount block covers yet, QEMU
/// allocates the run first and the new refcount block right after it; vimg's output is
/// bit-identical (it put the block inside the run before).
#[test]
fn qcow2_small_clusters_refcount_block_after_the_run_like_qemu_img() {
    if !qemu_available("qcow2_small_clusters_refcount_block_after_the_run_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // 12 MiB of data: 4k clusters need a second refcount block at 8 MiB of host space,
    // 1k and 2k clusters several.
    std::fs::write(&src, pattern(12 << 20, 7)).unwrap();
    for cs in ["4k", "2k", "1k"] {
        let q = dir.path().join(format!("q-{cs}.qcow2"));
        let v = dir.path().join(format!("v-{cs}.qcow2"));
        let o = format!("cluster_size={cs}");
        qemu_img(&["convert", "-O", "qcow2", "-o", &o, s(&src), s(&q)]);
        vimg(&["convert", "-O", "qcow2", "-o", &o, s(&src), s(&v)]);
        assert_same_file(&v, &q);
        vimg(&[
            "convert",
            "-m",
            "1",
            "-O",
            "qcow2",
            "-o",
            &o,
            s(&src),
            s(&v),
        ]);
        assert_same_file(&v, &q);
    }
}

/// iotest 054: a qcow2 header whose size is 1 EiB. Invoked as `qemu-img`, vimg prints
/// qemu-img's message exactly; as `vimg`, the same words with the size and the limit after.
#[test]
fn image_too_big_in_qemu_img_words_under_that_name() {
    if !qemu_available("image_too_big_in_qemu_img_words_under_that_name") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "4G"]);
    patch(&img, 24, &(1u64 << 60).to_be_bytes());
    let link = dir.path().join("qemu-img");
    std::os::unix::fs::symlink(vimg_bin(), &link).unwrap();
    for sub in ["check", "info"] {
        let q = run_cmd("qemu-img", &[sub, s(&img)]);
        let v = run_cmd(&link, &[sub, s(&img)]);
        assert_eq!(v.status.code(), q.status.code(), "{sub}");
        assert_eq!(
            String::from_utf8_lossy(&v.stderr),
            String::from_utf8_lossy(&q.stderr),
            "{sub}"
        );
        let own = vimg_raw(&[sub, s(&img)]);
        let own = String::from_utf8_lossy(&own.stderr);
        assert!(
            own.contains("Image is too big (virtual size 1152921504606846976"),
            "{own}"
        );
    }
}

/// iotest 036: an autoclear feature bit vimg does not know is cleared when the image is
/// opened for writing (the spec's rule; qemu-img does it on every read-write open), here
/// by `check -r all` on an otherwise clean image. Known bits stay.
#[test]
fn check_repair_clears_unknown_autoclear_bits_like_qemu_img() {
    if !qemu_available("check_repair_clears_unknown_autoclear_bits_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.qcow2");
    let v = dir.path().join("v.qcow2");
    for bits in [1u64 << 63, (1 << 63) | (1 << 7)] {
        qemu_img(&["create", "-f", "qcow2", s(&q), "64M"]);
        patch(&q, 88, &bits.to_be_bytes());
        std::fs::copy(&q, &v).unwrap();
        let qo = run_cmd("qemu-img", &["check", "-r", "all", s(&q)]);
        let vo = vimg_raw(&["check", "-r", "all", s(&v)]);
        assert_eq!(vo.status.code(), qo.status.code());
        assert_eq!(
            String::from_utf8_lossy(&vo.stdout),
            String::from_utf8_lossy(&qo.stdout)
        );
        assert_eq!(rd64be(&v, 88), 0);
        assert_same_file(&v, &q);
    }
    // A known bit (bitmaps, bit 0, without a bitmaps extension) is not vimg's to clear.
    qemu_img(&["create", "-f", "qcow2", s(&v), "64M"]);
    patch(&v, 88, &((1u64 << 63) | 1).to_be_bytes());
    vimg(&["check", "-r", "leaks", s(&v)]);
    assert_eq!(rd64be(&v, 88), 1);
}

/// iotest 214: qemu's size options take hexadecimal (`-o cluster_size=0x10000`).
#[test]
fn hexadecimal_sizes_like_qemu_img() {
    if !qemu_available("hexadecimal_sizes_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.qcow2");
    let v = dir.path().join("v.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=0x1000",
        s(&q),
        "0x200000",
    ]);
    vimg(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=0x1000",
        s(&v),
        "0x200000",
    ]);
    assert_same_file(&v, &q);
    // A suffix after hexadecimal is refused by both.
    assert!(
        !run_cmd("qemu-img", &["create", "-f", "qcow2", s(&q), "0x2k"])
            .status
            .success()
    );
    assert!(!vimg_raw(&["create", "-f", "qcow2", s(&v), "0x2k"])
        .status
        .success());
}

/// iotests 159, 170: `dd`'s options may follow its operands (`dd if=A of=B bs=N -O FMT`),
/// as qemu-img's option parser permutes them.
#[test]
fn dd_takes_options_after_operands() {
    if !qemu_available("dd_takes_options_after_operands") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&src), "1M"]);
    qemu_io(
        "qcow2",
        &src,
        &["write -P 0x5a 0 64k", "write -P 0x33 512k 4k"],
    );
    let q = dir.path().join("q.qcow2");
    let v = dir.path().join("v.qcow2");
    let (iq, oq) = (format!("if={}", s(&src)), format!("of={}", s(&q)));
    let (iv, ov) = (format!("if={}", s(&src)), format!("of={}", s(&v)));
    qemu_img(&["dd", &iq, &oq, "bs=64k", "-O", "qcow2"]);
    vimg(&["dd", &iv, &ov, "bs=64k", "-O", "qcow2"]);
    let out = qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", s(&q), s(&v)]);
    assert!(out.contains("Images are identical"), "{out}");
    assert!(qemu_img(&["info", s(&v)]).contains("file format: qcow2"));
}

/// iotest 043: invoked as qemu-img, `info --backing-chain` on a chain that loops prints
/// qemu-img's one line, and `info --output=json` prints qemu-img's keys only.
#[test]
fn info_as_qemu_img_loop_message_and_json_keys() {
    if !qemu_available("info_as_qemu_img_loop_message_and_json_keys") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qcow2");
    let link = dir.path().join("qemu-img");
    std::os::unix::fs::symlink(vimg_bin(), &link).unwrap();
    qemu_img(&["create", "-f", "qcow2", s(&img), "64M"]);
    let same = |args: &[&str]| {
        let q = run_cmd("qemu-img", args);
        let v = run_cmd(&link, args);
        assert_eq!(v.status.code(), q.status.code(), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&q.stdout),
            "{args:?}"
        );
        assert_eq!(
            String::from_utf8_lossy(&v.stderr),
            String::from_utf8_lossy(&q.stderr),
            "{args:?}"
        );
    };
    same(&["info", "--output=json", s(&img)]);
    qemu_img(&["rebase", "-u", "-b", s(&img), "-F", "qcow2", s(&img)]);
    same(&["info", "--backing-chain", s(&img)]);
    same(&["info", "--backing-chain", "--output=json", s(&img)]);
    // Under its own name vimg keeps its additions.
    let own = vimg(&["info", "--output=json", "-U", s(&img)]);
    assert!(own.contains("image-service"), "{own}");
}

/// iotest 106: shrinking a raw image with preallocation is refused in qemu-img's words and
/// leaves the file as it is; without preallocation it shrinks.
#[test]
fn raw_shrink_with_preallocation_refused_like_qemu_img() {
    if !qemu_available("raw_shrink_with_preallocation_refused_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.raw");
    let v = dir.path().join("v.raw");
    for mode in ["falloc", "full"] {
        std::fs::write(&q, vec![7u8; 256 << 10]).unwrap();
        std::fs::write(&v, vec![7u8; 256 << 10]).unwrap();
        let p = format!("--preallocation={mode}");
        let args = |f: &Path| -> Vec<String> {
            ["resize", "-f", "raw", "--shrink", p.as_str(), s(f), "-128K"]
                .iter()
                .map(|x| x.to_string())
                .collect()
        };
        let qa = args(&q);
        let va = args(&v);
        let qo = run_cmd(
            "qemu-img",
            &qa.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let vo = vimg_raw(&va.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(vo.status.code(), qo.status.code(), "{mode}");
        assert_eq!(
            String::from_utf8_lossy(&vo.stderr).replace("vimg:", "qemu-img:"),
            String::from_utf8_lossy(&qo.stderr),
            "{mode}"
        );
        assert_eq!(std::fs::metadata(&v).unwrap().len(), 256 << 10);
    }
    vimg(&["resize", "-f", "raw", "--shrink", s(&v), "-128K"]);
    assert_eq!(std::fs::metadata(&v).unwrap().len(), 128 << 10);
}

/// iotests 110, 126: command-line names in QEMU's spellings: `json:` with single-quoted
/// strings, and `file:` before a path with a colon in it (create and info).
#[test]
fn json_single_quotes_and_file_prefix_names_like_qemu_img() {
    if !qemu_available("json_single_quotes_and_file_prefix_names_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a:b.qcow2");
    let name = format!("file:{}", s(&img));
    let out = vimg(&["create", "-f", "qcow2", &name, "64M"]);
    assert!(out.starts_with(&format!("Formatting '{name}'")), "{out}");
    assert!(qemu_img(&["info", s(&img)]).contains("virtual size: 64 MiB"));
    assert!(vimg(&["info", &name]).contains("virtual size: 64 MiB"));
    let json = format!(
        "json:{{'driver':'qcow2','file':{{'driver':'file','filename':'{}'}}}}",
        s(&img)
    );
    let q = qemu_img(&["info", &json]);
    let v = vimg(&["info", &json]);
    for line in [
        "file format: qcow2",
        "virtual size: 64 MiB (67108864 bytes)",
    ] {
        assert!(q.contains(line) && v.contains(line), "{q}\n{v}");
    }
}

/// iotest 035: a 6 GiB image with 512-byte clusters has an L1 table of 3072 clusters that
/// spans twelve refcount regions; their blocks go after it (the file's last clusters, which
/// must not be cut off), as QEMU lays it out: bit-identical, clean, and writable by qemu-io.
#[test]
fn qcow2_large_l1_refcount_blocks_after_it_like_qemu_img() {
    if !qemu_available("qcow2_large_l1_refcount_blocks_after_it_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.qcow2");
    let v = dir.path().join("v.qcow2");
    for (cs, size) in [("512", "6G"), ("1k", "64G")] {
        let o = format!("cluster_size={cs}");
        qemu_img(&["create", "-f", "qcow2", "-o", &o, s(&q), size]);
        vimg(&["create", "-f", "qcow2", "-o", &o, s(&v), size]);
        assert_same_file(&v, &q);
        qemu_io(
            "qcow2",
            &v,
            &["write 0 512", "write 1M 512", "write 63M 512"],
        );
        let out = qemu_img(&["check", s(&v)]);
        assert!(out.contains("No errors were found"), "{out}");
    }
}

/// Disk usage of `p` in bytes.
fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// luks iotests (009 creates 6 GiB): `create -f luks` leaves the payload as qemu-img leaves
/// it: unwritten in a new file (reading, in qemu-img and vimg alike, as the decryption of
/// zeros), reserved with `preallocation=falloc`, plain zeros with `full`; `metadata` is
/// taken as `off`; a bad mode is refused in qemu-img's words, before any file exists.
#[test]
fn luks_create_leaves_the_payload_unwritten_like_qemu_img() {
    if !qemu_available("luks_create_leaves_the_payload_unwritten_like_qemu_img") {
        return;
    }
    const OBJ: &str = "secret,id=sec0,data=pw";
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 4 << 20;
    let decrypt = |tool: &str, img: &Path, out: &Path| {
        let o = format!("driver=luks,key-secret=sec0,file.filename={}", s(img));
        let args = [
            "convert",
            "--object",
            OBJ,
            "--image-opts",
            &o,
            "-O",
            "raw",
            s(out),
        ];
        match tool {
            "qemu-img" => qemu_img(&args),
            _ => vimg(&args),
        };
    };
    for mode in [
        "",
        ",preallocation=off",
        ",preallocation=metadata",
        ",preallocation=falloc",
        ",preallocation=full",
    ] {
        let o = format!("key-secret=sec0,iter-time=10{mode}");
        let q = dir.path().join("q.luks");
        let v = dir.path().join("v.luks");
        for (tool, img) in [("qemu-img", &q), ("vimg", &v)] {
            let args = [
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                OBJ,
                "-o",
                &o,
                s(img),
                "4M",
            ];
            match tool {
                "qemu-img" => qemu_img(&args),
                _ => vimg(&args),
            };
        }
        assert_eq!(size_of(&q), size_of(&v), "{mode}");
        let info = json(&qemu_img(&["info", "--output=json", s(&v)]));
        let payload = info["format-specific"]["data"]["payload-offset"]
            .as_u64()
            .unwrap();
        assert_eq!(payload + size, size_of(&v), "{mode}");
        // The payload on disk: zeros (a hole, reserved space or written zeros).
        let bytes = std::fs::read(&v).unwrap();
        assert!(bytes[payload as usize..].iter().all(|b| *b == 0), "{mode}");
        // Allocated as qemu-img allocates it.
        let preallocated = mode.contains("falloc") || mode.contains("full");
        for img in [&q, &v] {
            assert_eq!(disk_usage(img) >= size, preallocated, "{mode} {}", s(img));
        }
        // qemu-img and vimg decrypt vimg's volume alike: the decryption of zeros, not zeros.
        let qr = dir.path().join("q.raw");
        let vr = dir.path().join("v.raw");
        decrypt("qemu-img", &v, &qr);
        decrypt("vimg", &v, &vr);
        assert_same_file(&qr, &vr);
        assert!(
            std::fs::read(&qr).unwrap().iter().any(|b| *b != 0),
            "{mode}"
        );
    }
    // A mode neither knows: qemu-img's words, and no file.
    let bad = dir.path().join("bad.luks");
    let args = [
        "create",
        "-f",
        "luks",
        "--object",
        OBJ,
        "-o",
        "key-secret=sec0,iter-time=10,preallocation=foo",
        s(&bad),
        "1M",
    ];
    for out in [run_cmd("qemu-img", &args), vimg_raw(&args)] {
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid parameter value: foo"), "{err}");
        assert!(!bad.exists());
    }
}

/// iotest 253 (raw): QEMU's file protocol writes the first 4 KiB of every new raw file, so
/// `map` shows it as data; vimg's `create` and `convert -O raw` leave the same map.
#[test]
fn new_raw_file_maps_its_first_block_like_qemu_img() {
    if !qemu_available("new_raw_file_maps_its_first_block_like_qemu_img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.raw");
    let v = dir.path().join("v.raw");
    for size in ["0", "512", "5000", "1048575", "1M"] {
        let _ = std::fs::remove_file(&q);
        let _ = std::fs::remove_file(&v);
        qemu_img(&["create", "-q", "-f", "raw", s(&q), size]);
        vimg(&["create", "-q", "-f", "raw", s(&v), size]);
        assert_eq!(size_of(&q), size_of(&v), "{size}");
        assert_eq!(map_json(&v), map_json(&q), "create {size}");
        // convert of an all-zero source, and of one with data past the first block
        let c = dir.path().join("c.raw");
        let qc = dir.path().join("qc.raw");
        let _ = std::fs::remove_file(&c);
        let _ = std::fs::remove_file(&qc);
        vimg(&["convert", "-O", "raw", s(&q), s(&c)]);
        qemu_img(&["convert", "-O", "raw", s(&q), s(&qc)]);
        assert_eq!(map_json(&c), map_json(&qc), "convert {size}");
    }
    qemu_io("raw", &q, &["write -P 7 960k 64k"]);
    let c = dir.path().join("d.raw");
    let qc = dir.path().join("qd.raw");
    vimg(&["convert", "-O", "raw", s(&q), s(&c)]);
    qemu_img(&["convert", "-O", "raw", s(&q), s(&qc)]);
    assert_eq!(map_json(&c), map_json(&qc));
    assert_same_file(&c, &qc);
}

//! Untrusted bytes as the extent file of a VMDK descriptor: the first byte picks the
//! extent type (hosted sparse, COWD vmfsSparse, seSparse, flat), the rest is written as the
//! extent file next to a fixed descriptor, which is then opened, mapped and read through
//! the gate like any multi-file image.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vimg::Format;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("vimg-fuzz-vmdk-extent-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("fuzz folder");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let (create, kind, offset) = match sel % 4 {
        0 => ("monolithicSparse", "SPARSE", ""),
        1 => ("vmfsSparse", "VMFSSPARSE", ""),
        2 => ("seSparse", "SESPARSE", ""),
        _ => ("monolithicFlat", "FLAT", " 1"),
    };
    // The size in sectors comes from the input too, bounded so reads stay small.
    let sectors = 1 + u64::from(sel / 4) * 4096;
    let d = dir();
    if std::fs::write(d.join("e.vmdk"), body).is_err() {
        return;
    }
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"{create}\"\n\
         RW {sectors} {kind} \"e.vmdk\"{offset}\nRW 8 ZERO\n"
    );
    vimg::fuzzing::open_at_and_read_all(desc.as_bytes(), Some(&d.join("d.vmdk")), Some(Format::Vmdk));
});

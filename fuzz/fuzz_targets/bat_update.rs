//! Untrusted bytes changed in place as VDI, VHD (vpc), Parallels, raw or qcow (version 1):
//! the first byte picks the format (modulo 5: 0 vdi, 1 vpc, 2 parallels, 3 raw, 4 qcow),
//! the next 8 are a program of
//! in-place operations, the rest is the image, written to a file in a private folder. The
//! program runs as in `qed_update` (`inplace_common.rs`): guest writes, zero writes,
//! writes across a block boundary, several writes in one session, `resize` (raw; refused
//! by the others), `check -r` (parallels; refused by the others), `rebase -u` (refused),
//! `convert -n` from a raw file, `commit` of a qcow2 top into the image, and reopening.
//! Errors are fine; the invariants of `inplace_common.rs` are checked after every
//! operation and at the end (bounded growth, written bytes read back, the read-side
//! property).
#![no_main]

#[path = "inplace_common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use vimg::Format;

const FORMATS: [(Format, &str); 5] = [
    (Format::Vdi, "img.vdi"),
    (Format::Vpc, "img.vhd"),
    (Format::Parallels, "img.hds"),
    (Format::Raw, "img.raw"),
    (Format::Qcow, "img.qcow"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    if rest.len() < common::PROGRAM {
        return;
    }
    let (format, name) = FORMATS[sel as usize % FORMATS.len()];
    let (program, image) = rest.split_at(common::PROGRAM);
    let dir = common::folder("bat-update");
    common::reset(dir);
    let path = dir.join(name);
    if std::fs::write(&path, image).is_err() {
        return;
    }
    common::Run::new(&path, dir, format).program(program);
});

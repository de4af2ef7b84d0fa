//! Untrusted bytes changed in place as QED: the first 8 bytes are a program of in-place
//! operations, the rest is the image, written as `img.qed` in a private folder next to a
//! 256 KiB raw file `b` (the backing file the seeds name). Each program byte runs one
//! operation through `vimg::formats::updater` (low nibble the operation, high nibble its
//! parameter): guest writes, zero writes and writes across a cluster boundary, several
//! writes in one session, `resize` grow and shrink, `check -r leaks|all`, `rebase -u`
//! onto no backing file or onto `b`, `convert -n` from a raw file, `commit` of a qcow2 top
//! into the image, safe `rebase` onto no backing file, and reopening. Errors are fine;
//! the invariants of `inplace_common.rs` are checked after every operation and at the end
//! (bounded growth, written bytes read back, the read-side property).
#![no_main]

#[path = "inplace_common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use vimg::Format;

fuzz_target!(|data: &[u8]| {
    if data.len() < common::PROGRAM {
        return;
    }
    let (program, image) = data.split_at(common::PROGRAM);
    let dir = common::folder("qed-update");
    common::reset(dir);
    let path = dir.join("img.qed");
    if std::fs::write(&path, image).is_err() {
        return;
    }
    common::Run::new(&path, dir, Format::Qed).program(program);
});

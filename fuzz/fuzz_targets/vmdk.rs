//! Untrusted bytes opened as vmdk: open, info, map the whole range, read every mapped byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
#[allow(unused_imports)]
use vimg::Format;

fuzz_target!(|data: &[u8]| {
    vimg::fuzzing::open_and_read_all(data, Some(Format::Vmdk));
});

//! Untrusted bytes as a pipeline source: xz index, zstd frame walk, bounded decoding, OVA
//! tar and OVF parsing, ISO detection.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vimg::fuzzing::open_container_bytes(data);
});

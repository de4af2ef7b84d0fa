//! The VMDK descriptor parser on arbitrary text: it must not panic, and what it parses must
//! survive write -> parse unchanged (and writing again gives the same text).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vimg::formats::vmdk::descriptor::Descriptor;

fuzz_target!(|data: &[u8]| {
    let Ok(d) = Descriptor::parse_bytes(data) else {
        return;
    };
    let text = d.write();
    let again = Descriptor::parse(&text).expect("a written descriptor must parse");
    assert_eq!(again, d.canonical(), "parse -> write -> parse changed the descriptor");
    assert_eq!(again.write(), text, "writing is not a fixed point");
});

//! qemu-img's words alone, in qemu-img compatibility mode.
//!
//! Where qemu-img has a message for a condition, vimg prints that message and, under its own
//! name, adds what it found in parentheses ("Image is too big (virtual size N exceeds
//! vimg's limit of M bytes)"). A program that calls `qemu-img` matches qemu-img's text
//! exactly (QEMU's own iotests do), so in compatibility mode the parenthesised detail after
//! one of these messages is left out.

/// qemu-img messages that vimg follows with a parenthesised detail, each with the number of
/// parenthesised groups that belong to qemu-img's own message ("unsupported VDI image
/// (block size 1048575 is not 1048576)" is qemu-img's; the group after it is vimg's). A `#`
/// stands for a decimal number in qemu-img's message.
const WORDS: &[(&str, usize)] = &[
    ("Image is too big", 0),
    ("unsupported VDI image", 1),
    ("Unsupported VDI image size", 1),
    ("Max Table Entries too large", 1),
    ("L1 size too big", 0),
    ("L2 table size too big", 0),
    ("L1 entry size is invalid", 0),
    ("Invalid granularity, image may be corrupt", 0),
    ("File truncated, expecting at least # bytes", 0),
    ("Missing CRYPTO header for crypt method 2", 0),
];

/// qemu-img's message that quotes a line of the image, and the start of the detail vimg
/// puts after the quoted line.
const QUOTING: &[(&str, &str)] = &[("Invalid extent line: ", " (descriptor line ")];

/// The end of `word` (with `#` for a decimal number) when `s` starts with it.
fn word_end(s: &str, word: &str) -> Option<usize> {
    let mut at = 0;
    for (k, part) in word.split('#').enumerate() {
        if k > 0 {
            let digits = s[at..].bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return None;
            }
            at += digits;
        }
        s[at..].strip_prefix(part)?;
        at += part.len();
    }
    Some(at)
}

/// `msg` with the detail after each of qemu-img's messages removed.
pub fn plain(msg: &str) -> String {
    let mut out = msg.to_string();
    for &(quote, detail) in QUOTING {
        if let Some(i) = out.find(quote) {
            if let Some(d) = out[i..].rfind(detail).map(|d| d + i) {
                if let Some(close) = matching_paren(&out[d + 1..]).map(|c| c + d + 1) {
                    out.replace_range(d..=close, "");
                }
            }
        }
    }
    for &(w, keep) in WORDS {
        let head = w.split('#').next().unwrap_or(w);
        let mut from = 0;
        while let Some(i) = out[from..].find(head).map(|i| i + from) {
            let Some(len) = word_end(&out[i..], w) else {
                from = i + 1;
                continue;
            };
            // Past qemu-img's own groups.
            let mut end = i + len;
            let mut whole = true;
            for _ in 0..keep {
                match out[end..]
                    .strip_prefix(" (")
                    .and_then(|_| matching_paren(&out[end + 1..]))
                {
                    Some(c) => end = end + 1 + c + 1,
                    None => {
                        whole = false;
                        break;
                    }
                }
            }
            if !whole || !out[end..].starts_with(" (") {
                from = end.max(i + 1);
                continue;
            }
            let open = end + 1;
            let Some(close) = matching_paren(&out[open..]).map(|c| c + open) else {
                break;
            };
            // " (detail)" goes; what follows stays.
            out.replace_range(end..=close, "");
            from = end;
        }
    }
    out
}

/// The index of the `)` that closes the `(` at the start of `s`.
fn matching_paren(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::plain;

    #[test]
    fn detail_after_qemu_words_goes() {
        assert_eq!(
            plain("Could not open 't.qcow2': Image is too big (virtual size 1 exceeds vimg's limit of 2 bytes)"),
            "Could not open 't.qcow2': Image is too big"
        );
        assert_eq!(
            plain("Image is too big (a (nested) detail) and more"),
            "Image is too big and more"
        );
        // Other messages, and an unclosed parenthesis, stay as they are.
        assert_eq!(
            plain("L2 table (at 0x1000) bad"),
            "L2 table (at 0x1000) bad"
        );
        assert_eq!(plain("Image is too big (oops"), "Image is too big (oops");
        assert_eq!(plain("Image is too big"), "Image is too big");
        // qemu-img's message has its own parenthesis; the one after it is vimg's.
        assert_eq!(
            plain("Could not open 'x': unsupported VDI image (block size 1 is not 2) (block size at 0x178)"),
            "Could not open 'x': unsupported VDI image (block size 1 is not 2)"
        );
        assert_eq!(
            plain("unsupported VDI image (non-NULL link UUID)"),
            "unsupported VDI image (non-NULL link UUID)"
        );
        assert_eq!(
            plain("Unsupported VDI image size (size is 0x2, max supported is 0x1) (disk size at 0x170)"),
            "Unsupported VDI image size (size is 0x2, max supported is 0x1)"
        );
        // A number inside qemu-img's words.
        assert_eq!(
            plain("Could not open 'x': File truncated, expecting at least 13172736 bytes (extent 1: the metadata (overHead 0x6480 sectors) runs past the end)"),
            "Could not open 'x': File truncated, expecting at least 13172736 bytes"
        );
        assert_eq!(
            plain("File truncated, expecting at least many bytes (x)"),
            "File truncated, expecting at least many bytes (x)"
        );
        assert_eq!(
            plain("L1 size too big (extent 1: capacity)"),
            "L1 size too big"
        );
        // A quoted line keeps its own parentheses; vimg's detail after it goes.
        assert_eq!(
            plain("Could not open 'x': Invalid extent line: RW 1 VMFS \"a (1).vmdk\" 1 (descriptor line 8: a VMFS extent takes no offset other than 0)"),
            "Could not open 'x': Invalid extent line: RW 1 VMFS \"a (1).vmdk\" 1"
        );
    }
}

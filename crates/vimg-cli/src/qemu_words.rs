//! qemu-img's words alone, in qemu-img compatibility mode.
//!
//! Where qemu-img has a message for a condition, vimg prints that message and, under its own
//! name, adds what it found in parentheses ("Image is too big (virtual size N exceeds
//! vimg's limit of M bytes)"). A program that calls `qemu-img` matches qemu-img's text
//! exactly (QEMU's own iotests do), so in compatibility mode the parenthesised detail after
//! one of these messages is left out.

/// qemu-img messages that vimg follows with a parenthesised detail, each with the number of
/// parenthesised groups that belong to qemu-img's own message ("unsupported VDI image
/// (block size 1048575 is not 1048576)" is qemu-img's; the group after it is vimg's).
const WORDS: &[(&str, usize)] = &[
    ("Image is too big", 0),
    ("unsupported VDI image", 1),
    ("Unsupported VDI image size", 1),
    ("Max Table Entries too large", 1),
    ("Missing CRYPTO header for crypt method 2", 0),
];

/// `msg` with the detail after each of qemu-img's messages removed.
pub fn plain(msg: &str) -> String {
    let mut out = msg.to_string();
    for &(w, keep) in WORDS {
        let pat = format!("{w} (");
        let mut from = 0;
        while let Some(i) = out[from..].find(&pat).map(|i| i + from) {
            // Past qemu-img's own groups.
            let mut end = i + w.len();
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
    }
}

//! qemu-img's words alone, in qemu-img compatibility mode.
//!
//! Where qemu-img has a message for a condition, vimg prints that message and, under its own
//! name, adds what it found in parentheses ("Image is too big (virtual size N exceeds
//! vimg's limit of M bytes)"). A program that calls `qemu-img` matches qemu-img's text
//! exactly (QEMU's own iotests do), so in compatibility mode the parenthesised detail after
//! one of these messages is left out.

/// qemu-img messages that vimg follows with a parenthesised detail.
const WORDS: &[&str] = &["Image is too big"];

/// `msg` with the detail after each of qemu-img's messages removed.
pub fn plain(msg: &str) -> String {
    let mut out = msg.to_string();
    for w in WORDS {
        let pat = format!("{w} (");
        let mut from = 0;
        while let Some(i) = out[from..].find(&pat).map(|i| i + from) {
            let open = i + w.len() + 1;
            let Some(close) = matching_paren(&out[open..]).map(|c| c + open) else {
                break;
            };
            // " (detail)" goes; what follows stays.
            out.replace_range(i + w.len()..=close, "");
            from = i + w.len();
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
    }
}

//! QEMU's JSON dialect on the command line: besides standard JSON, QEMU's parser takes
//! strings in single quotes (`json:{'driver':'qcow2','file':{...}}`, as iotest 110 and
//! scripts write them). They are rewritten into standard JSON before serde_json reads them.

use std::borrow::Cow;

/// `s` with every single-quoted string turned into a double-quoted one (`\'` inside it
/// becomes `'`, a bare `"` becomes `\"`); double-quoted strings and everything else are
/// left as they are. Malformed input stays malformed for the JSON parser to report.
pub fn to_standard(s: &str) -> Cow<'_, str> {
    if !s.contains('\'') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push('"');
                while let Some(d) = chars.next() {
                    out.push(d);
                    match d {
                        '\\' => {
                            if let Some(e) = chars.next() {
                                out.push(e);
                            }
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '\'' => {
                out.push('"');
                while let Some(d) = chars.next() {
                    match d {
                        '\\' => match chars.next() {
                            Some('\'') => out.push('\''),
                            Some(e) => {
                                out.push('\\');
                                out.push(e);
                            }
                            None => out.push('\\'),
                        },
                        '"' => out.push_str("\\\""),
                        '\'' => break,
                        d => out.push(d),
                    }
                }
                out.push('"');
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::to_standard;

    #[test]
    fn single_quotes_become_double() {
        assert_eq!(
            to_standard("{'driver':'qcow2','file':{'driver':'file','filename':'/a b'}}"),
            r#"{"driver":"qcow2","file":{"driver":"file","filename":"/a b"}}"#
        );
        assert_eq!(to_standard(r#"{'a':'it\'s "x"'}"#), r#"{"a":"it's \"x\""}"#);
        // Double-quoted strings keep their quotes and escapes, single quotes inside too.
        assert_eq!(to_standard(r#"{"a":"b'c\"d"}"#), r#"{"a":"b'c\"d"}"#);
        assert_eq!(to_standard(r#"{"a":1}"#), r#"{"a":1}"#);
    }
}

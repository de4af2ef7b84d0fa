//! Human-readable output in qemu-img's layout: sizes as "1 GiB (1073741824 bytes)", JSON
//! pretty-printed with qemu's four-space indent, and format-specific blocks as indented
//! "key: value" lines.

use serde_json::Value;

/// qemu's `%0.3g`: three significant digits, trailing zeros dropped. Rust's float
/// formatting rounds the exact binary value half-to-even, as glibc's printf does.
fn fmt_g3(x: f64) -> String {
    if x == 0.0 {
        return "0".to_string();
    }
    let sci = format!("{x:.2e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..3).contains(&exp) {
        let m = trim_zeros(mant.to_string());
        return format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    trim_zeros(format!("{x:.decimals$}"))
}

fn trim_zeros(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// qemu's `size_to_str`: "196 KiB", "1.26 MiB", "1 GiB".
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // The unit switches up once the integer part would reach 1000.
    let scaled = val as f64 / (1000.0 / 1024.0);
    let mut i = 0usize;
    if scaled >= 1.0 {
        let e = scaled.log2().floor() as i64 + 1; // frexp exponent
        i = (((e - 1) / 10).max(0) as usize).min(SUFFIXES.len() - 1);
    }
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(val as f64 / div), SUFFIXES[i])
}

/// QEMU's QDict hash (`tdb_hash` in qobject/qdict.c) of a key.
fn qdict_hash(key: &str) -> u32 {
    let mut value = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, b) in key.bytes().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

/// QDict's bucket count: qemu prints a dictionary's keys bucket by bucket.
const QDICT_BUCKETS: u32 = 512;

/// The keys of an object in the order qemu prints a QDict: by hash bucket, and within a
/// bucket the last inserted first. Scripts that compare qemu-img's JSON as text see the same
/// text from vimg.
/// vimg's own keys (`vimg-*`, `image-service`) follow qemu's, in insertion order.
fn is_vimg_key(k: &str) -> bool {
    k.starts_with("vimg-") || k == "image-service"
}

/// The order of an object's keys as qemu prints them.
fn qdict_order(m: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut v: Vec<(usize, &String, &Value)> =
        m.iter().enumerate().map(|(i, (k, x))| (i, k, x)).collect();
    v.sort_by_key(|(i, k, _)| {
        if is_vimg_key(k) {
            (1, 0, *i as i64)
        } else {
            (0, qdict_hash(k) % QDICT_BUCKETS, -(*i as i64))
        }
    });
    v.into_iter().map(|(_, k, x)| (k, x)).collect()
}

/// JSON in qemu-img's layout (four-space indent, `[\n    ]` for empty arrays, keys in
/// QDict order).
pub fn qemu_json(v: &Value) -> String {
    let mut out = String::new();
    write_json(v, 0, true, &mut out);
    out.push('\n');
    out
}

/// Writes `v`; objects in QDict order when `qemu_order`, else as inserted (vimg's own
/// objects, which qemu never prints).
fn write_json(v: &Value, indent: usize, qemu_order: bool, out: &mut String) {
    let pad = |n: usize| " ".repeat(n * 4);
    match v {
        Value::Array(a) => {
            out.push_str("[\n");
            for (i, x) in a.iter().enumerate() {
                out.push_str(&pad(indent + 1));
                write_json(x, indent + 1, qemu_order, out);
                if i + 1 < a.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push(']');
        }
        Value::Object(m) => {
            out.push_str("{\n");
            let n = m.len();
            let keys = if qemu_order {
                qdict_order(m)
            } else {
                m.iter().collect()
            };
            for (i, (k, x)) in keys.into_iter().enumerate() {
                out.push_str(&pad(indent + 1));
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_json(x, indent + 1, qemu_order && !is_vimg_key(k), out);
                if i + 1 < n {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A name read from an image, as human output prints it: control characters escaped
/// ([`vimg::escape::escape_control`]), so an image cannot move the cursor or rewrite a line.
pub fn esc(name: &str) -> std::borrow::Cow<'_, str> {
    vimg::escape::escape_control(name)
}

/// An error message as the terminal shows it: every control character but a line break
/// written as `\xNN`. Messages mix the user's own text (kept as typed, backslashes too)
/// with names from images, which the library escapes where it knows them; this is the
/// last line of defence for any it does not.
pub fn esc_message(msg: &str) -> std::borrow::Cow<'_, str> {
    if !msg.chars().any(|c| c.is_control() && c != '\n') {
        return std::borrow::Cow::Borrowed(msg);
    }
    let mut out = String::with_capacity(msg.len() + 8);
    for c in msg.chars() {
        match c {
            '\n' => out.push(c),
            c if (c as u32) < 0x80 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// qemu's human dump of a QAPI object: `key: value` lines, `-` in keys shown as spaces,
/// nested objects and lists indented by four, list items as `[N]:`.
pub fn dump_value(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent * 4);
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let key = k.replace('-', " ");
                match x {
                    Value::Object(_) | Value::Array(_) => {
                        out.push_str(&format!("{pad}{key}:\n"));
                        dump_value(x, indent + 1, out);
                    }
                    _ => out.push_str(&format!("{pad}{key}: {}\n", scalar(x))),
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                match x {
                    Value::Object(_) | Value::Array(_) => {
                        out.push_str(&format!("{pad}[{i}]:\n"));
                        dump_value(x, indent + 1, out);
                    }
                    _ => out.push_str(&format!("{pad}[{i}]: {}\n", scalar(x))),
                }
            }
        }
        x => out.push_str(&format!("{pad}{}\n", scalar(x))),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        // Strings here come from the image (extent names, locators): escaped.
        Value::String(s) => esc(s).into_owned(),
        Value::Null => String::new(),
        x => x.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_names_are_escaped() {
        assert_eq!(esc_message("a\x1b[2Kb\r\nc\\d"), "a\\x1b[2Kb\\x0d\nc\\d");
        assert_eq!(esc("x\x07"), "x\\x07");
        let mut out = String::new();
        dump_value(
            &serde_json::json!({"filename": "e\x1b]0;safe\x07"}),
            0,
            &mut out,
        );
        assert_eq!(out, "filename: e\\x1b]0;safe\\x07\n");
    }

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(1323008), "1.26 MiB");
        assert_eq!(size_to_str(1442304), "1.38 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(10485760), "10 MiB");
    }

    #[test]
    fn keys_in_qemu_order() {
        // Key orders qemu-img 10 printed for check and info.
        let v = serde_json::json!({
            "filename": "c.qcow2", "format": "qcow2", "check-errors": 0,
            "image-end-offset": 1, "total-clusters": 2, "allocated-clusters": 3,
            "fragmented-clusters": 4, "compressed-clusters": 5
        });
        let keys: Vec<&str> = match &v {
            Value::Object(m) => qdict_order(m)
                .into_iter()
                .map(|(k, _)| k.as_str())
                .collect(),
            _ => unreachable!(),
        };
        assert_eq!(
            keys,
            [
                "image-end-offset",
                "compressed-clusters",
                "total-clusters",
                "check-errors",
                "allocated-clusters",
                "filename",
                "format",
                "fragmented-clusters"
            ]
        );
    }

    #[test]
    fn json_layout() {
        let v: Value = serde_json::json!({"a": [], "b": {"c": 1}});
        assert_eq!(
            qemu_json(&v),
            "{\n    \"a\": [\n    ],\n    \"b\": {\n        \"c\": 1\n    }\n}\n"
        );
    }
}

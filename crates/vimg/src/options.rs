//! Creation options (`-o key=value,...`), checked against each format's list of options
//! before anything is created, and size strings with qemu-img's suffixes.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// The type of an option value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionType {
    /// A byte size with an optional K/M/G/T/P/E suffix.
    Size,
    /// on/off (also true/false, yes/no).
    Bool,
    /// A non-negative integer.
    Number,
    /// Free text (or one of a fixed set, checked by the format).
    Str,
}

impl OptionType {
    fn help_name(self) -> &'static str {
        match self {
            OptionType::Size => "<size>",
            OptionType::Bool => "<bool (on/off)>",
            OptionType::Number => "<num>",
            OptionType::Str => "<str>",
        }
    }
}

/// One option a format accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionSpec {
    /// The key, as qemu-img spells it.
    pub name: &'static str,
    /// The value's type.
    pub ty: OptionType,
    /// One line of help, as `-o help` prints it.
    pub help: &'static str,
}

/// Options every format accepts.
pub const SIZE_OPTION: OptionSpec = OptionSpec {
    name: "size",
    ty: OptionType::Size,
    help: "Virtual disk size",
};

/// The `file` protocol's create options (QEMU's file-posix), which qemu-img accepts under
/// every format and lists in `-o help` once a target file name is given. vimg accepts
/// `extent_size_hint` and `nocow` for every format as the hints they are (they change no
/// byte of the image; vimg does not apply them); `preallocation` only where the format
/// declares it.
pub const PROTOCOL_OPTIONS: [OptionSpec; 3] = [
    OptionSpec {
        name: "extent_size_hint",
        ty: OptionType::Size,
        help: "Extent size hint for the image file, 0 to disable",
    },
    OptionSpec {
        name: "nocow",
        ty: OptionType::Bool,
        help: "Turn off copy-on-write (valid only on btrfs)",
    },
    OptionSpec {
        name: "preallocation",
        ty: OptionType::Str,
        help: "Preallocation mode (allowed values: off, falloc, full)",
    },
];

/// `-o help` with a target file name, as qemu-img prints it: the format's options and the
/// protocol's in one sorted list (the format's win where both have one).
pub fn help_text_for_file(specs: &[OptionSpec]) -> String {
    let mut all: Vec<&OptionSpec> = specs.iter().collect();
    for p in &PROTOCOL_OPTIONS {
        if !all.iter().any(|s| s.name == p.name) {
            all.push(p);
        }
    }
    all.sort_by_key(|s| s.name);
    let mut out = "Supported options:\n".to_string();
    for s in all {
        let left = format!("{}={}", s.name, s.ty.help_name());
        out.push_str(&format!("  {left:<22} - {}\n", s.help));
    }
    out
}

/// Formats `-o help` output for `format` with `specs`, in qemu-img's layout (without a
/// target file name: the protocol's options are not listed).
pub fn help_text(format: &str, specs: &[OptionSpec]) -> String {
    let mut specs: Vec<&OptionSpec> = specs
        .iter()
        .filter(|s| !PROTOCOL_OPTIONS.contains(s))
        .collect();
    specs.sort_by_key(|s| s.name);
    let mut out = format!("Supported {format} options:\n");
    for s in specs {
        let left = format!("{}={}", s.name, s.ty.help_name());
        out.push_str(&format!("  {left:<22} - {}\n", s.help));
    }
    // qemu-img's closing lines, so output compared with qemu-img's matches.
    out.push_str(
        "\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n",
    );
    out
}

/// Parsed and checked `-o` options for one format, plus `-c`.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct CreateOptions {
    values: BTreeMap<String, String>,
    /// `-c`: compress data (formats that cannot compress refuse it).
    pub compress: bool,
    /// How a driver opens a file these options name (set by the library before it calls a
    /// driver's `create`).
    open_named: Option<crate::formats::OpenNamed>,
    /// The format these options were checked for ([`CreateOptions::check_for`]); cleared by
    /// any change.
    pub(crate) checked_for: Option<crate::formats::Format>,
}

impl CreateOptions {
    /// No options.
    pub fn new() -> CreateOptions {
        CreateOptions::default()
    }

    /// Parses `key=value,key2=value2` (qemu's syntax: `,,` is a literal comma) and appends
    /// to these options. Later keys win.
    pub fn parse_into(&mut self, spec: &str) -> Result<()> {
        self.checked_for = None;
        for item in split_commas(spec) {
            if item.is_empty() {
                continue;
            }
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k.trim().to_string(), v.to_string()),
                // A bare key means "on" for booleans, as in qemu.
                None => (item.trim().to_string(), "on".to_string()),
            };
            self.values.insert(k, v);
        }
        Ok(())
    }

    /// Sets one option.
    pub fn set(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        self.checked_for = None;
        self.values.insert(key.to_string(), value.into());
        self
    }

    /// Builder form of [`CreateOptions::set`].
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.set(key, value);
        self
    }

    /// These options with the library's way of opening the images they name.
    pub(crate) fn with_open_named(&self, f: crate::formats::OpenNamed) -> CreateOptions {
        CreateOptions {
            open_named: Some(f),
            ..self.clone()
        }
    }

    /// Opens an image these options name (a backing file), as the library opens any image
    /// the user names: probed, without its backing chain.
    pub fn open_named(
        &self,
        path: &std::path::Path,
    ) -> Result<Box<dyn crate::mapping::ImageReader>> {
        match self.open_named {
            Some(f) => f(path),
            None => Err(Error::unsupported(format!(
                "'{}' cannot be opened here: create the image through vimg::create or vimg::convert",
                path.display()
            ))),
        }
    }

    /// True if `key` was given.
    pub fn has(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    /// The keys given, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// Fails with qemu-img's message on a key `specs` does not list or a value of the wrong
    /// type.
    pub fn check(&self, specs: &[OptionSpec]) -> Result<()> {
        for (k, v) in &self.values {
            let Some(spec) = specs.iter().find(|s| s.name == k) else {
                return Err(Error::invalid_argument(format!("Invalid parameter '{k}'")));
            };
            match spec.ty {
                OptionType::Size => {
                    parse_size(v).map_err(|_| {
                        Error::invalid_argument(format!(
                            "Parameter '{k}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
                        ))
                    })?;
                }
                OptionType::Bool => {
                    parse_bool(v).ok_or_else(|| {
                        Error::invalid_argument(format!("Parameter '{k}' expects 'on' or 'off'"))
                    })?;
                }
                OptionType::Number => {
                    parse_number(k, v)?;
                }
                OptionType::Str => {}
            }
        }
        Ok(())
    }

    /// A string option.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// A boolean option (`default` when absent).
    pub fn get_bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.values.get(key) {
            None => Ok(default),
            Some(v) => parse_bool(v).ok_or_else(|| {
                Error::invalid_argument(format!("Parameter '{key}' expects 'on' or 'off'"))
            }),
        }
    }

    /// A size option.
    pub fn get_size(&self, key: &str) -> Result<Option<u64>> {
        self.values
            .get(key)
            .map(|v| {
                parse_size(v).map_err(|_| {
                    Error::invalid_argument(format!("Parameter '{key}' expects a size, got '{v}'"))
                })
            })
            .transpose()
    }

    /// A number option.
    pub fn get_number(&self, key: &str) -> Result<Option<u64>> {
        self.values
            .get(key)
            .map(|v| parse_number(key, v))
            .transpose()
    }
}

/// A number option as QEMU reads one (`qemu_strtou64` with base 0): decimal, `0x` hex or
/// leading-`0` octal, and a leading `-` negates modulo 2^64 as `strtoull` does (so
/// `refcount_bits=-1` is a huge width, refused by the format's own check as in qemu-img).
/// qemu-img's messages for what is not a number and what does not fit.
pub fn parse_number(key: &str, v: &str) -> Result<u64> {
    let not_number = || Error::invalid_argument(format!("Parameter '{key}' expects a number"));
    let t = v.trim_start();
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (digits, radix) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        (&t[1..], 8)
    } else {
        (t, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(not_number());
    }
    let n = u64::from_str_radix(digits, radix).map_err(|_| {
        Error::invalid_argument(format!("Value '{v}' is too large for parameter '{key}'"))
    })?;
    Ok(if neg { n.wrapping_neg() } else { n })
}

fn split_commas(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// on/off, true/false, yes/no (qemu accepts the first two pairs).
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim() {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// Why a size string is refused; it becomes an [`Error`] of kind
/// [`InvalidArgument`](crate::ErrorKind::InvalidArgument).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    /// Not a number (with an optional fraction).
    #[error("invalid size '{0}'")]
    Invalid(String),
    /// A suffix other than b, k, M, G, T, P, E (and their long forms).
    #[error("invalid size suffix in '{0}'")]
    Suffix(String),
    /// The value does not fit 64 bits.
    #[error("size '{0}' is too large")]
    TooLarge(String),
}

impl From<SizeError> for Error {
    fn from(e: SizeError) -> Self {
        Error::new(crate::ErrorKind::InvalidArgument, e)
    }
}

/// Parses a size: a number with an optional fraction and a suffix `b`, `k`/`K`, `M`, `G`,
/// `T`, `P`, `E` (powers of 1024). A bare number is bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, SizeError> {
    let s = s.trim();
    let invalid = || SizeError::Invalid(s.to_string());
    let too_large = || SizeError::TooLarge(s.to_string());
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        // As qemu's sizes: hexadecimal takes no fraction and no suffix (iotest 214).
        return u64::from_str_radix(hex, 16).map_err(|_| invalid());
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() {
        return Err(invalid());
    }
    let shift = match suffix.trim() {
        "" | "b" | "B" => 0,
        "k" | "K" | "KiB" | "kB" => 10,
        "m" | "M" | "MiB" | "MB" => 20,
        "g" | "G" | "GiB" | "GB" => 30,
        "t" | "T" | "TiB" | "TB" => 40,
        "p" | "P" | "PiB" | "PB" => 50,
        "e" | "E" | "EiB" | "EB" => 60,
        _ => return Err(SizeError::Suffix(s.to_string())),
    };
    if let Some((int, frac)) = num.split_once('.') {
        let int: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| invalid())?
        };
        let frac_val: f64 = format!("0.{frac}").parse().map_err(|_| invalid())?;
        let whole = int.checked_mul(1u64 << shift).ok_or_else(too_large)?;
        let part = (frac_val * (1u64 << shift) as f64) as u64;
        whole.checked_add(part).ok_or_else(too_large)
    } else {
        let n: u64 = num.parse().map_err(|_| invalid())?;
        n.checked_mul(1u64 << shift).ok_or_else(too_large)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("0x10000").unwrap(), 65536);
        assert_eq!(parse_size("0X1f").unwrap(), 31);
        assert!(parse_size("0x10k").is_err());
        assert!(parse_size("0x1.5").is_err());
        assert!(parse_size("0x").is_err());
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("16T").unwrap(), 16 << 40);
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999E").is_err());
    }

    #[test]
    fn options_parse_and_check() {
        let mut o = CreateOptions::new();
        o.parse_into("cluster_size=2M,lazy_refcounts=on,backing_file=a,,b")
            .unwrap();
        assert_eq!(o.get_size("cluster_size").unwrap(), Some(2 << 20));
        assert!(o.get_bool("lazy_refcounts", false).unwrap());
        assert_eq!(o.get_str("backing_file"), Some("a,b"));
        let specs = [
            OptionSpec {
                name: "cluster_size",
                ty: OptionType::Size,
                help: "",
            },
            OptionSpec {
                name: "lazy_refcounts",
                ty: OptionType::Bool,
                help: "",
            },
        ];
        let e = o.check(&specs).unwrap_err();
        assert_eq!(e.to_string(), "Invalid parameter 'backing_file'");
        let mut o = CreateOptions::new();
        o.parse_into("lazy_refcounts=maybe").unwrap();
        assert!(o.check(&specs).is_err());
    }
}

//! Image names as the user gives them on the command line, read as qemu-img reads them:
//! a plain path, `file:PATH` (also `file:///PATH`), `json:{...}` block-device options, and,
//! with `--image-opts`, a `key=value,...` option string (`driver=qcow2,file.filename=x`).
//!
//! These are the user's and trusted: the options name the file and the format directly. The
//! same spellings found *inside* an image (a backing name `json:{...}`) never reach this
//! module; the gate refuses them as protocol paths.
//!
//! vimg supports the options that choose a local file and its format; an option that would
//! change how the image is read (another protocol, encryption, a backing node) is refused
//! rather than ignored, and options that only tune QEMU's I/O (cache modes, locking, AIO)
//! are accepted and have no effect.

use std::path::PathBuf;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::formats::Format;

/// What a command-line name asks to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserName {
    /// The file to open.
    pub path: PathBuf,
    /// The format the options name (`driver`), if any.
    pub format: Option<Format>,
    /// `false` when the options say `backing: null` (open the image without its chain).
    pub open_backing: bool,
    /// The raw driver's window into the file: `offset` and, if given, `size` in bytes.
    pub window: Option<(u64, Option<u64>)>,
    /// The secret id of `key-secret` (driver=luks) or `encrypt.key-secret` (qcow2).
    pub key_secret: Option<String>,
    /// The `backing.*` options: the backing image's file, driver and secret (qemu-img's
    /// way of giving an encrypted backing file its key, iotest 198). vimg opens the
    /// backing file the image names; these must name that same file.
    pub backing: Option<Box<UserName>>,
    /// `cache.direct=on` (or `file.cache.direct`): QEMU opens the file with `O_DIRECT`,
    /// which aligns block status to whole sectors ([`crate::formats::raw::RawReader`]).
    pub direct: bool,
    /// qcow2's `data-file.filename`: the external data file to open instead of the one the
    /// image names ([`crate::user_data_file`]).
    pub data_file: Option<PathBuf>,
}

/// Options that only tune QEMU's I/O or locking: accepted, no effect on what is read.
const IGNORED: &[&str] = &[
    "node-name",
    "read-only",
    "auto-read-only",
    "force-share",
    "discard",
    "detect-zeroes",
    "cache.direct",
    "cache.no-flush",
    "locking",
    "aio",
    "aio-max-batch",
    "pr-manager",
    "x-check-cache-dropped",
    "drop-cache",
    // qcow2's cache and discard tuning: how QEMU keeps tables in memory and passes discards
    // down, not what the image holds.
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-clean-interval",
    "overlap-check",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
    "lazy-refcounts",
];

fn ignored(key: &str) -> bool {
    let key = key.strip_prefix("file.").unwrap_or(key);
    IGNORED.contains(&key)
}

/// True when `name` is spelled in one of the forms this module reads rather than as a path.
pub fn is_special(name: &str) -> bool {
    name.starts_with("json:") || name.starts_with("file:")
}

/// Reads a command-line image name. `image_opts` is `--image-opts`: the name is then an
/// option string.
pub fn parse(name: &str, image_opts: bool) -> Result<UserName> {
    let pairs = if image_opts {
        parse_option_string(name)?
    } else if let Some(json) = name.strip_prefix("json:") {
        let v: Value = serde_json::from_str(&super::qjson::to_standard(json)).map_err(|e| {
            Error::invalid_argument(format!("Could not parse the JSON options of '{name}': {e}"))
        })?;
        let Value::Object(map) = v else {
            return Err(Error::invalid_argument(format!(
                "'{name}': the JSON options must be an object"
            )));
        };
        let mut pairs = Vec::new();
        flatten("", &Value::Object(map), &mut pairs)?;
        pairs
    } else if let Some(path) = name.strip_prefix("file:") {
        // qemu's file protocol takes what follows the prefix as the path; `file:///x` is the
        // path `///x`, which is `/x`.
        if path.is_empty() {
            return Err(Error::invalid_argument("'file:' names no file"));
        }
        // With the prefix gone, a colon before any slash would read as a protocol prefix
        // again ("file:image:top.qcow2"); qemu then names the file "./image:top.qcow2", and
        // so does vimg (info prints it, backing names resolve against it).
        let path = if path_has_protocol(path) {
            PathBuf::from(format!("./{path}"))
        } else {
            PathBuf::from(path)
        };
        return Ok(UserName {
            path,
            format: None,
            open_backing: true,
            window: None,
            key_secret: None,
            backing: None,
            direct: false,
            data_file: None,
        });
    } else {
        return Ok(UserName {
            path: PathBuf::from(name),
            format: None,
            open_backing: true,
            window: None,
            key_secret: None,
            backing: None,
            direct: false,
            data_file: None,
        });
    };
    from_pairs(name, &pairs)
}

/// True when `name` starts with what qemu reads as a protocol prefix: a colon before any
/// slash.
fn path_has_protocol(name: &str) -> bool {
    name.find([':', '/'])
        .is_some_and(|i| name.as_bytes()[i] == b':')
}

/// An `--image-opts` option string as `(key, value)` pairs (for [`crate::blkdebug`]).
pub(crate) fn option_pairs(s: &str) -> Result<Vec<(String, Option<String>)>> {
    parse_option_string(s)
}

/// `key=value,key=value`, with `,,` standing for a literal comma (QEMU's option syntax).
fn parse_option_string(s: &str) -> Result<Vec<(String, Option<String>)>> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    let mut pairs = Vec::new();
    for item in items.into_iter().filter(|i| !i.is_empty()) {
        match item.split_once('=') {
            Some((k, v)) => pairs.push((k.to_string(), Some(v.to_string()))),
            // A bare first item is the file name (QEMU's implied key `file`).
            None if pairs.is_empty() => pairs.push(("file.filename".to_string(), Some(item))),
            None => {
                return Err(Error::invalid_argument(format!(
                    "Invalid parameter '{item}' in the image options (expected key=value)"
                )))
            }
        }
    }
    Ok(pairs)
}

/// Flattens nested JSON objects into QEMU's dotted keys; `null` becomes a key without value.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, Option<String>)>) -> Result<()> {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out)?;
            }
        }
        Value::Null => out.push((prefix.to_string(), None)),
        Value::String(s) => out.push((prefix.to_string(), Some(s.clone()))),
        Value::Bool(b) => out.push((prefix.to_string(), Some(b.to_string()))),
        Value::Number(n) => out.push((prefix.to_string(), Some(n.to_string()))),
        Value::Array(_) => {
            return Err(Error::unsupported(format!(
                "option '{prefix}': lists are not supported in image options"
            )))
        }
    }
    Ok(())
}

fn from_pairs(name: &str, pairs: &[(String, Option<String>)]) -> Result<UserName> {
    let mut driver: Option<String> = None;
    let mut file_driver: Option<String> = None;
    let mut filename: Option<String> = None;
    let mut filename_key: Option<String> = None;
    let mut open_backing = true;
    let mut key_secret: Option<String> = None;
    let mut direct = false;
    let mut backing: Vec<(String, Option<String>)> = Vec::new();
    let mut data_file: Option<String> = None;
    let (mut offset, mut size): (Option<u64>, Option<u64>) = (None, None);
    let number = |k: &str, v: &Option<String>| -> Result<u64> {
        let v = v
            .as_deref()
            .ok_or_else(|| Error::invalid_argument(format!("image option '{k}' needs a value")))?;
        crate::options::parse_size(v).map_err(|_| {
            Error::invalid_argument(format!(
                "Parameter '{k}' expects a non-negative number below 2^64"
            ))
        })
    };
    let unsupported = |k: &str| {
        Error::unsupported(format!(
            "image option '{k}' is not supported by vimg (in '{name}')"
        ))
    };
    for (k, v) in pairs {
        let val = || v.clone().ok_or_else(|| unsupported(k));
        match k.as_str() {
            "driver" => driver = Some(val()?),
            "file.driver" => file_driver = Some(val()?),
            // `"file": "name"` (a file name instead of a node), `file.filename`, and the
            // protocol-level `filename` when the driver is the file itself.
            // The same key again takes the last value, as QEMU's option lists do (iotests
            // 293/294 wrap an --image-opts name inside another); two spellings conflict.
            "file" | "file.filename" | "filename" => {
                let again = filename_key.replace(k.clone()).is_some_and(|p| p == *k);
                if filename.replace(val()?).is_some() && !again {
                    return Err(Error::invalid_argument(format!(
                        "'{name}' names the file more than once"
                    )));
                }
            }
            "backing" if v.is_none() => open_backing = false,
            // The backing node's own options, read as a name of their own.
            k if k.starts_with("backing.") => {
                backing.push((k["backing.".len()..].to_string(), v.clone()));
            }
            // The passphrase of an encrypted image: luks names it `key-secret`, qcow2
            // `encrypt.key-secret`; the format checks which one it takes.
            "key-secret" | "encrypt.key-secret" => key_secret = Some(val()?),
            // qcow2's external data file as a file node of its own (iotest 061).
            "data-file.filename" => data_file = Some(val()?),
            "data-file.driver" => match v.as_deref() {
                Some("file" | "host_device") => {}
                _ => return Err(unsupported(k)),
            },
            "offset" => offset = Some(number(k, v)?),
            "size" => size = Some(number(k, v)?),
            "cache.direct" | "file.cache.direct" => {
                direct = match v.as_deref() {
                    Some("on" | "true" | "yes") => true,
                    Some("off" | "false" | "no") => false,
                    _ => {
                        return Err(Error::invalid_argument(format!(
                            "Parameter '{k}' expects 'on' or 'off'"
                        )))
                    }
                }
            }
            k if ignored(k) => {}
            k => return Err(unsupported(k)),
        }
    }
    if let Some(fd) = &file_driver {
        if fd != "file" && fd != "host_device" {
            return Err(Error::unsupported(format!(
                "protocol '{fd}' is not supported by vimg (only local files and devices)"
            )));
        }
    }
    let format =
        match driver.as_deref() {
            None => None,
            // The protocol layer named as the image: its bytes, as qemu-img shows them.
            Some("file") | Some("host_device") => Some(Format::Raw),
            Some(d) => Some(Format::from_name(d).ok_or_else(|| {
                Error::unsupported(format!("driver '{d}' is not supported by vimg"))
            })?),
        };
    // Only qcow2 has a data file (qemu's words for the other drivers).
    if let (Some(_), Some(d)) = (&data_file, driver.as_deref()) {
        if format != Some(Format::Qcow2) {
            return Err(Error::invalid_argument(format!(
                "Block format '{d}' does not support the option 'data-file.filename'"
            )));
        }
    }
    let window = match (offset, size) {
        (None, None) => None,
        _ if !format.is_some_and(Format::is_plain) || driver.as_deref() != Some("raw") => {
            return Err(Error::unsupported(
                "'offset' and 'size' are options of the raw driver only (driver=raw)",
            ))
        }
        (o, s) => {
            if s.is_some_and(|s| s % 512 != 0) {
                return Err(Error::invalid_argument(
                    "Specified size is not multiple of 512",
                ));
            }
            Some((o.unwrap_or(0), s))
        }
    };
    let Some(filename) = filename else {
        return Err(Error::invalid_argument(format!(
            "'{name}' does not name a file (file.filename)"
        )));
    };
    let backing = match backing.is_empty() {
        true => None,
        false if !open_backing => {
            return Err(Error::invalid_argument(format!(
                "'{name}' gives both 'backing: null' and backing options"
            )))
        }
        false => Some(Box::new(from_pairs(name, &backing)?)),
    };
    Ok(UserName {
        path: PathBuf::from(filename),
        format,
        open_backing,
        window,
        key_secret,
        backing,
        direct,
        data_file: data_file.map(PathBuf::from),
    })
}

/// Binds the secrets `u` names to the files it names ([`crate::secret::bind_file`]): the
/// image's `encrypt.key-secret` / `key-secret`, and its backing files' through `backing.`.
pub fn bind_keys(u: &UserName) {
    if let Some(id) = &u.key_secret {
        crate::secret::bind_file(&u.path, id);
    }
    if let Some(d) = &u.data_file {
        crate::user_data_file::bind(&u.path, d);
    }
    if let Some(b) = &u.backing {
        bind_keys(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, opts: bool) -> UserName {
        parse(name, opts).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn plain_and_file_names() {
        assert_eq!(p("a.qcow2", false).path, PathBuf::from("a.qcow2"));
        assert_eq!(p("file:a.qcow2", false).path, PathBuf::from("a.qcow2"));
        let u = p("file:///var/x.img", false);
        assert_eq!(u.path, PathBuf::from("///var/x.img"));
        assert_eq!(
            std::fs::canonicalize("///").ok(),
            std::fs::canonicalize("/").ok()
        );
        assert!(parse("file:", false).is_err());
    }

    #[test]
    fn json_names() {
        let u = p(
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"/x/a.qcow2"}}"#,
            false,
        );
        assert_eq!(u.path, PathBuf::from("/x/a.qcow2"));
        assert_eq!(u.format, Some(Format::Qcow2));
        assert!(u.open_backing);
        let u = p(
            r#"json:{"driver":"raw","file.filename":"b,c.img","file.locking":"off","backing":null}"#,
            false,
        );
        assert_eq!(u.path, PathBuf::from("b,c.img"));
        assert_eq!(u.format, Some(Format::Raw));
        let u = p(
            r#"json:{"driver":"qcow2","file":"a.qcow2","backing":null}"#,
            false,
        );
        assert!(!u.open_backing);
        let u = p(r#"json:{"driver":"file","filename":"/dev/null"}"#, false);
        assert_eq!(u.format, Some(Format::Raw));
        for bad in [
            r#"json:{"driver":"qcow2","file":{"driver":"nbd","server":{"host":"h"}}}"#,
            r#"json:{"driver":"qcow2","file.filename":"a","backing":"node0"}"#,
            r#"json:{"driver":"nosuch","file.filename":"a"}"#,
            r#"json:{"driver":"qcow2"}"#,
            r#"json:["a"]"#,
            r#"json:{"#,
        ] {
            assert!(parse(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn repeated_filename_takes_the_last() {
        // iotests 293/294 wrap an --image-opts name in another: QEMU's option list keeps
        // the last file.filename and key-secret.
        let u = p(
            "driver=luks,file.filename=driver=luks,key-secret=k0,file.filename=/x/t.luks,key-secret=sec1",
            true,
        );
        assert_eq!(u.path, PathBuf::from("/x/t.luks"));
        assert_eq!(u.key_secret.as_deref(), Some("sec1"));
        assert!(parse("driver=raw,file=/x/a,file.filename=/x/b", true).is_err());
    }

    #[test]
    fn backing_options_name_the_backing_file_and_its_key() {
        let u = p(
            "driver=qcow2,file.filename=t.qcow2,encrypt.key-secret=sec1,backing.driver=qcow2,\
             backing.file.filename=b.qcow2,backing.encrypt.key-secret=sec0",
            true,
        );
        assert_eq!(u.key_secret.as_deref(), Some("sec1"));
        let b = u.backing.as_deref().expect("backing options");
        assert_eq!(b.path, PathBuf::from("b.qcow2"));
        assert_eq!(b.format, Some(Format::Qcow2));
        assert_eq!(b.key_secret.as_deref(), Some("sec0"));
        let j = p(
            r#"json:{"driver":"qcow2","file":"t","backing":{"file":{"filename":"b"},"encrypt":{"key-secret":"s"}}}"#,
            false,
        );
        let b = j.backing.as_deref().expect("json backing options");
        assert_eq!(b.key_secret.as_deref(), Some("s"));
        // Options the backing node does not take are refused, not ignored.
        assert!(parse(
            "driver=qcow2,file.filename=t,backing.file.filename=b,backing.x=1",
            true
        )
        .is_err());
        assert!(parse("driver=qcow2,file.filename=t,backing.driver=qcow2", true).is_err());
    }

    #[test]
    fn image_opts() {
        let u = p(
            "driver=qcow2,file.filename=/x/a,,b.qcow2,file.aio=threads",
            true,
        );
        assert_eq!(u.path, PathBuf::from("/x/a,b.qcow2"));
        assert_eq!(u.format, Some(Format::Qcow2));
        let u = p(
            "driver=qcow2,file.filename=a,l2-cache-size=1M,cache.direct=on",
            true,
        );
        assert_eq!(u.format, Some(Format::Qcow2));
        let u = p("driver=file,filename=disk.img", true);
        assert_eq!(u.format, Some(Format::Raw));
        assert!(parse("driver=qcow2,file.filename=a,bogus=1", true).is_err());
        let u = p("driver=raw,offset=1M,size=4096,file.filename=d", true);
        assert_eq!(u.window, Some((1 << 20, Some(4096))));
        let u = p(r#"json:{"driver":"raw","offset":512,"file":"d"}"#, false);
        assert_eq!(u.window, Some((512, None)));
        assert!(parse("driver=raw,size=100,file.filename=d", true).is_err());
        assert!(parse("driver=qcow2,offset=512,file.filename=d", true).is_err());
        assert!(parse("driver=raw,offset=-1,file.filename=d", true).is_err());
        assert!(parse("driver=qcow2", true).is_err());
    }
}

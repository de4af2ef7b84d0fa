//! Reading the user's blkdebug names and opening the layer they describe: between a format
//! and its file ([`Level::File`]: the format reads its file through the rules, data reads
//! fire `read_aio`), or above a whole image ([`Level::Guest`]: guest reads and block-status
//! queries go through the rules, as in `json:{"driver": "blkdebug", "image": {...}}`).

use std::collections::BTreeMap;
use std::io;
use std::os::unix::io::RawFd;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::rules::{parse_config, Blkdebug, Event, IoType, RawRule, Section};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::Format;
use crate::storage::Storage;

/// Where the layer sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Level {
    /// Between a format (probed, or the one named) and the file.
    File,
    /// Above a whole image.
    Guest,
}

/// A blkdebug name the user gave, read.
#[derive(Clone, Debug)]
pub struct BlkdebugName {
    /// Where the layer sits.
    pub level: Level,
    /// [`Level::File`]: the file. [`Level::Guest`]: the name of the image below (a path or a
    /// `json:` name).
    pub inner: String,
    /// [`Level::File`]: the format above the layer, when named.
    pub format: Option<Format>,
    /// False when the options say `backing: null`.
    pub open_backing: bool,
    /// The name as the user gave it, for messages.
    pub shown: String,
    pub(crate) rules: Vec<RawRule>,
    pub(crate) align: u64,
}

/// Options of any node that only tune QEMU's I/O: accepted, no effect.
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
    "max-transfer",
    "opt-write-zero",
    "max-write-zero",
    "opt-discard",
    "max-discard",
];

/// Reads `name` when it asks for blkdebug; `None` when it does not (then it is another kind
/// of name, for [`crate::source::cmdline`]).
pub fn parse_name(name: &str, image_opts: bool) -> Result<Option<BlkdebugName>> {
    if !image_opts {
        if let Some(rest) = name.strip_prefix("blkdebug:") {
            let (config, file) = rest.split_once(':').ok_or_else(|| {
                Error::invalid_argument("blkdebug requires both config file and image path")
            })?;
            let rules = if config.is_empty() {
                Vec::new()
            } else {
                read_config_file(config)?
            };
            return Ok(Some(BlkdebugName {
                level: Level::File,
                inner: file.to_string(),
                format: None,
                open_backing: true,
                shown: name.to_string(),
                rules,
                align: 0,
            }));
        }
    }
    let pairs = if image_opts {
        crate::source::cmdline::option_pairs(name)?
    } else if let Some(json) = name.strip_prefix("json:") {
        let Ok(v) = serde_json::from_str::<Value>(&crate::source::qjson::to_standard(json)) else {
            // Not ours to report: the generic reader words the parse error.
            return Ok(None);
        };
        let mut pairs = Vec::new();
        flatten("", &v, &mut pairs);
        pairs
    } else {
        return Ok(None);
    };
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .and_then(|(_, v)| v.as_deref())
    };
    let (prefix, level_hint) = if get("driver") == Some("blkdebug") {
        ("", None)
    } else if get("file.driver") == Some("blkdebug") {
        let d = get("driver");
        let format = match d {
            None => None,
            Some(d) => Some(Format::from_name(d).ok_or_else(|| {
                Error::unsupported(format!("driver '{d}' is not supported by vimg"))
            })?),
        };
        ("file.", Some(format))
    } else {
        return Ok(None);
    };
    let mut open_backing = true;
    let mut config = None;
    let mut align = 0u64;
    let mut image: Vec<(String, Option<String>)> = Vec::new();
    let mut listed: BTreeMap<(u8, u64), Vec<(String, String)>> = BTreeMap::new();
    for (k, v) in &pairs {
        let Some(key) = k.strip_prefix(prefix) else {
            // Keys of the format above a file-level layer.
            match k.as_str() {
                "driver" => {}
                "backing" if v.is_none() => open_backing = false,
                k if IGNORED.contains(&k) => {}
                k => return Err(unsupported(k, name)),
            }
            continue;
        };
        let val = || {
            v.clone().ok_or_else(|| {
                Error::invalid_argument(format!("blkdebug option '{k}' needs a value"))
            })
        };
        if let Some(rest) = key.strip_prefix("image.") {
            image.push((rest.to_string(), v.clone()));
            continue;
        }
        let list = key
            .strip_prefix("inject-error.")
            .map(|r| (0u8, r))
            .or_else(|| key.strip_prefix("set-state.").map(|r| (1u8, r)));
        if let Some((which, rest)) = list {
            let (idx, field) = rest.split_once('.').ok_or_else(|| unsupported(k, name))?;
            let idx: u64 = idx.parse().map_err(|_| unsupported(k, name))?;
            listed
                .entry((which, idx))
                .or_default()
                .push((field.to_string(), val()?));
            continue;
        }
        match key {
            "driver" => {}
            "config" => config = Some(val()?),
            "image" | "x-image" => image.push((String::new(), Some(val()?))),
            "align" => {
                align = crate::options::parse_size(&val()?)
                    .map_err(|_| Error::invalid_argument("Parameter 'align' expects a size"))?
            }
            k if IGNORED.contains(&k) => {}
            _ => return Err(unsupported(k, name)),
        }
    }
    let mut rules = match &config {
        Some(c) => read_config_file(c)?,
        None => Vec::new(),
    };
    for ((which, _), keys) in listed {
        let section = if which == 0 {
            Section::InjectError
        } else {
            Section::SetState
        };
        rules.push((section, keys));
    }
    // What is below the layer: a file name, or a node.
    let below = |k: &str| {
        image
            .iter()
            .find(|(key, _)| key == k)
            .and_then(|(_, v)| v.clone())
    };
    let inner_driver = below("driver");
    let is_file = matches!(
        inner_driver.as_deref(),
        None | Some("file") | Some("host_device")
    );
    let (level, inner, format) = if is_file {
        let file = below("").or_else(|| below("filename")).ok_or_else(|| {
            Error::invalid_argument(format!("'{name}': blkdebug names no image file"))
        })?;
        if let Some((k, _)) = image.iter().find(|(k, _)| {
            !matches!(k.as_str(), "" | "driver" | "filename") && !IGNORED.contains(&k.as_str())
        }) {
            return Err(unsupported(&format!("{prefix}image.{k}"), name));
        }
        // A layer at the top with a file below: the file's bytes are the disk.
        let format = level_hint.unwrap_or(Some(Format::Raw));
        (Level::File, file, format)
    } else {
        if level_hint.is_some() {
            return Err(Error::unsupported(format!(
                "'{name}': vimg reads blkdebug above a format or between a format and its \
                 file, not between two formats"
            )));
        }
        let mut obj = Value::Object(Map::new());
        for (k, v) in &image {
            insert_dotted(&mut obj, k, v.clone());
        }
        (Level::Guest, format!("json:{obj}"), None)
    };
    Ok(Some(BlkdebugName {
        level,
        inner,
        format,
        open_backing,
        shown: name.to_string(),
        rules,
        align,
    }))
}

impl BlkdebugName {
    /// True when the name gives any rule (from a config file or the options).
    pub fn has_rules(&self) -> bool {
        !self.rules.is_empty()
    }
}

fn unsupported(k: &str, name: &str) -> Error {
    Error::unsupported(format!(
        "image option '{k}' is not supported by vimg (in '{name}')"
    ))
}

fn read_config_file(path: &str) -> Result<Vec<RawRule>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::msg(
            ErrorKind::Io,
            format!(
                "Could not read blkdebug config file: {}",
                super::strerror(e.raw_os_error().unwrap_or(libc::EIO))
            ),
        )
    })?;
    parse_config(&text, path)
}

/// QEMU's dotted keys, lists included (`inject-error.0.event`).
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, Option<String>)>) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                flatten(&key(k), v, out);
            }
        }
        Value::Array(list) => {
            for (i, v) in list.iter().enumerate() {
                flatten(&key(&i.to_string()), v, out);
            }
        }
        Value::Null => out.push((prefix.to_string(), None)),
        Value::String(s) => out.push((prefix.to_string(), Some(s.clone()))),
        Value::Bool(b) => out.push((prefix.to_string(), Some(b.to_string()))),
        Value::Number(n) => out.push((prefix.to_string(), Some(n.to_string()))),
    }
}

/// Puts `v` at the dotted key `k` of a JSON object tree (`""`: the tree is `v`).
pub(crate) fn insert_dotted(obj: &mut Value, k: &str, v: Option<String>) {
    let leaf = v.map(Value::String).unwrap_or(Value::Null);
    if k.is_empty() {
        *obj = leaf;
        return;
    }
    let mut cur = obj;
    let parts: Vec<&str> = k.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let Value::Object(map) = cur else { return };
        if i + 1 == parts.len() {
            map.insert(p.to_string(), leaf);
            return;
        }
        cur = map
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// A file read through blkdebug's rules: reads are `read` requests, hole queries are
/// `block-status` requests, and the events a format fires reach the rules.
#[derive(Debug)]
pub struct BlkdebugStorage {
    inner: Arc<dyn Storage>,
    dbg: Arc<Blkdebug>,
}

impl BlkdebugStorage {
    /// `inner` read through the rules of `dbg`.
    pub(crate) fn new(inner: Arc<dyn Storage>, dbg: Arc<Blkdebug>) -> BlkdebugStorage {
        BlkdebugStorage { inner, dbg }
    }
}

impl Storage for BlkdebugStorage {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.dbg.check(offset, buf.len() as u64, IoType::Read)?;
        self.inner.read_at(buf, offset)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let len = self.inner.len();
        if offset < len && !super::Reading::active() {
            self.dbg.check(offset, len - offset, IoType::BlockStatus)?;
        }
        self.inner.next_data(offset)
    }

    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }

    fn disk_usage(&self) -> Option<u64> {
        self.inner.disk_usage()
    }

    fn identity(&self) -> Option<(u64, u64)> {
        self.inner.identity()
    }

    /// None: every read must pass the rules, so no zero-copy path around them.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    fn debug_event(&self, event: Event) {
        self.dbg.event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(parse_name("x.qcow2", false).unwrap().is_none());
        assert!(
            parse_name("json:{\"driver\":\"qcow2\",\"file\":\"x\"}", false)
                .unwrap()
                .is_none()
        );
        let n = parse_name("blkdebug::/tmp/x", false).unwrap().unwrap();
        assert_eq!((n.level, n.inner.as_str()), (Level::File, "/tmp/x"));
        assert!(parse_name("blkdebug:nocolon", false).is_err());
        let n = parse_name(
            "json:{'driver':'blkdebug','image':{'driver':'qcow2','file':{'driver':'file','filename':'/x'}},\
             'inject-error':[{'event':'none','iotype':'read','sector':3}]}",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(n.level, Level::Guest);
        assert_eq!(n.rules.len(), 1);
        let v: Value = serde_json::from_str(n.inner.strip_prefix("json:").unwrap()).unwrap();
        assert_eq!(v["file"]["filename"], "/x");
        let n = parse_name(
            "driver=qcow2,file.driver=blkdebug,file.image.filename=/y,file.align=4k",
            true,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (n.level, n.format, n.align),
            (Level::File, Some(Format::Qcow2), 4096)
        );
        assert!(parse_name("driver=blkdebug,image.filename=/y,bogus=1", true).is_err());
    }
}

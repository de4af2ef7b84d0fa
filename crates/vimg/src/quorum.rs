//! QEMU's `quorum` driver, read-only, for the names a user types on the command line:
//! `json:{"driver": "quorum", "children": [...], "vote-threshold": N, ...}` (the quorum
//! node is the disk), `json:{"driver": FMT, "file": {"driver": "quorum", ...}}` (a format
//! read from a quorum of copies of its file), and the same as `--image-opts`
//! (`driver=quorum,vote-threshold=2,children.0.driver=file,children.0.filename=a,...`).
//!
//! Behaviour follows QEMU's block/quorum.c, read from its documentation and source:
//! - reads (`read-pattern=quorum`, the default) read every child; when the children that
//!   read without error agree, that is the answer; otherwise the most common version wins if
//!   at least `vote-threshold` children hold it, and the read fails with EIO if not. Fewer
//!   successful reads than the threshold fail with the most common error. Votes are per read
//!   request, as in QEMU (vimg's requests are not QEMU's, so a disk whose copies are damaged
//!   in different places of one request may vote differently). `blkverify=on` (two children,
//!   threshold 2) fails a read whose children differ, naming the first differing byte.
//! - `read-pattern=fifo` reads the first child and the next only when one fails.
//! - block status: zero where every child reports zero (the shortest such run), else data
//!   (the longest data run), with no host offset.
//! - the node has no folder: a relative name inside an image over it cannot be resolved
//!   ("Cannot generate a base directory for quorum nodes").
//! - `rewrite-corrupted=on` needs write access to the children, which qemu-img's read-only
//!   opens do not give ("Block node is read-only"); vimg refuses it in the same words.
//!
//! Children are the user's names and are opened as given (no external-file gate); names
//! read from the images inside them (backing files, extents) still go through the gate.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::formats::Format;
use crate::mapping::{Extent, FileId, GuestOffset, HostOffset, ImageReader, MapKind};
use crate::storage::Storage;

pub mod dirname;

pub use dirname::{needs_dirname, NO_DIRNAME};

/// A child node as the quorum reads it (an opened image: `image/quorum.rs` implements it
/// for [`crate::Image`]), so this module needs nothing of the image layer.
pub trait QuorumChild: Send + Sync + std::fmt::Debug {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Block status at `pos`: (reads as zero, length of the run), at most `len` long.
    fn status(&self, pos: u64, len: u64) -> Result<(bool, u64)>;
    /// Its name as the user gave it.
    fn name(&self) -> &str;
    /// The file it stands on.
    fn storage(&self) -> &Arc<dyn Storage>;
    /// Bytes its files occupy on disk.
    fn allocated(&self) -> u64;
    /// Every file it reads.
    fn all_files(&self) -> Vec<Arc<dyn Storage>>;
}

/// Where the quorum node sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Level {
    /// The quorum node is the disk.
    Top,
    /// Below a format (named, or probed when `None`), as its file.
    File(Option<Format>),
}

/// How a read is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPattern {
    /// Every child is read and the versions vote.
    Quorum,
    /// The first child that reads without error answers.
    Fifo,
}

/// One child as the user gave it.
#[derive(Clone, Debug)]
pub enum ChildName {
    /// A file node (`"driver": "file"` or `host_device`): its bytes.
    File(PathBuf),
    /// A file whose format is probed (a child with a `filename` and no `driver`).
    Probe(PathBuf),
    /// Any other node (a format over a file, blkdebug, another quorum): opened from this
    /// `json:` name.
    Node(String),
}

/// A quorum name the user gave, read and checked.
#[derive(Clone, Debug)]
pub struct QuorumName {
    /// Where the node sits.
    pub level: Level,
    /// False when the format above says `backing: null`.
    pub open_backing: bool,
    /// The children, in order.
    pub children: Vec<ChildName>,
    /// The children's options as given, for the name qemu shows.
    child_opts: Vec<Value>,
    /// Votes a version needs.
    pub threshold: usize,
    /// How reads are served.
    pub pattern: ReadPattern,
    /// Fail a read whose two children differ.
    pub blkverify: bool,
    /// `rewrite-corrupted=on`: refused once the children are open.
    pub rewrite_corrupted: bool,
    /// The quorum node's strong options as given (`vote-threshold`, ...), for its name.
    strong: Vec<(String, Value)>,
}

/// Options of any node that only tune QEMU's I/O: accepted, no effect, not shown.
const IGNORED: &[&str] = &[
    "node-name",
    "read-only",
    "auto-read-only",
    "force-share",
    "discard",
    "detect-zeroes",
    "cache",
    "cache.direct",
    "cache.no-flush",
    "locking",
    "aio",
];

/// Reads `name` when it asks for a quorum node at the top or as a format's file; `None`
/// when it does not.
pub fn parse_name(name: &str, image_opts: bool) -> Result<Option<QuorumName>> {
    let root = if image_opts {
        let mut obj = Value::Object(Map::new());
        for (k, v) in crate::source::cmdline::option_pairs(name)? {
            crate::blkdebug::open::insert_dotted(&mut obj, &k, v);
        }
        obj
    } else if let Some(json) = name.strip_prefix("json:") {
        match serde_json::from_str::<Value>(&crate::source::qjson::to_standard(json)) {
            Ok(v) => v,
            // Not ours to report: the generic reader words the parse error.
            Err(_) => return Ok(None),
        }
    } else {
        return Ok(None);
    };
    let Value::Object(root) = root else {
        return Ok(None);
    };
    let is_quorum =
        |m: &Map<String, Value>| m.get("driver").and_then(Value::as_str) == Some("quorum");
    if is_quorum(&root) {
        return parse_node(&root, Level::Top, true).map(Some);
    }
    let Some(Value::Object(file)) = root.get("file") else {
        return Ok(None);
    };
    if !is_quorum(file) {
        return Ok(None);
    }
    let format = match root.get("driver") {
        None => None,
        Some(d) => {
            let d = text(d);
            Some(Format::from_name(&d).ok_or_else(|| {
                Error::unsupported(format!("driver '{d}' is not supported by vimg"))
            })?)
        }
    };
    let mut open_backing = true;
    for (k, v) in &root {
        match k.as_str() {
            "driver" | "file" => {}
            "backing" if v.is_null() => open_backing = false,
            k if IGNORED.contains(&k) => {}
            k => {
                return Err(Error::unsupported(format!(
                    "image option '{k}' is not supported by vimg above a quorum node"
                )))
            }
        }
    }
    parse_node(file, Level::File(format), open_backing).map(Some)
}

fn parse_node(m: &Map<String, Value>, level: Level, open_backing: bool) -> Result<QuorumName> {
    let list: Vec<&Value> = match m.get("children") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.iter().collect(),
        // `--image-opts` spells the list `children.0.*`, `children.1.*`, ...
        Some(Value::Object(o)) => {
            let mut v = Vec::new();
            while let Some(c) = o.get(&v.len().to_string()) {
                v.push(c);
            }
            if v.len() != o.len() {
                return Err(Error::invalid_argument(
                    "Option children is not a valid array",
                ));
            }
            v
        }
        Some(_) => {
            return Err(Error::invalid_argument(
                "Option children is not a valid array",
            ))
        }
    };
    if list.is_empty() {
        return Err(Error::invalid_argument(
            "Number of provided children must be 1 or more",
        ));
    }
    let mut strong = Vec::new();
    let (mut threshold, mut pattern, mut blkverify, mut rewrite) = (None, None, false, false);
    for (k, v) in m {
        match k.as_str() {
            "driver" | "children" => {}
            "vote-threshold" => {
                threshold = Some(text(v).trim().parse::<i64>().map_err(|_| {
                    Error::invalid_argument("Parameter 'vote-threshold' expects a number")
                })?);
                strong.push((k.clone(), v.clone()));
            }
            "read-pattern" => {
                pattern = Some(text(v));
                strong.push((k.clone(), v.clone()));
            }
            "blkverify" => {
                blkverify = boolean(k, v)?;
                strong.push((k.clone(), v.clone()));
            }
            "rewrite-corrupted" => {
                rewrite = boolean(k, v)?;
                strong.push((k.clone(), v.clone()));
            }
            k if IGNORED.contains(&k) => {}
            k => {
                return Err(Error::invalid_argument(format!(
                    "Block protocol 'quorum' doesn't support the option '{k}'"
                )))
            }
        }
    }
    let threshold = threshold.unwrap_or(0);
    if threshold < 1 {
        return Err(Error::invalid_argument(
            "Parameter 'vote-threshold' expects a value >= 1",
        ));
    }
    if threshold as u64 > list.len() as u64 {
        return Err(Error::invalid_argument(
            "threshold may not exceed children count",
        ));
    }
    let threshold = threshold as usize;
    let pattern = match pattern.as_deref() {
        None | Some("quorum") => ReadPattern::Quorum,
        Some("fifo") => ReadPattern::Fifo,
        Some(_) => {
            return Err(Error::invalid_argument(
                "Please set read-pattern as fifo or quorum",
            ))
        }
    };
    if pattern == ReadPattern::Fifo {
        // QEMU reads these two only for the quorum pattern.
        blkverify = false;
        rewrite = false;
    }
    if blkverify && (list.len() != 2 || threshold != 2) {
        return Err(Error::invalid_argument(
            "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
        ));
    }
    if rewrite && blkverify {
        return Err(Error::invalid_argument(
            "rewrite-corrupted=on cannot be used with blkverify=on",
        ));
    }
    let mut children = Vec::new();
    let mut child_opts = Vec::new();
    for c in list {
        let Value::Object(o) = c else {
            // A string names an existing node, which a command line has none of.
            let s = text(c);
            return Err(Error::invalid_argument(format!(
                "Cannot find device='{s}' nor node-name='{s}'"
            )));
        };
        let driver = o.get("driver").map(text);
        let filename = o.get("filename").map(text);
        let child = match (driver.as_deref(), filename) {
            (Some("file" | "host_device"), Some(f)) | (None, Some(f)) => {
                if let Some(k) = o.keys().find(|k| {
                    !matches!(k.as_str(), "driver" | "filename") && !IGNORED.contains(&k.as_str())
                }) {
                    return Err(Error::unsupported(format!(
                        "quorum child option '{k}' is not supported by vimg"
                    )));
                }
                if driver.is_some() {
                    ChildName::File(PathBuf::from(f))
                } else {
                    ChildName::Probe(PathBuf::from(f))
                }
            }
            (Some("file" | "host_device"), None) => {
                return Err(Error::invalid_argument(
                    "The 'file' block driver requires a file name",
                ))
            }
            _ => ChildName::Node(format!("json:{}", Value::Object(o.clone()))),
        };
        children.push(child);
        child_opts.push(c.clone());
    }
    Ok(QuorumName {
        level,
        open_backing,
        children,
        child_opts,
        threshold,
        pattern,
        blkverify,
        rewrite_corrupted: rewrite,
        strong,
    })
}

/// A JSON scalar as QEMU's option parser reads it: strings as they are, other scalars as
/// their JSON text.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn boolean(k: &str, v: &Value) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if matches!(s.as_str(), "on" | "true" | "yes") => Ok(true),
        Value::String(s) if matches!(s.as_str(), "off" | "false" | "no") => Ok(false),
        _ => Err(Error::invalid_argument(format!(
            "Parameter '{k}' expects 'on' or 'off'"
        ))),
    }
}

/// The bucket QEMU's QDict puts `key` in: its dictionaries print their keys in bucket order
/// (the gdbm/tdb string hash modulo 512), which is the order qemu-img's `json:{...}` names
/// show them in.
fn qdict_bucket(key: &str) -> u32 {
    let mut v = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, b) in key.bytes().enumerate() {
        v = v.wrapping_add(u32::from(b) << (i * 5 % 24));
    }
    v.wrapping_mul(1_103_515_243).wrapping_add(12345) % 512
}

/// `v` as QEMU prints a QDict as JSON: `{"a": 1, "b": [2, 3]}`, keys in bucket order.
fn qemu_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by_key(|k| (qdict_bucket(k), k.as_str()));
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::String(k.to_string()).to_string());
                out.push_str(": ");
                qemu_json(&m[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                qemu_json(x, out);
            }
            out.push(']');
        }
        v => out.push_str(&v.to_string()),
    }
}

/// The options qemu keeps in a node's name: all but the ones that only tune I/O.
fn strong_only(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !IGNORED.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), strong_only(v)))
                .collect(),
        ),
        v => v.clone(),
    }
}

impl QuorumName {
    /// The quorum node's options as qemu-img names it (`json:{"children": [...], "driver":
    /// "quorum", "vote-threshold": 2}`), without the `json:` prefix.
    pub fn node_options(&self) -> Value {
        let mut m = Map::new();
        m.insert(
            "children".into(),
            Value::Array(self.child_opts.iter().map(strong_only).collect()),
        );
        m.insert("driver".into(), Value::String("quorum".into()));
        for (k, v) in &self.strong {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }

    /// The name qemu-img shows for the whole: the quorum node's, or, below a format, the
    /// format's with the quorum node as its file.
    pub fn shown(&self, format: Format) -> String {
        let node = self.node_options();
        let v = match self.level {
            Level::Top => node,
            Level::File(_) => {
                let mut m = Map::new();
                m.insert("driver".into(), Value::String(format.name().into()));
                m.insert("file".into(), node);
                Value::Object(m)
            }
        };
        let mut s = String::from("json:");
        qemu_json(&v, &mut s);
        s
    }

    /// The quorum node's own name as qemu-img shows it.
    pub fn node_name(&self) -> String {
        let mut s = String::from("json:");
        qemu_json(&self.node_options(), &mut s);
        s
    }
}

/// An opened quorum node: its children and how they vote.
#[derive(Debug)]
pub struct Quorum {
    children: Vec<Arc<dyn QuorumChild>>,
    /// True for children that are file nodes (their bytes).
    is_file: Vec<bool>,
    threshold: usize,
    pattern: ReadPattern,
    blkverify: bool,
    len: u64,
    name: String,
}

impl Quorum {
    /// A quorum of `children` (opened; file children as raw images of their bytes).
    pub(crate) fn new(
        q: &QuorumName,
        children: Vec<Arc<dyn QuorumChild>>,
        is_file: Vec<bool>,
    ) -> Result<Quorum> {
        let len = children.first().map(|c| c.size()).unwrap_or(0);
        if children.iter().any(|c| c.size() != len) {
            // QEMU's getlength fails with EIO when the children's lengths differ.
            return Err(Error::invalid(
                "Could not refresh total sector count: Input/output error",
            ));
        }
        if q.rewrite_corrupted {
            // Rewriting needs write access to the children; qemu-img opens them read-only.
            return Err(Error::invalid_argument("Block node is read-only"));
        }
        Ok(Quorum {
            children,
            is_file,
            threshold: q.threshold,
            pattern: q.pattern,
            blkverify: q.blkverify,
            len,
            name: q.node_name(),
        })
    }

    /// The node's name as qemu-img shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The size of the node in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the node holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The children, in order, each with whether it is a file node.
    pub fn children(&self) -> impl Iterator<Item = (&dyn QuorumChild, bool)> {
        self.children
            .iter()
            .map(|c| &**c)
            .zip(self.is_file.iter().copied())
    }

    /// Bytes the children occupy on disk (qemu sums its children's).
    pub fn disk_usage(&self) -> u64 {
        self.children
            .iter()
            .map(|c| c.allocated())
            .fold(0u64, u64::saturating_add)
    }

    /// True when every child is a file node (what `info` can describe).
    pub fn children_are_files(&self) -> bool {
        self.is_file.iter().all(|f| *f)
    }

    /// Reads `buf.len()` bytes at `offset` (inside the node) by the read pattern.
    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let errno = |e: &Error| crate::blkdebug::os_error(e).unwrap_or(libc::EIO);
        if self.pattern == ReadPattern::Fifo {
            let mut last = libc::EIO;
            for c in &self.children {
                match c.read(buf, offset) {
                    Ok(()) => return Ok(()),
                    Err(e) => last = errno(&e),
                }
            }
            return Err(io::Error::from_raw_os_error(last));
        }
        let mut versions: Vec<Result<Vec<u8>>> = Vec::with_capacity(self.children.len());
        for c in &self.children {
            let mut v = vec![0u8; buf.len()];
            versions.push(c.read(&mut v, offset).map(|()| v));
        }
        let ok: Vec<&Vec<u8>> = versions.iter().filter_map(|v| v.as_ref().ok()).collect();
        if ok.len() < self.threshold {
            // The most common error (QEMU votes on the errors too; on a tie, the one seen
            // last).
            let errs: Vec<i32> = versions
                .iter()
                .filter_map(|v| v.as_ref().err().map(errno))
                .collect();
            let e = vote(&errs).map(|i| errs[i]).unwrap_or(libc::EIO);
            return Err(io::Error::from_raw_os_error(e));
        }
        let first = ok[0];
        if let Some(other) = ok[1..].iter().find(|v| **v != first) {
            if self.blkverify {
                let at = first
                    .iter()
                    .zip(other.iter())
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(io::Error::other(format!(
                    "quorum: offset={offset} bytes={} contents mismatch at offset {}",
                    buf.len(),
                    offset + at as u64
                )));
            }
        } else {
            buf.copy_from_slice(first);
            return Ok(());
        }
        let owned: Vec<Vec<u8>> = ok.iter().map(|v| v.to_vec()).collect();
        let Some(w) = vote(&owned) else {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        };
        let count = owned.iter().filter(|v| **v == owned[w]).count();
        if count < self.threshold {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        buf.copy_from_slice(&owned[w]);
        Ok(())
    }

    /// Block status at `pos`: zero where every child says zero (the shortest run), else
    /// data (the longest data run), as QEMU's quorum answers.
    fn status(&self, pos: u64, max_len: u64) -> (bool, u64) {
        let (mut zero_len, mut data_len) = (max_len, 0u64);
        for c in &self.children {
            match c.status(pos, max_len) {
                Ok((true, n)) => zero_len = zero_len.min(n.max(1)),
                Ok((false, n)) => data_len = data_len.max(n.max(1)),
                Err(_) => {
                    data_len = max_len;
                    break;
                }
            }
        }
        if data_len > 0 {
            (false, data_len.min(max_len))
        } else {
            (true, zero_len.min(max_len).max(1))
        }
    }
}

/// The index of the winning value among `items`: the most common one; on a tie, the one
/// whose first occurrence is latest (QEMU keeps its versions newest first and takes the
/// first with the highest count).
fn vote<T: PartialEq>(items: &[T]) -> Option<usize> {
    let mut firsts: Vec<usize> = Vec::new();
    for (i, x) in items.iter().enumerate() {
        if !firsts.iter().any(|&f| items[f] == *x) {
            firsts.push(i);
        }
    }
    let mut best: Option<(usize, usize)> = None;
    for &f in firsts.iter().rev() {
        let n = items.iter().filter(|x| **x == items[f]).count();
        if best.is_none_or(|(_, m)| n > m) {
            best = Some((f, n));
        }
    }
    best.map(|(f, _)| f)
}

/// A quorum node's bytes, as the file under a format or as the disk.
#[derive(Debug)]
pub struct QuorumStorage {
    q: Arc<Quorum>,
}

impl QuorumStorage {
    pub(crate) fn new(q: Arc<Quorum>) -> QuorumStorage {
        QuorumStorage { q }
    }

    /// The quorum node.
    pub fn quorum(&self) -> &Quorum {
        &self.q
    }
}

impl Storage for QuorumStorage {
    fn len(&self) -> u64 {
        self.q.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.q.len {
            return Ok(0);
        }
        let n = (self.q.len - offset).min(buf.len() as u64) as usize;
        self.q.read(&mut buf[..n], offset)?;
        Ok(n)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let len = self.q.len;
        let mut pos = offset;
        while pos < len {
            let (zero, n) = self.q.status(pos, len - pos);
            if !zero {
                let mut end = pos + n;
                while end < len {
                    let (z, m) = self.q.status(end, len - end);
                    if z {
                        break;
                    }
                    end += m;
                }
                return Ok(Some((pos, end)));
            }
            pos += n;
        }
        Ok(None)
    }

    fn disk_usage(&self) -> Option<u64> {
        Some(self.q.disk_usage())
    }

    fn quorum_node(&self) -> Option<&str> {
        Some(&self.q.name)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

/// The quorum node as the disk: data and zero runs by the children's block status; the
/// data is read through [`QuorumStorage`] (file 0, at the guest offset).
pub(crate) struct QuorumReader {
    pub(crate) q: Arc<Quorum>,
    pub(crate) file: Arc<dyn Storage>,
}

impl ImageReader for QuorumReader {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.q.len
    }

    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let pos = offset.get();
        let max_len = max_len.min(self.q.len.saturating_sub(pos)).max(1);
        let (zero, len) = self.q.status(pos, max_len);
        let kind = if zero {
            MapKind::Zero
        } else {
            MapKind::Data {
                file: FileId(0),
                offset: HostOffset(pos),
            }
        };
        Ok(Extent {
            start: offset,
            len,
            kind,
        })
    }

    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        (id.0 == 0).then_some(&self.file)
    }

    fn files(&self) -> Vec<Arc<dyn Storage>> {
        let mut v = vec![self.file.clone()];
        for c in &self.q.children {
            v.extend(c.all_files());
        }
        v
    }

    fn allocated_size(&self) -> Option<u64> {
        Some(self.q.disk_usage())
    }

    fn map_probes_host_holes(&self) -> bool {
        false
    }

    fn host_offsets(&self) -> bool {
        false
    }

    fn driver_name(&self) -> &'static str {
        "quorum"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qdict_order_is_qemus() {
        // The order qemu-img 10 prints these keys in.
        let mut keys = vec![
            "vote-threshold",
            "blkverify",
            "driver",
            "children",
            "read-pattern",
        ];
        keys.sort_by_key(|k| qdict_bucket(k));
        assert_eq!(
            keys,
            [
                "read-pattern",
                "children",
                "driver",
                "blkverify",
                "vote-threshold"
            ]
        );
        assert!(qdict_bucket("driver") < qdict_bucket("file"));
        assert!(qdict_bucket("driver") < qdict_bucket("filename"));
    }

    #[test]
    fn names() {
        assert!(parse_name("x.qcow2", false).unwrap().is_none());
        assert!(
            parse_name("json:{\"driver\":\"qcow2\",\"file\":\"x\"}", false)
                .unwrap()
                .is_none()
        );
        let q = parse_name(
            "json:{'driver':'quorum','vote-threshold':2,'children':[{'driver':'file','filename':'a'},{'driver':'file','filename':'b'}]}",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (q.level.clone(), q.threshold, q.children.len()),
            (Level::Top, 2, 2)
        );
        assert_eq!(
            q.node_name(),
            r#"json:{"children": [{"driver": "file", "filename": "a"}, {"driver": "file", "filename": "b"}], "driver": "quorum", "vote-threshold": 2}"#
        );
        let q = parse_name(
            "driver=qcow2,file.driver=quorum,file.vote-threshold=1,file.children.0.driver=file,file.children.0.filename=a",
            true,
        )
        .unwrap()
        .unwrap();
        assert_eq!(q.level, Level::File(Some(Format::Qcow2)));
        assert_eq!(
            q.shown(Format::Qcow2),
            r#"json:{"driver": "qcow2", "file": {"children": [{"driver": "file", "filename": "a"}], "driver": "quorum", "vote-threshold": "1"}}"#
        );
    }

    #[test]
    fn option_errors_in_qemus_words() {
        let e = |s: &str| parse_name(s, false).unwrap_err().to_string();
        assert!(e("json:{'driver':'quorum','children':[]}").contains("1 or more"));
        assert!(
            e("json:{'driver':'quorum','children':[{'driver':'file','filename':'a'}]}")
                .contains("expects a value >= 1")
        );
        assert!(e("json:{'driver':'quorum','vote-threshold':2,'children':[{'driver':'file','filename':'a'}]}")
            .contains("threshold may not exceed children count"));
        assert!(e("json:{'driver':'quorum','vote-threshold':1,'read-pattern':'x','children':[{'driver':'file','filename':'a'}]}")
            .contains("read-pattern as fifo or quorum"));
        assert!(e("json:{'driver':'quorum','vote-threshold':1,'blkverify':true,'children':[{'driver':'file','filename':'a'}]}")
            .contains("exactly two files"));
        assert!(
            e("json:{'driver':'quorum','vote-threshold':1,'children':['a']}")
                .contains("Cannot find device='a' nor node-name='a'")
        );
        let gap = parse_name("driver=quorum,vote-threshold=1,children.1.filename=a", true);
        assert!(gap.unwrap_err().to_string().contains("not a valid array"));
    }

    #[test]
    fn votes_like_qemu() {
        assert_eq!(vote(&[1, 2, 2]), Some(1));
        // A tie goes to the version seen last.
        assert_eq!(vote(&[1, 2]), Some(1));
        assert_eq!(vote(&[3, 1, 3, 1]), Some(1));
        assert_eq!(vote::<u8>(&[]), None);
    }
}

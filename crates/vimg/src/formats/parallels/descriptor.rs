//! ploop directories: a `DiskDescriptor.xml` naming the image files, as QEMU's
//! docs/interop/prl-xml.rst describes it. vimg opens the single-snapshot, single-storage
//! disk Virtuozzo and OpenStack's image service use: one `<Storage>` covering the whole
//! disk (`<Start>` 0, `<End>` = `<Disk_size>` sectors), one `<Image>` of `<Type>`
//! `Compressed` (the expanding parallels image, usually `root.hds`) whose `<GUID>` is the
//! one `<Shot>`, a root (its `<ParentGUID>` is the zero UUID). Split images, snapshot
//! chains and `Plain` images are refused by name.
//!
//! The `<File>` name comes from the descriptor, so it goes through the gate like a VMDK
//! extent (resolved against the descriptor's folder, the external-file policy), and the
//! file it names must be a parallels image whose size and cluster size agree with the
//! descriptor (`<Disk_size>`, `<Blocksize>`, both in 512-byte sectors).
//!
//! QEMU 10's parallels driver reads only the binary image (this qemu-img probes a
//! descriptor as raw; with `-f parallels` it answers "Image not in Parallels format"): the
//! descriptor support follows the spec, and what it opens reads exactly as the image file
//! it names does in qemu-img.
//!
//! Parsing: quick-xml (already the OVF parser's), a pull parser that expands no entities
//! besides XML's five and reads no DTD (a `<!DOCTYPE` is refused), over at most
//! [`MAX_DESCRIPTOR`] bytes and [`MAX_DEPTH`] levels: nothing in the file sizes an
//! allocation.

use std::sync::Arc;

use quick_xml::events::Event;

use super::read::ParallelsReader;
use crate::error::{Error, Result};
use crate::escape::escape_control;
use crate::formats::{Format, OpenContext};
use crate::mapping::{
    ChildNode, Extent, ExternalRef, FileId, FormatSpecific, GuestOffset, HostOffset, ImageReader,
    MapKind, RefRole,
};
use crate::storage::Storage;

/// Largest descriptor read (real ones are a few KiB).
pub const MAX_DESCRIPTOR: u64 = 1 << 20;
/// Deepest element nesting accepted (the format uses four levels).
pub const MAX_DEPTH: usize = 32;
/// The root element.
const ROOT: &str = "Parallels_disk_image";
/// A root snapshot's parent.
const ZERO_GUID: &str = "{00000000-0000-0000-0000-000000000000}";

/// True when `head` starts like a ploop disk descriptor: an optional BOM, XML declaration
/// and comments, then the `<Parallels_disk_image` root element.
pub fn looks_like(head: &[u8]) -> bool {
    let mut h = head.strip_prefix(b"\xef\xbb\xbf").unwrap_or(head);
    loop {
        let t = h
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(h.len());
        h = &h[t..];
        let skip = |h: &[u8], open: &[u8], close: &[u8]| -> Option<usize> {
            h.starts_with(open).then(|| {
                h.windows(close.len())
                    .position(|w| w == close)
                    .map(|p| p + close.len())
            })?
        };
        // A DOCTYPE (with or without an internal subset) is skipped here so that the file
        // is still recognised; `parse` then refuses it.
        let doctype = || {
            let gt = h.iter().position(|b| *b == b'>')?;
            match h[..gt].contains(&b'[') {
                true => skip(h, b"<!DOCTYPE", b"]>"),
                false => skip(h, b"<!DOCTYPE", b">"),
            }
        };
        if let Some(n) = skip(h, b"<?", b"?>")
            .or_else(|| skip(h, b"<!--", b"-->"))
            .or_else(doctype)
        {
            h = &h[n..];
            continue;
        }
        return h.starts_with(b"<Parallels_disk_image")
            && h.get(ROOT.len() + 1)
                .is_some_and(|b| b.is_ascii_whitespace() || *b == b'>' || *b == b'/');
    }
}

/// What vimg uses of a descriptor.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// `<Disk_size>`: sectors.
    pub disk_size: u64,
    /// `<Storage>` elements: (start, end, blocksize, images).
    pub storages: Vec<StorageEl>,
    /// `<Shot>` elements: (GUID, ParentGUID).
    pub shots: Vec<(String, String)>,
}

/// One `<Storage>`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StorageEl {
    /// `<Start>`, sectors.
    pub start: Option<u64>,
    /// `<End>`, sectors.
    pub end: Option<u64>,
    /// `<Blocksize>`, sectors.
    pub blocksize: Option<u64>,
    /// `<Image>` elements: (GUID, Type, File).
    pub images: Vec<(String, String, String)>,
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::invalid(format!("ploop disk descriptor: {what}"))
}

fn number(path: &str, text: &str) -> Result<u64> {
    text.trim().parse::<u64>().map_err(|_| {
        bad(format_args!(
            "<{path}> is '{}', not a number",
            escape_control(text)
        ))
    })
}

/// Parser state: what has been read so far.
#[derive(Default)]
struct State {
    d: Descriptor,
    disk_size: Option<u64>,
    image: (String, String, String),
    shot: (String, String),
}

impl State {
    /// An element opens; `stack` ends with it.
    fn start(&mut self, stack: &[String]) {
        let path: Vec<&str> = stack.iter().map(String::as_str).collect();
        match path[1..] {
            ["StorageData", "Storage"] => self.d.storages.push(StorageEl::default()),
            ["StorageData", "Storage", "Image"] => self.image = Default::default(),
            ["Snapshots", "Shot"] => self.shot = Default::default(),
            _ => {}
        }
    }

    /// An element closes with `text` inside; `stack` ends with it.
    fn end(&mut self, stack: &[String], text: &str) -> Result<()> {
        let path: Vec<&str> = stack.iter().map(String::as_str).collect();
        let t = text.trim().to_string();
        let last = self.d.storages.last_mut();
        match (path.get(1..).unwrap_or(&[]), last) {
            (["Disk_Parameters", "Disk_size"], _) => {
                if self.disk_size.is_some() {
                    return Err(bad("two <Disk_size> elements"));
                }
                self.disk_size = Some(number("Disk_size", &t)?);
            }
            (["StorageData", "Storage", "Start"], Some(s)) => s.start = Some(number("Start", &t)?),
            (["StorageData", "Storage", "End"], Some(s)) => s.end = Some(number("End", &t)?),
            (["StorageData", "Storage", "Blocksize"], Some(s)) => {
                s.blocksize = Some(number("Blocksize", &t)?)
            }
            (["StorageData", "Storage", "Image", "GUID"], _) => self.image.0 = t,
            (["StorageData", "Storage", "Image", "Type"], _) => self.image.1 = t,
            // The file name exactly as stored (no trimming: it is judged as spelled).
            (["StorageData", "Storage", "Image", "File"], _) => self.image.2 = text.to_string(),
            (["StorageData", "Storage", "Image"], Some(s)) => {
                s.images.push(std::mem::take(&mut self.image))
            }
            (["Snapshots", "Shot", "GUID"], _) => self.shot.0 = t,
            (["Snapshots", "Shot", "ParentGUID"], _) => self.shot.1 = t,
            (["Snapshots", "Shot"], _) => self.d.shots.push(std::mem::take(&mut self.shot)),
            _ => {}
        }
        Ok(())
    }
}

/// Longest text inside one element.
const MAX_TEXT: usize = 4096;

/// Parses a descriptor (the elements the spec defines; others are ignored, as it asks).
pub fn parse(xml: &[u8]) -> Result<Descriptor> {
    let text = std::str::from_utf8(xml).map_err(|e| bad(format_args!("not UTF-8 ({e})")))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = quick_xml::Reader::from_str(text);
    let mut stack: Vec<String> = Vec::new();
    let mut st = State::default();
    let mut cur_text = String::new();
    let mut root_seen = false;
    loop {
        let pos = reader.buffer_position();
        let ev = reader
            .read_event()
            .map_err(|e| bad(format_args!("XML error at byte {pos}: {e}")))?;
        match ev {
            Event::DocType(_) => return Err(bad("a DOCTYPE is not allowed")),
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                if stack.is_empty() {
                    if root_seen || name != ROOT {
                        return Err(bad(format_args!(
                            "the root element is <{}>, not <{ROOT}>",
                            escape_control(&name)
                        )));
                    }
                    root_seen = true;
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(bad(format_args!("elements nest deeper than {MAX_DEPTH}")));
                }
                stack.push(name);
                cur_text.clear();
                st.start(&stack);
                if matches!(ev, Event::Empty(_)) {
                    st.end(&stack, "")?;
                    stack.pop();
                }
            }
            Event::Text(t) => {
                let s = t
                    .unescape()
                    .map_err(|e| bad(format_args!("bad text at byte {pos}: {e}")))?;
                if cur_text.len() + s.len() > MAX_TEXT {
                    return Err(bad(format_args!(
                        "text longer than {MAX_TEXT} bytes at byte {pos}"
                    )));
                }
                cur_text.push_str(&s);
            }
            Event::CData(t) => {
                let s = String::from_utf8_lossy(&t);
                if cur_text.len() + s.len() > MAX_TEXT {
                    return Err(bad(format_args!(
                        "text longer than {MAX_TEXT} bytes at byte {pos}"
                    )));
                }
                cur_text.push_str(&s);
            }
            Event::End(_) => {
                st.end(&stack, &cur_text)?;
                stack.pop();
                cur_text.clear();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !root_seen || !stack.is_empty() {
        return Err(bad(format_args!("no complete <{ROOT}> element")));
    }
    let mut d = st.d;
    d.disk_size = st.disk_size.ok_or_else(|| bad("no <Disk_size>"))?;
    Ok(d)
}

/// The one image file a descriptor names, and its expected size and block size (bytes).
fn single_image(d: &Descriptor) -> Result<(&str, u64, u64)> {
    let [st] = d.storages.as_slice() else {
        return Err(Error::unsupported(format!(
            "ploop disk descriptor has {} <Storage> elements; vimg reads one storage (split ploop images are not supported)",
            d.storages.len()
        )));
    };
    let [(guid, ty, file)] = st.images.as_slice() else {
        return Err(Error::unsupported(format!(
            "ploop disk descriptor has {} <Image> elements; vimg reads a single-snapshot ploop (one image)",
            st.images.len()
        )));
    };
    let [(shot, parent)] = d.shots.as_slice() else {
        return Err(Error::unsupported(format!(
            "ploop disk descriptor has {} <Shot> elements; vimg reads a single-snapshot ploop",
            d.shots.len()
        )));
    };
    if !shot.eq_ignore_ascii_case(guid) || !parent.eq_ignore_ascii_case(ZERO_GUID) {
        return Err(bad(format_args!(
            "the one <Shot> ({}, parent {}) is not the root snapshot of image {}",
            escape_control(shot),
            escape_control(parent),
            escape_control(guid)
        )));
    }
    if ty != "Compressed" {
        return Err(Error::unsupported(format!(
            "ploop image '{}' has <Type> '{}'; vimg reads 'Compressed' (expanding) ploop images",
            escape_control(file),
            escape_control(ty)
        )));
    }
    let sectors = d.disk_size;
    if st.start != Some(0) || st.end != Some(sectors) {
        return Err(bad(format_args!(
            "<Storage> covers sectors {}..{}, not the whole disk 0..{sectors}",
            st.start.map_or("?".into(), |v| v.to_string()),
            st.end.map_or("?".into(), |v| v.to_string())
        )));
    }
    let bs = st.blocksize.ok_or_else(|| bad("no <Blocksize>"))?;
    if file.is_empty() {
        return Err(bad("an empty <File> name"));
    }
    let size = sectors
        .checked_mul(512)
        .ok_or_else(|| bad(format_args!("<Disk_size> {sectors} is too large")))?;
    let bsize = bs
        .checked_mul(512)
        .ok_or_else(|| bad(format_args!("<Blocksize> {bs} is too large")))?;
    Ok((file.as_str(), size, bsize))
}

/// A parallels image opened through its ploop descriptor. File 0 is the descriptor, file 1
/// the image.
pub struct DescriptorReader {
    inner: ParallelsReader,
    descriptor: Arc<dyn Storage>,
    image: Arc<dyn Storage>,
    file_name: String,
}

/// The field name external references and gate errors use.
const FIELD: &str = "DiskDescriptor.xml <File>";

impl DescriptorReader {
    /// Opens the descriptor in `storage` and the image it names (through the gate).
    pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<DescriptorReader> {
        let len = storage.len();
        if len > MAX_DESCRIPTOR {
            return Err(bad(format_args!(
                "{len} bytes, more than the {MAX_DESCRIPTOR} vimg reads"
            )));
        }
        let mut xml = vec![0u8; len as usize];
        storage
            .read_exact_at(&mut xml, 0)
            .map_err(|e| Error::io("read the ploop disk descriptor", e))?;
        let d = parse(&xml)?;
        let (file, size, bsize) = single_image(&d)?;
        let image = ctx.open_external(FIELD, file)?;
        let inner = ParallelsReader::open(image.clone())?;
        if inner.virtual_size() != size {
            return Err(bad(format_args!(
                "<Disk_size> says {size} bytes but image '{}' holds {}",
                escape_control(file),
                inner.virtual_size()
            )));
        }
        if inner.cluster_size != bsize {
            return Err(bad(format_args!(
                "<Blocksize> says {bsize}-byte blocks but image '{}' has {}-byte clusters",
                escape_control(file),
                inner.cluster_size
            )));
        }
        Ok(DescriptorReader {
            inner,
            descriptor: storage,
            image,
            file_name: file.to_string(),
        })
    }
}

fn to_outer(kind: MapKind) -> MapKind {
    match kind {
        MapKind::Data { offset, .. } => MapKind::Data {
            file: FileId(1),
            offset,
        },
        k => k,
    }
}

impl ImageReader for DescriptorReader {
    fn map_probes_host_holes(&self) -> bool {
        // qemu's parallels block status sets no BDRV_BLOCK_RECURSE.
        false
    }

    fn format(&self) -> Format {
        Format::Parallels
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn cluster_size(&self) -> Option<u64> {
        self.inner.cluster_size()
    }
    fn map(&self, offset: GuestOffset, max_len: u64) -> Result<Extent> {
        let e = self.inner.map(offset, max_len)?;
        Ok(Extent {
            kind: to_outer(e.kind),
            ..e
        })
    }
    fn file(&self, id: FileId) -> Option<&Arc<dyn Storage>> {
        match id.0 {
            0 => Some(&self.descriptor),
            1 => Some(&self.image),
            _ => None,
        }
    }
    fn files(&self) -> Vec<Arc<dyn Storage>> {
        vec![self.descriptor.clone(), self.image.clone()]
    }
    fn external_refs(&self) -> Vec<ExternalRef> {
        vec![ExternalRef {
            field: FIELD.into(),
            name: self.file_name.clone(),
            role: RefRole::Data,
        }]
    }
    fn dirty(&self) -> bool {
        self.inner.dirty()
    }
    fn format_specific(&self) -> Option<FormatSpecific> {
        self.inner.format_specific()
    }
    fn zero_location(&self, e: &Extent) -> Option<(FileId, HostOffset)> {
        self.inner
            .zero_location(e)
            .map(|(f, o)| (if f.0 == 0 { FileId(1) } else { f }, o))
    }
    fn child_nodes(&self) -> Vec<ChildNode> {
        vec![ChildNode {
            name: "image".into(),
            file: FileId(1),
            stored_name: self.file_name.clone(),
        }]
    }
    fn warnings(&self) -> Vec<String> {
        self.inner.warnings()
    }
    fn check(&self) -> Result<crate::check::CheckReport> {
        self.inner.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn xml(size: u64, bs: u64, file: &str) -> String {
        format!(
            r#"<?xml version='1.0' encoding='UTF-8'?>
<!-- made by a test -->
<Parallels_disk_image Version="1.0">
  <Disk_Parameters>
    <Disk_size>{size}</Disk_size><Cylinders>8</Cylinders><Heads>16</Heads><Sectors>63</Sectors>
    <Padding>0</Padding>
    <Encryption><Engine>{ZERO_GUID}</Engine><Data></Data></Encryption>
    <UID>{{5fbaabe3-6958-40ff-92a7-860e329aab41}}</UID>
  </Disk_Parameters>
  <StorageData><Storage>
    <Start>0</Start><End>{size}</End><Blocksize>{bs}</Blocksize>
    <Image><GUID>{{5fbaabe3-6958-40ff-92a7-860e329aab41}}</GUID><Type>Compressed</Type>
      <File Protected="False">{file}</File></Image>
  </Storage></StorageData>
  <Snapshots><Shot><GUID>{{5fbaabe3-6958-40ff-92a7-860e329aab41}}</GUID>
    <ParentGUID>{ZERO_GUID}</ParentGUID></Shot></Snapshots>
</Parallels_disk_image>
"#
        )
    }

    #[test]
    fn parses_and_probes() {
        let x = xml(8192, 2048, "root &amp; co.hds");
        assert!(looks_like(x.as_bytes()));
        assert!(looks_like(b"\xef\xbb\xbf<Parallels_disk_image>"));
        assert!(!looks_like(b"<Parallels_disk_imagex>"));
        assert!(!looks_like(b"<?xml version='1.0'?><Envelope>"));
        assert!(looks_like(
            b"<!DOCTYPE p [<!ENTITY x 'y'>]>\n<Parallels_disk_image>"
        ));
        let d = parse(x.as_bytes()).unwrap();
        assert_eq!(
            single_image(&d).unwrap(),
            ("root & co.hds", 8192 * 512, 2048 * 512)
        );
    }

    #[test]
    fn refuses_what_it_does_not_read() {
        let x = xml(8192, 2048, "root.hds");
        for (from, to, want) in [
            ("<Type>Compressed</Type>", "<Type>Plain</Type>", "'Plain'"),
            ("<Start>0</Start>", "<Start>1</Start>", "whole disk"),
            ("<End>8192</End>", "<End>4096</End>", "whole disk"),
            (
                "<Disk_size>8192</Disk_size>",
                "<Disk_size>x</Disk_size>",
                "not a number",
            ),
            ("</Storage>", "</Storage><Storage></Storage>", "split"),
            ("</Shot>", "</Shot><Shot></Shot>", "single-snapshot"),
            ("<ParentGUID>{0", "<ParentGUID>{1", "root snapshot"),
            (
                "<?xml version='1.0' encoding='UTF-8'?>",
                "<!DOCTYPE x [<!ENTITY a 'b'>]>",
                "DOCTYPE",
            ),
            (
                "<File Protected=\"False\">root.hds",
                "<File>",
                "empty <File>",
            ),
            ("</Parallels_disk_image>", "", "complete"),
        ] {
            let y = x.replacen(from, to, 1);
            assert_ne!(x, y, "{from}");
            let e = parse(y.as_bytes()).and_then(|d| single_image(&d).map(|_| ()));
            let e = e.unwrap_err().to_string();
            assert!(e.contains(want), "{from} -> {to}: {e}");
        }
        let deep = format!("<{ROOT}>{}", "<a>".repeat(40));
        assert!(parse(deep.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("deeper"));
    }
}

//! The VMDK descriptor: the text that names the extents and holds the disk database
//! (VMware Virtual Disk Format 1.1, section "The Descriptor File").
//!
//! Parsing is tolerant where VMware and QEMU are: CRLF or LF line ends, comments (`#`),
//! blank lines, spaces around `=`, quoted or bare values, unknown keys (kept, in order).
//! It is strict on extent lines: a line that starts with an access mode must be a complete
//! extent line, or the descriptor is refused, naming the line.
//!
//! [`Descriptor::parse`] followed by [`Descriptor::write`] and parsing again gives the same
//! [`Descriptor`] (comments and blank lines are not kept); the `vmdk_descriptor` fuzz target
//! checks it.

use super::error::VmdkError;

/// Largest descriptor vimg reads (QEMU reads at most 1 MiB - 1).
pub const MAX_DESCRIPTOR_BYTES: usize = 1 << 20;
/// Most extent lines one descriptor may have (a 2 TiB twoGbMaxExtent disk has 1024).
pub const MAX_EXTENTS: usize = 16384;

/// Access mode of an extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read and write.
    Rw,
    /// Read only.
    RdOnly,
    /// No access: reads as zeros here (its file is never opened).
    NoAccess,
}

impl Access {
    fn parse(s: &str) -> Option<Access> {
        Some(match s {
            "RW" => Access::Rw,
            "RDONLY" => Access::RdOnly,
            "NOACCESS" => Access::NoAccess,
            _ => return None,
        })
    }

    /// The keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Rw => "RW",
            Access::RdOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        }
    }
}

/// Type of an extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentType {
    /// Hosted sparse extent (KDMV) or, in a vmfsSparse disk, a COWD file.
    Sparse,
    /// Raw bytes at an offset of a file.
    Flat,
    /// Reads as zeros; no file.
    Zero,
    /// ESXi flat file.
    Vmfs,
    /// ESX Server sparse extent (COWD).
    VmfsSparse,
    /// ESXi space-efficient sparse extent.
    SeSparse,
    /// ESXi raw device mapping: names a device, never opened by vimg.
    VmfsRdm,
    /// ESXi raw device mapping (physical): never opened by vimg.
    VmfsRaw,
}

impl ExtentType {
    fn parse(s: &str) -> Option<ExtentType> {
        Some(match s {
            "SPARSE" => ExtentType::Sparse,
            "FLAT" => ExtentType::Flat,
            "ZERO" => ExtentType::Zero,
            "VMFS" => ExtentType::Vmfs,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "SESPARSE" => ExtentType::SeSparse,
            "VMFSRDM" => ExtentType::VmfsRdm,
            "VMFSRAW" => ExtentType::VmfsRaw,
            _ => return None,
        })
    }

    /// The keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            ExtentType::Sparse => "SPARSE",
            ExtentType::Flat => "FLAT",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::SeSparse => "SESPARSE",
            ExtentType::VmfsRdm => "VMFSRDM",
            ExtentType::VmfsRaw => "VMFSRAW",
        }
    }
}

/// One extent line: `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access mode.
    pub access: Access,
    /// Size in sectors.
    pub sectors: u64,
    /// Extent type.
    pub kind: ExtentType,
    /// File name as written (absent for ZERO extents).
    pub file: Option<String>,
    /// Offset in sectors into the file (flat extents).
    pub offset: Option<u64>,
}

/// A `key = value` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The key, trimmed.
    pub key: String,
    /// The value, trimmed, without its surrounding quotes.
    pub value: String,
    /// The value was quoted.
    pub quoted: bool,
}

/// A parsed descriptor: its key/value entries and extent lines, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Every `key = value` line (header keys and `ddb.*`), in order.
    pub entries: Vec<Entry>,
    /// Every extent line, in order.
    pub extents: Vec<ExtentLine>,
}

fn bad(line: usize, why: impl Into<String>) -> VmdkError {
    VmdkError::Descriptor {
        line,
        why: why.into(),
    }
}

fn parse_extent(line_no: usize, line: &str) -> Result<ExtentLine, VmdkError> {
    let mut rest = line;
    let word = |rest: &mut &str| -> Option<String> {
        let t = rest.trim_start();
        if t.is_empty() {
            return None;
        }
        let end = t.find(char::is_whitespace).unwrap_or(t.len());
        let w = t[..end].to_string();
        *rest = &t[end..];
        Some(w)
    };
    let access = word(&mut rest)
        .and_then(|w| Access::parse(&w))
        .ok_or_else(|| bad(line_no, "extent line without access mode"))?;
    let sectors_s = word(&mut rest).ok_or_else(|| bad(line_no, "extent line without size"))?;
    let sectors: u64 = parse_decimal(&sectors_s).ok_or_else(|| {
        bad(
            line_no,
            format!("extent size '{sectors_s}' is not a number"),
        )
    })?;
    let kind_s = word(&mut rest).ok_or_else(|| bad(line_no, "extent line without type"))?;
    let kind = ExtentType::parse(&kind_s)
        .ok_or_else(|| bad(line_no, format!("unknown extent type '{kind_s}'")))?;
    let t = rest.trim_start();
    let (file, after) = if let Some(q) = t.strip_prefix('"') {
        let end = q
            .find('"')
            .ok_or_else(|| bad(line_no, "extent file name without closing quote"))?;
        (Some(q[..end].to_string()), &q[end + 1..])
    } else if t.is_empty() {
        (None, t)
    } else {
        return Err(bad(line_no, "extent file name is not quoted"));
    };
    if after.starts_with(|c: char| !c.is_whitespace()) {
        return Err(bad(line_no, "text right after the extent file name"));
    }
    let mut after = after;
    let offset = match word(&mut after) {
        None => None,
        Some(o) => Some(
            parse_decimal(&o)
                .ok_or_else(|| bad(line_no, format!("extent offset '{o}' is not a number")))?,
        ),
    };
    if let Some(extra) = word(&mut after) {
        return Err(bad(
            line_no,
            format!("unexpected '{extra}' after the extent"),
        ));
    }
    if kind == ExtentType::Vmfs && offset.is_some_and(|o| o != 0) {
        // VMware writes 0 there (vimg reads that); qemu takes no offset at all.
        return Err(bad(line_no, "a VMFS extent takes no offset other than 0"));
    }
    if file.is_none() && kind != ExtentType::Zero {
        return Err(bad(line_no, "extent line without file name"));
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
    })
}

fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// True when the first word of `line` is an access mode (an extent line).
fn is_extent_line(line: &str) -> bool {
    let first = line.split(char::is_whitespace).next().unwrap_or("");
    Access::parse(first).is_some() && line.len() > first.len()
}

impl Descriptor {
    /// Parses descriptor text. Text after a NUL byte is ignored (embedded descriptors are
    /// NUL-padded).
    pub fn parse(text: &str) -> Result<Descriptor, VmdkError> {
        let text = text.split('\0').next().unwrap_or("");
        let mut d = Descriptor::default();
        for (i, raw) in text.split('\n').enumerate() {
            let line_no = i + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if is_extent_line(line) {
                if d.extents.len() >= MAX_EXTENTS {
                    return Err(bad(
                        line_no,
                        format!("more than {MAX_EXTENTS} extent lines"),
                    ));
                }
                d.extents
                    .push(parse_extent(line_no, line).map_err(|e| match e {
                        VmdkError::Descriptor { line: l, why } => VmdkError::ExtentLine {
                            line: l,
                            text: crate::escape::escape_control(line.trim()).into_owned(),
                            why,
                        },
                        e => e,
                    })?);
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                // VMware and QEMU skip lines they do not understand.
                continue;
            };
            let key = k.trim();
            if key.is_empty() {
                continue;
            }
            let v = v.trim();
            let (value, quoted) = match v.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
                Some(inner) if v.len() >= 2 => (inner.to_string(), true),
                _ => (v.to_string(), false),
            };
            d.entries.push(Entry {
                key: key.to_string(),
                value,
                quoted,
            });
        }
        Ok(d)
    }

    /// Parses descriptor bytes (lossy UTF-8, as names are ASCII in practice).
    pub fn parse_bytes(bytes: &[u8]) -> Result<Descriptor, VmdkError> {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        Descriptor::parse(&String::from_utf8_lossy(&bytes[..end]))
    }

    /// The value of the first entry named `key` (case-sensitive, as VMware's keys are).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
    }

    /// A hexadecimal CID (`CID`, `parentCID`).
    pub fn get_cid(&self, key: &str) -> Option<u32> {
        let v = self.get(key)?.trim();
        u32::from_str_radix(v, 16).ok()
    }

    /// Writes the descriptor in the canonical layout: header entries, extents, then `ddb.*`.
    pub fn write(&self) -> String {
        let mut s = String::from("# Disk DescriptorFile\n");
        let entry = |s: &mut String, e: &Entry| {
            if e.quoted {
                s.push_str(&format!("{}=\"{}\"\n", e.key, e.value));
            } else {
                s.push_str(&format!("{}={}\n", e.key, e.value));
            }
        };
        for e in self.entries.iter().filter(|e| !e.key.starts_with("ddb.")) {
            entry(&mut s, e);
        }
        s.push_str("\n# Extent description\n");
        for x in &self.extents {
            s.push_str(&format!(
                "{} {} {}",
                x.access.as_str(),
                x.sectors,
                x.kind.as_str()
            ));
            if let Some(f) = &x.file {
                s.push_str(&format!(" \"{f}\""));
            }
            if let Some(o) = x.offset {
                s.push_str(&format!(" {o}"));
            }
            s.push('\n');
        }
        s.push_str("\n# The Disk Data Base\n#DDB\n\n");
        for e in self.entries.iter().filter(|e| e.key.starts_with("ddb.")) {
            entry(&mut s, e);
        }
        s
    }

    /// The descriptor with its entries put in the order [`Descriptor::write`] uses, so that
    /// `parse(write(d)) == d.canonical()`.
    pub fn canonical(&self) -> Descriptor {
        let mut entries: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| !e.key.starts_with("ddb."))
            .cloned()
            .collect();
        entries.extend(
            self.entries
                .iter()
                .filter(|e| e.key.starts_with("ddb."))
                .cloned(),
        );
        Descriptor {
            entries,
            extents: self.extents.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vmware_and_qemu_text() {
        let t = "# Disk DescriptorFile\r\nversion=1 \r\nCID=f879aea6\r\nparentCID = ffffffff\r\n\
                 createType=\"twoGbMaxExtentSparse\"\r\n\r\n# Extent description\r\n\
                 RW 20480 SPARSE \"a b-s001.vmdk\"\r\nRDONLY 8 FLAT \"x.bin\" 16\r\n\
                 NOACCESS 4 ZERO\r\n#DDB\r\nddb.adapterType = \"ide\"\r\nddb.unknown.key=\"v\"\r\n";
        let d = Descriptor::parse(t).unwrap();
        assert_eq!(d.get("version"), Some("1"));
        assert_eq!(d.get_cid("CID"), Some(0xf879aea6));
        assert_eq!(d.get_cid("parentCID"), Some(0xffffffff));
        assert_eq!(d.get("createType"), Some("twoGbMaxExtentSparse"));
        assert_eq!(d.get("ddb.adapterType"), Some("ide"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file.as_deref(), Some("a b-s001.vmdk"));
        assert_eq!(d.extents[1].access, Access::RdOnly);
        assert_eq!(d.extents[1].offset, Some(16));
        assert_eq!(d.extents[2].kind, ExtentType::Zero);
        assert_eq!(d.extents[2].file, None);
        let again = Descriptor::parse(&d.write()).unwrap();
        assert_eq!(again, d.canonical());
    }

    #[test]
    fn vmfs_line_with_offset_is_valid() {
        let d = Descriptor::parse("RW 20480 VMFS \"image_t4-flat.vmdk\" 0\n").unwrap();
        assert_eq!(d.extents[0].kind, ExtentType::Vmfs);
        assert_eq!(d.extents[0].offset, Some(0));
    }

    #[test]
    fn bad_extent_lines_are_errors() {
        for line in [
            "RW x SPARSE \"a\"",
            "RW 10 BOGUS \"a\"",
            "RW 10 SPARSE \"a",
            "RW 10 SPARSE a",
            "RW 10 FLAT \"a\" 1x",
            "RW 10 FLAT \"a\" 1 2",
            "RW 10 FLAT",
            "RW 10 FLAT \"a\"b",
            "RW 99999999999999999999999 FLAT \"a\"",
            "RW 12582912 VMFS \"dummy.vmdk\" 1",
        ] {
            let e = Descriptor::parse(&format!("version=1\n{line}\n")).unwrap_err();
            assert!(e.to_string().contains("line 2"), "{line}: {e}");
        }
    }

    #[test]
    fn quotes_and_nul_padding() {
        let d = Descriptor::parse("a=\"\"\nb=\"\nc = \" x \" \nd=e\0garbage=1").unwrap();
        assert_eq!(d.entries.len(), 4);
        assert_eq!(
            (d.entries[0].value.as_str(), d.entries[0].quoted),
            ("", true)
        );
        assert_eq!(
            (d.entries[1].value.as_str(), d.entries[1].quoted),
            ("\"", false)
        );
        assert_eq!(d.entries[2].value, " x ");
        assert_eq!(Descriptor::parse(&d.write()).unwrap(), d.canonical());
    }
}

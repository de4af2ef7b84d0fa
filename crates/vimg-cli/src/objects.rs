//! `--object`, as qemu-img takes it: `secret,id=ID,data=VALUE[,format=raw|base64]` or
//! `secret,id=ID,file=PATH[,format=...]`. The command line is trusted, so a secret is read
//! from where the user said. Secrets are parsed and checked at start (a bad definition fails
//! before any image is opened, as in qemu-img) and kept for the images that need one
//! (encrypted formats, referenced by `encrypt.key-secret`/`key-secret`).
//!
//! Only `secret` objects exist here. qemu-img's encrypted secrets (`keyid=`, `iv=`, a master
//! key object) and other object types are refused rather than ignored.

use std::sync::OnceLock;

use base64::Engine as _;

use crate::Failure;

/// A secret the user defined.
pub struct Secret {
    /// The object's `id`.
    pub id: String,
    /// The decoded value.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the value.
        f.debug_struct("Secret")
            .field("id", &self.id)
            .field("len", &self.data.len())
            .finish()
    }
}

static SECRETS: OnceLock<Vec<Secret>> = OnceLock::new();

/// Parses every `--object` definition; call once at start.
pub fn init(defs: &[String]) -> Result<(), Failure> {
    let mut v: Vec<Secret> = Vec::new();
    for d in defs {
        let s = parse(d)?;
        if v.iter().any(|o| o.id == s.id) {
            return Err(Failure::new(
                format!("attempt to add duplicate property '{}' to object", s.id),
                1,
            ));
        }
        v.push(s);
    }
    // The library's store is what encrypted formats (LUKS, qcow2 encrypt.format=luks) read.
    for s in &v {
        vimg::secret::define(&s.id, &s.data);
    }
    let _ = SECRETS.set(v);
    Ok(())
}

/// The secret defined with `id`, if any.
#[allow(dead_code)] // Read by the encrypted formats' open path (LUKS) when it lands.
pub fn secret(id: &str) -> Option<&'static [u8]> {
    SECRETS
        .get()?
        .iter()
        .find(|s| s.id == id)
        .map(|s| s.data.as_slice())
}

/// QEMU's option syntax: `,,` is a literal comma.
fn split_opts(s: &str) -> Vec<String> {
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
    items
}

fn parse(def: &str) -> Result<Secret, Failure> {
    let bad = |m: String| Failure::new(format!("--object '{}': {m}", redact(def)), 1);
    let mut items = split_opts(def).into_iter();
    let first = items.next().unwrap_or_default();
    let kind = match first.split_once('=') {
        Some(("qom-type", t)) => t.to_string(),
        Some(_) => return Err(bad("the object type comes first (secret,id=...)".into())),
        None => first,
    };
    if kind != "secret" {
        return Err(bad(format!(
            "object type '{kind}' is not supported by vimg"
        )));
    }
    let (mut id, mut data, mut file, mut format) = (None, None, None, None);
    for item in items {
        let Some((k, v)) = item.split_once('=') else {
            return Err(bad(format!("expected key=value, got '{}'", redact(&item))));
        };
        let slot = match k {
            "id" => &mut id,
            "data" => &mut data,
            "file" => &mut file,
            "format" => &mut format,
            "keyid" | "iv" => {
                return Err(bad(
                    "encrypted secrets (keyid, iv) are not supported by vimg".into(),
                ))
            }
            "loaded" => continue,
            other => return Err(bad(format!("unknown property '{other}'"))),
        };
        *slot = Some(v.to_string());
    }
    let id = id.ok_or_else(|| bad("Parameter 'id' is missing".into()))?;
    let raw = match (data, file) {
        (Some(d), None) => d.into_bytes(),
        (None, Some(f)) => {
            std::fs::read(&f).map_err(|e| bad(format!("Unable to read {f}: {e}")))?
        }
        (Some(_), Some(_)) => return Err(bad("'data' and 'file' are mutually exclusive".into())),
        (None, None) => return Err(bad("Either 'data' or 'file' must be provided".into())),
    };
    let data = match format.as_deref() {
        None | Some("raw") => raw,
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(raw.trim_ascii())
            .map_err(|e| bad(format!("invalid base64 data: {e}")))?,
        Some(other) => return Err(bad(format!("Invalid parameter format '{other}'"))),
    };
    Ok(Secret { id, data })
}

/// The definition with the value of `data=` hidden (for error messages).
fn redact(def: &str) -> String {
    split_opts(def)
        .iter()
        .map(|i| match i.split_once('=') {
            Some(("data", _)) => "data=***".to_string(),
            _ => i.replace(',', ",,"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets() {
        let s = parse("secret,id=sec0,data=let,,me,,in").unwrap();
        assert_eq!(
            (s.id.as_str(), s.data.as_slice()),
            ("sec0", &b"let,me,in"[..])
        );
        let s = parse("secret,id=k,data=aGVsbG8=,format=base64").unwrap();
        assert_eq!(s.data, b"hello");
        let s = parse("qom-type=secret,id=k,data=x").unwrap();
        assert_eq!(s.data, b"x");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, b"from-file").unwrap();
        let s = parse(&format!("secret,id=f,file={}", f.display())).unwrap();
        assert_eq!(s.data, b"from-file");
        for bad in [
            "secret,data=x",
            "secret,id=a",
            "secret,id=a,data=x,file=/y",
            "secret,id=a,data=x,keyid=m,iv=aa",
            "secret,id=a,data=!!,format=base64",
            "secret,id=a,data=x,format=hex",
            "iothread,id=io0",
            "secret,id=a,data=x,bogus=1",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(!e.message.contains("data=x,"), "{bad}: {}", e.message);
        }
        assert!(format!("{:?}", parse("secret,id=a,data=hunter2").unwrap()).contains("len: 7"));
        assert!(!redact("secret,id=a,data=hunter2").contains("hunter2"));
    }
}

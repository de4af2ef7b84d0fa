//! The registry: which driver answers for each [`Format`], probing (a known magic is never
//! raw) and the option lists. The only module that names every driver; the contract in
//! [`super`] names none, so a driver depends on the contract, never on the other drivers.

use super::{bochs, cloop, dmg, luks, parallels, qcow, qcow2, qed, raw, vdi, vhd, vhdx, vmdk};
use super::{Driver, Format};
use crate::error::{Error, Result};
use crate::options::{CreateOptions, OptionSpec};
use crate::output::Output;
use crate::storage::Storage;
use crate::writer::ImageWriter;

/// The driver for `format`.
pub fn driver(format: Format) -> &'static dyn Driver {
    match format {
        Format::Raw => &raw::Driver,
        Format::Qcow2 => &qcow2::Driver,
        Format::Vmdk => &vmdk::Driver,
        Format::Vpc => &vhd::Driver,
        Format::Vhdx => &vhdx::Driver,
        Format::Vdi => &vdi::Driver,
        Format::Parallels => &parallels::Driver,
        Format::Qed => &qed::Driver,
        Format::Qcow => &qcow::Driver,
        Format::Luks => &luks::Driver,
        Format::Dmg => &dmg::Driver,
        Format::Bochs => &bochs::Driver,
        Format::Cloop => &cloop::Driver,
    }
}

impl Format {
    /// The driver for this format ([`driver`]).
    pub fn driver(self) -> &'static dyn Driver {
        driver(self)
    }
}

/// Bytes read to probe a format.
const PROBE_BYTES: usize = 64 * 1024;

/// Probes `storage`: the one format that matches, raw when none does, an error when several
/// do (a polyglot file is refused rather than guessed).
pub fn probe(storage: &dyn Storage) -> Result<Format> {
    let n = storage.len().min(PROBE_BYTES as u64) as usize;
    let mut head = vec![0u8; n];
    storage
        .read_exact_at(&mut head, 0)
        .map_err(|e| Error::io("read the image header", e))?;
    let found = probe_all(&head, storage);
    match found.as_slice() {
        [] => Ok(Format::Raw),
        [one] => Ok(*one),
        many => Err(Error::invalid(format!(
            "Image is ambiguous: it parses as {}; specify the format with -f",
            many.iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(" and ")
        ))),
    }
}

/// The formats whose probe matches, in probe order. Raw never probes; an empty list means
/// raw.
pub fn probe_all(head: &[u8], storage: &dyn Storage) -> Vec<Format> {
    Format::ALL
        .iter()
        .copied()
        .filter(|f| *f != Format::Raw && driver(*f).probe(head, storage))
        .collect()
}

/// Every option `format` accepts, `size` included.
pub fn all_options(format: Format) -> Vec<OptionSpec> {
    let own = driver(format).create_options();
    let mut v = Vec::with_capacity(own.len() + 1);
    // A format may word `size` its own way (vhdx: "max of 64TB").
    if !own.iter().any(|o| o.name == "size") {
        v.push(crate::options::SIZE_OPTION);
    }
    v.extend_from_slice(own);
    // The protocol's hints, accepted under every format as qemu-img accepts them.
    for p in &crate::options::PROTOCOL_OPTIONS[..2] {
        if !v.iter().any(|o| o.name == p.name) {
            v.push(*p);
        }
    }
    v
}

/// Creates a writer for a new `format` image of `size` bytes in `out`, once the format's
/// [`super::Capabilities`] allow what `opts` and `out` ask (`-c`, `-n`): every writer the
/// library makes comes through here.
pub fn create(
    format: Format,
    out: &Output,
    size: u64,
    opts: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    let d = driver(format);
    d.capabilities().check(format, opts, out.mode())?;
    d.create(out, size, opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::Streaming;

    /// A declared capability agrees with the options the driver takes, and every option
    /// printed on the `Formatting` line is one the format accepts.
    #[test]
    fn capabilities_agree_with_options() {
        for f in Format::ALL {
            let caps = driver(f).capabilities();
            let opts = all_options(f);
            let has = |n: &str| opts.iter().any(|o| o.name == n);
            assert_eq!(caps.backing_file, has("backing_file"), "{f}");
            if caps.create {
                for p in caps.printed {
                    assert!(has(p.name), "{f} prints {} but does not take it", p.name);
                }
            }
        }
    }

    /// Declared choices and streaming conditions name options the format takes; every
    /// choice's default is one of its values, and every value is one the driver's `create`
    /// accepts.
    #[test]
    fn choices_and_streaming_agree_with_options() {
        let dir = tempfile::tempdir().unwrap();
        for f in Format::ALL {
            let try_create = |o: &CreateOptions| {
                let out = Output::new(dir.path().join(f.name()));
                create(f, &out, 1 << 20, o).map(|_| ())
            };
            let caps = driver(f).capabilities();
            if !caps.create {
                continue;
            }
            let opts = all_options(f);
            let has = |n: &str| opts.iter().any(|o| o.name == n);
            for c in caps.choices {
                assert!(has(c.option), "{f} declares choices for {}", c.option);
                assert!(c.values.contains(&c.default), "{f} {}", c.option);
                for v in c.values {
                    let o = CreateOptions::new().with(c.option, *v);
                    assert_eq!(caps.choice(c.option, &o).unwrap(), *v);
                    if let Err(e) = try_create(&o) {
                        // Some values need others (zstd: the cargo feature); none is
                        // refused as a bad value.
                        assert!(
                            !e.to_string().contains("value"),
                            "{f} {}={v}: {e}",
                            c.option
                        );
                    }
                }
                let o = CreateOptions::new().with(c.option, "bogus");
                assert!(caps.choice(c.option, &o).is_err(), "{f} {}", c.option);
                if let Err(e) = try_create(&o) {
                    assert!(e.to_string().contains("bogus"), "{f}: {e}");
                }
            }
            if let Streaming::When { option, values, .. } = caps.streaming {
                assert!(has(option), "{f} streams by {option}");
                let o = CreateOptions::new().with(option, values[0]);
                assert!(caps.check_stream(&o).is_ok(), "{f}");
                assert!(caps.check_stream(&CreateOptions::new()).is_err(), "{f}");
            }
        }
    }

    /// A format that needs to seek is refused on stdout before anything is created.
    #[test]
    fn stdout_refused_before_create_for_formats_that_seek() {
        let out = Output::with_mode("-", crate::OutputMode::Stdout);
        for f in [
            Format::Qcow2,
            Format::Vhdx,
            Format::Vpc,
            Format::Vdi,
            Format::Vmdk,
        ] {
            let e = create(f, &out, 1 << 20, &CreateOptions::new())
                .err()
                .expect("refused");
            assert_eq!(e.kind(), crate::ErrorKind::Unsupported, "{f}: {e}");
            assert!(e.to_string().contains("stream"), "{f}: {e}");
        }
    }

    /// `-c` and `-n` are refused once, here, before the driver is asked to create.
    #[test]
    fn compression_and_in_place_refused_before_create() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = CreateOptions::new();
        c.compress = true;
        let out = Output::new(dir.path().join("x"));
        let err = |f: Format, out: &Output, o: &CreateOptions| {
            create(f, out, 1 << 20, o).err().expect("refused")
        };
        let e = err(Format::Vdi, &out, &c);
        assert!(e.is_refusal());
        assert_eq!(
            e.to_string(),
            "Compression not supported for this file format"
        );
        let inplace = Output::with_mode(dir.path().join("y"), crate::OutputMode::InPlace);
        let e = err(Format::Vdi, &inplace, &c);
        assert!(e.is_refusal());
        // qcow (version 1) compresses and is written in place.
        let caps = driver(Format::Qcow).capabilities();
        caps.check(Format::Qcow, &c, crate::OutputMode::InPlace)
            .unwrap();
        assert!(!dir.path().join("x").exists() && !dir.path().join("y").exists());
    }
}

//! The registry: which driver answers for each [`Format`], probing (a known magic is never
//! raw) and the option lists. The only module that names every driver; the contract in
//! [`super`] names none, so a driver depends on the contract, never on the other drivers.

use super::{bochs, cloop, dmg, parallels, qcow, qcow2, qed, raw, unread, vdi, vhd, vhdx, vmdk};
use super::{Driver, Format};
use crate::error::{Error, Result};
use crate::options::OptionSpec;
use crate::storage::Storage;

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
        Format::Luks => &unread::LUKS,
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

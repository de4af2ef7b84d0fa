//! `vimg rebase`: qemu-img rebase's command line. Unsafe mode (`-u`) on qcow2: only the
//! backing file name and format in the header change, written as one sector as `amend`
//! writes the header (a crash leaves the old reference or the new one); `-b ""` or no
//! `-b` removes the reference. The new backing file is not opened, as qemu-img does not
//! open it in this mode. Safe mode (without `-u`) copies the clusters whose content differs
//! between the old and the new backing chain into the image, then changes the header
//! ([`vimg::inplace::rebase`]); `-b ""` flattens.

use std::path::Path;

use clap::Args;
use vimg::formats::updater;
use vimg::formats::updater::UpdateOp;
use vimg::Format;

use crate::args::SafetyArgs;
use crate::{CmdResult, Failure};

#[derive(Args, Debug)]
pub struct RebaseArgs {
    /// Image format (probed from the content when absent).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// The new backing file ("" for none), stored as given.
    #[arg(short = 'b', long = "backing", value_name = "BACKING_FILENAME")]
    pub backing: Option<String>,
    /// The new backing file's format (required with a non-empty -b in -u mode).
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    pub backing_format: Option<String>,
    /// Unsafe mode: change only the backing reference, not the image's data.
    #[arg(short = 'u', long = "backing-unsafe")]
    pub unsafe_mode: bool,
    /// Compress the clusters safe mode copies (safe mode only; refused with it).
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Show progress (accepted; unsafe mode is one write).
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Cache mode of the image (accepted; vimg flushes the header write).
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Cache mode of the backing file (accepted; unsafe mode does not open it).
    #[arg(short = 'T', long = "backing-cache", value_name = "CACHE")]
    pub backing_cache: Option<String>,
    #[command(flatten)]
    pub safety: SafetyArgs,
    /// The image.
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// qemu's protocol drivers, accepted by `rebase -u -F` as backing format names.
const PROTOCOL_DRIVERS: &[&str] = &["file", "host_device", "host_cdrom"];

pub fn run(a: RebaseArgs) -> CmdResult {
    let file = super::one_image("rebase", &a.files)?;
    // qemu-img's usage check: a safe rebase needs the new backing file named (`-b ""`
    // removes it); without -b it is refused, not read as "remove the backing file".
    if !a.unsafe_mode && a.backing.is_none() {
        return Err(Failure::new(
            format!(
                "Must specify backing file (-b) or use unsafe mode (-u)\nTry '{} rebase --help' for more info",
                crate::trust::prefix()
            ),
            1,
        ));
    }
    // qemu-img takes any of its block drivers' names there, protocol drivers included
    // (iotest 031 stores `host_device`); unsafe mode only stores the name.
    let protocol_fmt = a
        .backing_format
        .as_deref()
        .filter(|n| a.unsafe_mode && PROTOCOL_DRIVERS.contains(n));
    let backing_format = match a.backing_format.as_deref() {
        None => None,
        Some(_) if protocol_fmt.is_some() => None,
        Some(name) => Some(
            Format::from_name(name)
                .filter(|f| f.name() == name)
                .ok_or_else(|| Failure::new(format!("Invalid format name: '{name}'"), 1))?,
        ),
    };
    let path = Path::new(file);
    let format = super::image_format(file, a.format.as_deref())?;
    // qemu-img refuses -c, in either mode, for a format whose driver writes no compressed
    // clusters (qcow2, qcow and vmdk do), before it opens any backing file.
    if a.compress && !matches!(format, Format::Qcow2 | Format::Qcow | Format::Vmdk) {
        return Err(Failure::new(
            "Compression not supported for this file format",
            1,
        ));
    }
    let new_name = a.backing.as_deref().filter(|b| !b.is_empty());
    let policy = crate::trust::policy(&a.safety);
    if !a.unsafe_mode {
        return safe(&a, file, path, format, backing_format, new_name, policy);
    }
    let new = match (new_name, backing_format) {
        (None, _) => None,
        (Some(b), Some(f)) => Some((b, f.name())),
        (Some(b), None) if protocol_fmt.is_some() => Some((b, protocol_fmt.unwrap_or(""))),
        (Some(b), None) => {
            return Err(Failure::new(
                format!(
                    "Could not change the backing file to '{b}': backing format must be specified"
                ),
                1,
            ))
        }
    };
    let change_err = |e: vimg::Error| {
        Failure::new(
            format!(
                "Could not change the backing file to '{}': {}",
                new_name.unwrap_or(""),
                e.message()
            ),
            1,
        )
    };
    updater::require(format, UpdateOp::Backing).map_err(change_err)?;
    let mut img = updater::open(path, format, policy).map_err(|e| Failure::open(file, &e))?;
    img.set_backing(new).map_err(change_err)?;
    Ok(0)
}

/// Safe mode: the clusters that differ between the old and the new backing chain are
/// copied into the image, then the header changes. Refused before anything is written when
/// the header change would fail (qemu-img copies first and fails after).
fn safe(
    a: &RebaseArgs,
    file: &str,
    path: &Path,
    format: Format,
    backing_format: Option<Format>,
    new_name: Option<&str>,
    policy: vimg::ExternalPolicy,
) -> CmdResult {
    let change_err = |msg: String| {
        Failure::new(
            format!(
                "Could not change the backing file to '{}': {msg}",
                new_name.unwrap_or("")
            ),
            1,
        )
    };
    if a.compress && format != Format::Qcow2 {
        return Err(Failure::new(
            format!("vimg cannot compress the clusters rebase copies into {} images; '{file}' is unchanged", format.name()),
            1,
        ));
    }
    updater::require(format, UpdateOp::Backing).map_err(|e| change_err(e.message().to_string()))?;
    if new_name.is_some() && backing_format.is_none() {
        return Err(change_err("backing format must be specified".into()));
    }
    let new_img = match (new_name, backing_format) {
        (Some(b), Some(f)) => {
            // The user named it: opened as given, relative to the image's folder as
            // qemu-img opens it; what it names goes through the gate.
            let full = vimg::image::full_backing_name(Some(path), b);
            let img = vimg::Image::open(
                &full,
                &vimg::OpenOptions::with_format(Some(f)).policy(policy),
            )
            .map_err(|e| {
                Failure::new(
                    format!(
                        "Could not open new backing file '{b}': Could not open '{full}': {}",
                        e.message()
                    ),
                    1,
                )
            })?;
            Some((b, f, img))
        }
        _ => None,
    };
    let reporter = crate::progress::Reporter::new(
        (a.progress && !a.quiet).then_some(crate::args::ProgressMode::Auto),
        false,
    );
    let new = new_img
        .as_ref()
        .map(|(name, f, img)| vimg::inplace::NewBacking {
            name,
            format: *f,
            image: img,
        });
    let r = vimg::inplace::rebase_with(path, format, policy, new, a.compress, &|p| {
        reporter.update(p)
    });
    reporter.finish(r.is_ok());
    match r {
        Ok(_) => Ok(0),
        Err(e) if e.is_refusal() => Err(change_err(e.message().to_string())),
        Err(e) => Err(Failure::new(
            format!("Could not rebase '{file}': {}", e.message()),
            1,
        )),
    }
}

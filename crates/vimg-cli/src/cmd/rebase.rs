//! `vimg rebase`: qemu-img rebase's command line. Unsafe mode (`-u`) on qcow2: only the
//! backing file name and format in the header change, written as one sector as `amend`
//! writes the header (a crash leaves the old reference or the new one); `-b ""` or no
//! `-b` removes the reference. The new backing file is not opened, as qemu-img does not
//! open it in this mode. Safe mode (without `-u`, which copies the clusters whose content
//! differs between the old and the new backing) is refused before anything is written.

use std::path::Path;

use clap::Args;
use vimg::formats::qcow2::Qcow2Update;
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

pub fn run(a: RebaseArgs) -> CmdResult {
    if a.files.len() != 1 {
        return Err(Failure::new(
            format!(
                "Expecting one image file name\nTry '{} rebase --help' for more info",
                crate::trust::prefix()
            ),
            1,
        ));
    }
    let file = &a.files[0];
    let backing_format = match a.backing_format.as_deref() {
        None => None,
        Some(name) => Some(
            Format::from_name(name)
                .filter(|f| f.name() == name)
                .ok_or_else(|| Failure::new(format!("Invalid format name: '{name}'"), 1))?,
        ),
    };
    let path = Path::new(file);
    let format = match a.format.as_deref() {
        Some(name) => Format::from_name(name).ok_or_else(|| {
            Failure::new(
                format!("Could not open '{file}': Unknown driver '{name}'"),
                1,
            )
        })?,
        None => {
            let st = vimg::storage::FileStorage::open(path)
                .map_err(|e| Failure::open(file, &vimg::Error::io("open", e)))?;
            vimg::formats::registry::probe(&st).map_err(|e| Failure::open(file, &e))?
        }
    };
    if !a.unsafe_mode {
        return Err(Failure::new(
            format!(
                "vimg cannot rebase in safe mode yet (copying the clusters that differ between the old and the new backing file); '{file}' is unchanged. Use -u if the new backing file has the same content as the old one, or qemu-img rebase"
            ),
            1,
        ));
    }
    let new_name = a.backing.as_deref().filter(|b| !b.is_empty());
    let new = match (new_name, backing_format) {
        (None, _) => None,
        (Some(b), Some(f)) => Some((b, f.name())),
        (Some(b), None) => {
            return Err(Failure::new(
                format!(
                    "Could not change the backing file to '{b}': backing format must be specified"
                ),
                1,
            ))
        }
    };
    if format != Format::Qcow2 {
        let what = match format {
            // Formats qemu-img cannot give a backing file at all.
            Format::Raw => "Operation not supported".to_string(),
            f => format!(
                "vimg changes the backing file of qcow2 images only, not {}",
                f.name()
            ),
        };
        return Err(Failure::new(
            format!(
                "Could not change the backing file to '{}': {what}",
                new_name.unwrap_or("")
            ),
            1,
        ));
    }
    let policy = crate::trust::policy(&a.safety);
    let mut img = Qcow2Update::open(path, policy).map_err(|e| Failure::open(file, &e))?;
    img.set_backing(new).map_err(|e| {
        Failure::new(
            format!(
                "Could not change the backing file to '{}': {}",
                new_name.unwrap_or(""),
                e.message()
            ),
            1,
        )
    })?;
    Ok(0)
}

//! `vimg snapshot`: qemu-img snapshot's command line. Listing (`-l`, or no action) works for
//! every format (only qcow2 has internal snapshots); creating, applying and deleting
//! (`-c`, `-a`, `-d`) change the image and are refused before anything is written, as vimg
//! does not do them yet.

use clap::Args;
use vimg::info::SnapshotJson;
use vimg::{Image, ImageInfo};

use super::{open_options, parse_format_opt};
use crate::args::SafetyArgs;
use crate::{CmdResult, Failure};

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// Image format (probed from the content when absent).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// List the internal snapshots (the default).
    #[arg(short = 'l')]
    pub list: bool,
    /// Apply (revert to) a snapshot (not supported yet: refused).
    #[arg(short = 'a', value_name = "SNAPSHOT")]
    pub apply: Option<String>,
    /// Create a snapshot (not supported yet: refused).
    #[arg(short = 'c', value_name = "SNAPSHOT")]
    pub create: Option<String>,
    /// Delete a snapshot (not supported yet: refused).
    #[arg(short = 'd', value_name = "SNAPSHOT")]
    pub delete: Option<String>,
    /// Quiet (the list is printed anyway, as qemu-img does).
    #[arg(short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub safety: SafetyArgs,
    /// The image.
    pub filename: String,
}

pub fn run(a: SnapshotArgs) -> CmdResult {
    let actions = usize::from(a.list)
        + usize::from(a.apply.is_some())
        + usize::from(a.create.is_some())
        + usize::from(a.delete.is_some());
    if actions > 1 {
        return Err(Failure::new(
            format!(
                "Cannot mix '-l', '-a', '-c', '-d'\nTry '{} snapshot --help' for more info",
                crate::trust::prefix()
            ),
            1,
        ));
    }
    let format = parse_format_opt(a.format.as_deref())?;
    let mut opts = open_options(format, &a.safety);
    opts.open_backing = false;
    let image = Image::open(&a.filename, &opts).map_err(|e| Failure::open(&a.filename, &e))?;
    let what = if a.apply.is_some() {
        Some("apply")
    } else if a.create.is_some() {
        Some("create")
    } else if a.delete.is_some() {
        Some("delete")
    } else {
        None
    };
    if let Some(what) = what {
        return Err(Failure::new(
            format!(
                "vimg cannot {what} internal snapshots yet ('{}' is unchanged); use qemu-img snapshot",
                a.filename
            ),
            1,
        ));
    }
    let snaps: Vec<SnapshotJson> = ImageInfo::of(&image).snapshots;
    if !snaps.is_empty() {
        crate::print_out(&super::info::snapshot_list(&snaps))?;
    }
    Ok(0)
}

//! `vimg snapshot`: qemu-img snapshot's command line. Listing (`-l`, or no action) works for
//! every format (only qcow2 has internal snapshots); creating, applying and deleting
//! (`-c`, `-a`, `-d`) change the image through `vimg::formats::updater`, which refuses
//! formats without internal snapshots, before anything is written, with qemu-img's reasons.

use clap::Args;
use vimg::formats::qcow2::SNAPSHOT_NOT_FOUND;
use vimg::formats::updater::{self, UpdateOp};
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
    /// Apply (revert to) a snapshot (qcow2).
    #[arg(short = 'a', value_name = "SNAPSHOT")]
    pub apply: Option<String>,
    /// Create a snapshot (qcow2).
    #[arg(short = 'c', value_name = "SNAPSHOT")]
    pub create: Option<String>,
    /// Delete a snapshot (qcow2).
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
    if let Some(name) = &a.create {
        return change(&a, &image, name, Action::Create);
    }
    if let Some(name) = &a.apply {
        return change(&a, &image, name, Action::Apply);
    }
    if let Some(name) = &a.delete {
        return change(&a, &image, name, Action::Delete);
    }
    let snaps: Vec<SnapshotJson> = ImageInfo::of(&image).snapshots;
    if !snaps.is_empty() {
        crate::print_out(&super::info::snapshot_list(&snaps))?;
    }
    Ok(0)
}

#[derive(Clone, Copy)]
enum Action {
    Create,
    Apply,
    Delete,
}

/// `-c`, `-a`, `-d` (qcow2 only, as in qemu-img: other formats have no internal snapshots).
fn change(a: &SnapshotArgs, image: &Image, name: &str, what: Action) -> CmdResult {
    let (verb, op) = match what {
        Action::Create => ("create", UpdateOp::SnapshotCreate),
        Action::Apply => ("apply", UpdateOp::SnapshotApply),
        Action::Delete => ("delete", UpdateOp::SnapshotDelete),
    };
    let fail = |msg: &str| Failure::new(format!("Could not {verb} snapshot '{name}': {msg}"), 1);
    let format = image.format();
    if a.format.is_none() {
        super::warn_if_probed_raw(&a.filename, format);
    }
    updater::require(format, op).map_err(|e| fail(&e.message().to_string()))?;
    let policy = crate::trust::policy(&a.safety);
    // Through a blkdebug layer: the file below it when the layer has no rules. vimg
    // changes snapshots by writing whole new tables and switching the header once (no
    // cluster is freed, no entry updated in place), so the events QEMU's rules wait for
    // (`cluster_free`, `l1_update`, ...) have no counterpart: rules are refused.
    let bd = vimg::blkdebug::parse_name(&a.filename, crate::trust::image_opts())
        .map_err(|e| Failure::open(&a.filename, &e))?;
    let path = match bd {
        Some(b) if b.level == vimg::blkdebug::Level::File && !b.has_rules() => {
            std::path::PathBuf::from(&b.inner)
        }
        Some(_) => {
            return Err(fail(
                "vimg does not change snapshots through blkdebug rules (it switches whole \
                 new tables in one header write, so the events the rules wait for do not occur)",
            ))
        }
        None => std::path::PathBuf::from(&a.filename),
    };
    let mut img =
        updater::open(&path, format, policy).map_err(|e| Failure::open(&a.filename, &e))?;
    let r = match what {
        Action::Create => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            img.snapshot_create(name, now.as_secs() as u32, now.subsec_micros() * 1000)
        }
        Action::Apply => img.snapshot_apply(name),
        Action::Delete => img.snapshot_delete(name),
    };
    match r {
        Ok(()) => Ok(0),
        Err(e) if e.message().to_string() == SNAPSHOT_NOT_FOUND => Err(fail(match what {
            Action::Apply => "Failed to load snapshot: No such file or directory",
            _ => SNAPSHOT_NOT_FOUND,
        })),
        Err(e) => Err(fail(&e.message().to_string())),
    }
}

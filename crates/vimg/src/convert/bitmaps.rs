//! `convert --bitmaps`: the source's persistent dirty bitmaps copied into a new qcow2
//! output, as qemu-img's `convert_check_bitmaps` and `convert_copy_bitmaps` do (qcow2 spec:
//! "Bitmaps extension", "Bitmap directory").
//!
//! Before anything is written, [`plan`] checks what qemu-img checks (a source format that
//! can hold persistent bitmaps, no inconsistent bitmap unless skipped, an output format
//! that can hold them) and what vimg cannot do (`-n`, a destination that is not a new
//! regular file, a checksum of the output). Once the data is written and the writer has
//! finished, [`copy`] adds each bitmap to the output, still a temporary file, with the
//! qcow2 updater: in the source's directory order, with its granularity, its bits (a merge
//! of the source bitmap into the new, empty one, as qemu-img populates it) and, for a
//! disabled bitmap, without the `auto` flag. The rename that makes the output visible comes
//! after, so the output appears with every bitmap or not at all.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::options::ConvertOptions;
use crate::error::{Error, ErrorKind, Result};
use crate::formats::qcow2::header::{BME_FLAG_AUTO, BME_FLAG_IN_USE};
use crate::formats::qcow2::{BitmapOp, Qcow2Reader, Qcow2Update};
use crate::formats::Format;
use crate::formats::OpenContext;
use crate::gate::ExternalPolicy;
use crate::image::Image;
use crate::output::OutputMode;
use crate::storage::{FileStorage, Storage};

/// One bitmap to copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopiedBitmap {
    /// Its name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Enabled (the `auto` flag).
    pub enabled: bool,
}

/// What [`copy`] will do: the source file and its bitmaps, in directory order; the
/// warnings qemu-img prints for the inconsistent bitmaps it skips.
#[derive(Clone, Debug, Default)]
pub struct BitmapPlan {
    /// The source file the bitmaps are read from.
    pub source: Option<PathBuf>,
    /// The bitmaps to copy.
    pub bitmaps: Vec<CopiedBitmap>,
    /// qemu-img's warnings ("Skipping inconsistent bitmap 'NAME'").
    pub warnings: Vec<String>,
}

fn refuse(kind: ErrorKind, msg: impl Into<String>) -> Error {
    Error::refusal(kind, msg.into())
}

/// Checks `--bitmaps` for converting `src` with `opts` before anything is written, and
/// lists the bitmaps to copy.
pub fn plan(src: &Image, opts: &ConvertOptions) -> Result<BitmapPlan> {
    let Some(names) = src.reader().persistent_bitmaps() else {
        return Err(refuse(
            ErrorKind::Unsupported,
            "Source lacks bitmap support",
        ));
    };
    let mut plan = BitmapPlan::default();
    if !names.is_empty() {
        if src.format() != Format::Qcow2 {
            return Err(refuse(
                ErrorKind::Unsupported,
                format!(
                    "vimg copies persistent bitmaps from qcow2 images only, not {}",
                    src.format().name()
                ),
            ));
        }
        let path = src.path().ok_or_else(|| {
            refuse(
                ErrorKind::Unsupported,
                "vimg copies persistent bitmaps only from a source opened by file name",
            )
        })?;
        // qemu-img walks its list of the source's bitmaps, which holds them in reverse
        // directory order: the first inconsistent one it meets, and the order of its
        // warnings, are those of that walk. The bitmaps are added in directory order,
        // which gives qemu-img's directory.
        let list = source_bitmaps(path, src.storage().identity())?;
        for b in list.into_iter().rev() {
            if b.flags & BME_FLAG_IN_USE != 0 {
                if opts.skip_broken_bitmaps {
                    plan.warnings
                        .push(format!("Skipping inconsistent bitmap '{}'", b.name));
                    continue;
                }
                return Err(refuse(
                    ErrorKind::InvalidArgument,
                    format!(
                        "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
                        b.name
                    ),
                ));
            }
            plan.bitmaps.push(CopiedBitmap {
                name: b.name,
                granularity: b.granularity,
                enabled: b.flags & BME_FLAG_AUTO != 0,
            });
        }
        plan.bitmaps.reverse();
        plan.source = Some(path.to_path_buf());
    }
    let v2 = matches!(opts.create.get_str("compat"), Some("0.10" | "v2"));
    if opts.format != Format::Qcow2 || v2 {
        return Err(refuse(
            ErrorKind::Unsupported,
            format!(
                "Format driver '{}' does not support bitmaps",
                opts.format.name()
            ),
        ));
    }
    if plan.bitmaps.is_empty() {
        return Ok(plan);
    }
    if opts.output_mode != OutputMode::Atomic {
        return Err(refuse(
            ErrorKind::Unsupported,
            "vimg copies persistent bitmaps (--bitmaps) into a new output file only, not with -n or to a stream",
        ));
    }
    if opts.checksum.is_some() {
        return Err(refuse(
            ErrorKind::Unsupported,
            "vimg does not compute --checksum of an output it copies persistent bitmaps into",
        ));
    }
    if opts.create.has("data_file") {
        return Err(refuse(
            ErrorKind::Unsupported,
            "vimg does not copy persistent bitmaps into an image with an external data file",
        ));
    }
    Ok(plan)
}

/// The persistent bitmaps of the qcow2 image at `path` (opened read-only, naming no other
/// file), in directory order; it must still be the file the source was opened from
/// (`identity`).
fn source_bitmaps(
    path: &Path,
    identity: Option<(u64, u64)>,
) -> Result<Vec<crate::formats::qcow2::Bitmap>> {
    let storage: Arc<dyn Storage> = Arc::new(
        FileStorage::open(path)
            .map_err(|e| Error::io(format_args!("open '{}'", path.display()), e))?,
    );
    if identity.is_none() || storage.identity() != identity {
        return Err(refuse(
            ErrorKind::Unsupported,
            format!(
                "'{}' is not the file the source was opened from; vimg copies persistent bitmaps only from a qcow2 file opened by name",
                path.display()
            ),
        ));
    }
    let ctx = OpenContext::new(Some(path), ExternalPolicy::Deny);
    let r = Qcow2Reader::open(storage, &ctx)?;
    Ok(r.bitmaps().to_vec())
}

/// Adds the bitmaps of `plan` to the finished qcow2 image at `target` (the output's
/// temporary file): each created with its granularity, filled from the source, disabled
/// when it was. `policy` is the gate for files the target names (its backing file).
pub fn copy(plan: &BitmapPlan, target: &Path, policy: ExternalPolicy) -> Result<()> {
    let Some(source) = &plan.source else {
        return Ok(());
    };
    if plan.bitmaps.is_empty() {
        return Ok(());
    }
    let mut up = Qcow2Update::open(target, policy)?;
    up.keep_other_bitmaps();
    for b in &plan.bitmaps {
        let add = BitmapOp::Add {
            granularity: Some(b.granularity),
        };
        up.bitmap(&b.name, &add).map_err(|e| {
            Error::refusal(
                e.kind(),
                format!("Failed to create bitmap {}: {}", b.name, e.message()),
            )
        })?;
        let merge = BitmapOp::MergeFrom {
            file: source.clone(),
            source: b.name.clone(),
        };
        up.bitmap(&b.name, &merge).map_err(|e| {
            Error::refusal(
                e.kind(),
                format!("Failed to populate bitmap {}: {}", b.name, e.message()),
            )
        })?;
        if !b.enabled {
            up.bitmap(&b.name, &BitmapOp::Disable)?;
        }
    }
    Ok(())
}

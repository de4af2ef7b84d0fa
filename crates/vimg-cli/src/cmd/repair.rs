//! `vimg check -r leaks|all`: qemu-img check's repair, for qcow2. The image is checked,
//! repaired in place (crash-safe: see `vimg::formats::qcow2::update`), and checked again;
//! the output and exit code are those of the second check, as qemu-img prints them.

use vimg::formats::qcow2::Repair;
use vimg::formats::updater;
use vimg::Image;

use super::check::report_and_exit;
use super::{open_options, parse_format_opt};
use crate::args::{CheckArgs, OutputFormat};
use crate::{CmdResult, Failure};

pub fn run(a: CheckArgs) -> CmdResult {
    let mode = match a.repair.as_deref() {
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(other) => {
            return Err(Failure::new(
                format!(
                    "--repair (-r) expects 'leaks' or 'all' not '{other}'\nTry '{} check --help' for more info",
                    crate::trust::prefix()
                ),
                1,
            ))
        }
        None => return super::check::run(a),
    };
    let format = parse_format_opt(a.format.as_deref())?;
    let format = match format {
        Some(f) => f,
        None => {
            let mut opts = open_options(None, &a.safety);
            opts.open_backing = false;
            match Image::open(&a.filename, &opts) {
                Ok(i) => {
                    super::warn_if_probed_raw(&a.filename, i.format());
                    i.format()
                }
                // A corrupt image that does not open: repaired when its format is one vimg
                // repairs from the header and tables alone (parallels), else reported as
                // check does.
                Err(_) => match probed_repairable(&a.filename) {
                    Some(f) => f,
                    None => return super::check::run(CheckArgs { repair: None, ..a }),
                },
            }
        }
    };
    if matches!(
        format,
        vimg::Format::Vdi | vimg::Format::Vmdk | vimg::Format::Vpc
    ) {
        // QEMU's vdi and vmdk drivers refuse a check with fixes, and vpc has no check at all.
        return Err(Failure::new(
            "This image format does not support checks",
            63,
        ));
    }
    if !updater::caps(format).repair {
        // Nothing vimg repairs: a clean image passes, anything else is refused.
        return super::check::run(CheckArgs { repair: None, ..a });
    }
    let policy = crate::trust::policy(&a.safety);
    let (path, _) = super::in_place_file(&a.filename)?;
    let opened = if format == vimg::Format::Qcow2 && mode == Repair::All {
        // QEMU's check -r all cuts a snapshot table past its limits first.
        vimg::formats::qcow2::update::Qcow2Update::open_for_repair_all(&path, policy)
            .map(|q| updater::Updater::Qcow2(Box::new(q)))
    } else {
        updater::open_for_repair(&path, format, policy)
    };
    let mut img = match opened {
        Ok(i) => i,
        Err(e) if e.kind() == vimg::ErrorKind::Corrupt => {
            // Refused at open for corrupt tables: vimg cannot repair those.
            return super::check::run(CheckArgs { repair: None, ..a });
        }
        Err(e) => {
            // A snapshot table QEMU's check cannot read (with -r leaks: any past the
            // limits): reported as check reports it.
            if let Some(f) = super::check::snapshot_table_failure(&a.filename) {
                return Err(f);
            }
            return Err(Failure::open(&a.filename, &e));
        }
    };
    let rep = img
        .repair(mode)
        .map_err(|e| Failure::new(format!("Repair of '{}' failed: {e}", a.filename), 1))?;
    // QED's second check is QEMU's scan of the tables on disk (the reader refuses what
    // the repair could not fix).
    // Parallels' is QEMU's check again on the same open image (the end of the data the
    // repair left in memory).
    let qed_after = match &mut img {
        updater::Updater::Qed(q) if rep.corruptions_fixed > 0 => Some(q.check_report()),
        updater::Updater::Parallels(p) => Some(p.check_after_repair()),
        _ => None,
    };
    drop(img);
    if !a.quiet {
        for m in rep
            .before_messages()
            .chain(rep.before.omitted_line().iter())
        {
            eprintln!("{m}");
        }
        if rep.needs_rebuild && mode == Repair::Leaks {
            eprintln!("ERROR need to rebuild refcount structures");
        }
        for m in rep.messages.iter().chain(&rep.copied_messages) {
            eprintln!("{m}");
        }
    }
    if rep.needs_rebuild && mode == Repair::Leaks {
        return Err(Failure::new("Check failed: Input/output error", 1));
    }
    if format == vimg::Format::Parallels && rep.before.check_errors > 0 {
        // QEMU's parallels check fails when it leaves a duplicate BAT entry last.
        return Err(Failure::new("Check failed: Device or resource busy", 1));
    }
    if rep.leaks_fixed == 0 && rep.corruptions_fixed == 0 {
        return report_and_exit(&a, &rep.before, format, true);
    }
    if a.output == OutputFormat::Human && !a.quiet {
        crate::print_out(&format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            rep.leaks_fixed, rep.corruptions_fixed
        ))?;
    }
    let check_failed =
        |e: vimg::Error| Failure::new(format!("Check of '{}' failed: {e}", a.filename), 1);
    let mut after = if let Some(r) = qed_after {
        r.map_err(check_failed)?
    } else {
        let mut opts = open_options(Some(format), &a.safety);
        opts.open_backing = false;
        let image = Image::open(&a.filename, &opts).map_err(|e| Failure::open(&a.filename, &e))?;
        image.reader().check().map_err(check_failed)?
    };
    after.leaks_fixed = rep.leaks_fixed;
    after.corruptions_fixed = rep.corruptions_fixed;
    report_and_exit(&a, &after, format, false)
}

/// The probed format of an image that failed to open, when vimg repairs that format.
fn probed_repairable(filename: &str) -> Option<vimg::Format> {
    let s = vimg::storage::FileStorage::open(filename).ok()?;
    let f = vimg::formats::registry::probe(&s).ok()?;
    updater::caps(f).repair.then_some(f)
}

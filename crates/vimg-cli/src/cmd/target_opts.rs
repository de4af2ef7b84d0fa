//! `convert --target-image-opts`: the output name is an option string
//! (`driver=qcow2,file.filename=out.qcow2`), as qemu-img reads it. qemu-img takes it only with
//! `-n` (an existing target) and without `-O`; the string names the file and, with
//! `driver`, its format (else the target's format is probed, as qemu-img probes it). It is
//! turned into the plain form (`-O FMT ... FILE`) before `convert` runs, so the rest of
//! `convert` sees one spelling.

use std::path::Path;

use vimg::source::cmdline;

use crate::args::ConvertArgs;
use crate::Failure;

/// `a` with an option-string target replaced by its file and format.
pub fn resolve(mut a: ConvertArgs) -> Result<ConvertArgs, Failure> {
    if !a.target_image_opts {
        return json_target(a);
    }
    if !a.no_create {
        return Err(Failure::new(
            "--target-image-opts requires use of -n flag",
            1,
        ));
    }
    // -O has a default, so whether it was given is read from the command line itself.
    let out_format_given = std::env::args().skip(1).any(|w| {
        w.starts_with("-O") || (w.starts_with('-') && !w.starts_with("--") && w.contains('O'))
    });
    if out_format_given {
        return Err(Failure::new(
            "--image-opts and --format are mutually exclusive",
            1,
        ));
    }
    let Some(target) = a.files.last().cloned() else {
        return Ok(a);
    };
    if a.files.len() < 2 {
        return Ok(a);
    }
    let name = cmdline::parse(&target, true).map_err(|e| Failure::open(&target, &e))?;
    if name.window.is_some() {
        return Err(Failure::new(
            format!(
                "Could not open '{target}': vimg does not write through raw offset/size windows named by --target-image-opts"
            ),
            1,
        ));
    }
    // The secret of an encrypted target goes to the updater (qcow v1 with AES writes
    // through it; the other formats refuse encrypted targets themselves).
    a.target_key_secret = name.key_secret.clone();
    // An encrypted target's key: the updater opens the file with it.
    cmdline::bind_keys(&name);
    let path = name.path.to_string_lossy().into_owned();
    let format = match name.format {
        Some(f) => f,
        None => {
            let st = vimg::storage::FileStorage::open(Path::new(&path)).map_err(|e| {
                Failure::new(
                    format!(
                        "Could not open '{target}': Could not open '{path}': {}",
                        vimg::Error::io("open", e).message()
                    ),
                    1,
                )
            })?;
            vimg::formats::registry::probe(&st).map_err(|e| Failure::open(&target, &e))?
        }
    };
    a.out_format = format.name().to_string();
    if let Some(last) = a.files.last_mut() {
        *last = path;
    }
    a.target_image_opts = false;
    Ok(a)
}

/// `-n` into a `json:` target name (`-O FMT ... 'json:{"driver":"luks","key-secret":"sec0",
/// "file":{"filename":"out"}}'`), which qemu-img accepts: the file it names is written,
/// with `-O`'s format, and an encrypted target's secret goes to the updater as with
/// `--target-image-opts`.
fn json_target(mut a: ConvertArgs) -> Result<ConvertArgs, Failure> {
    if !a.no_create || a.files.len() < 2 {
        return Ok(a);
    }
    let Some(target) = a.files.last().cloned() else {
        return Ok(a);
    };
    if !target.starts_with("json:") {
        return Ok(a);
    }
    let name = cmdline::parse(&target, false).map_err(|e| Failure::open(&target, &e))?;
    if name.window.is_some() {
        return Err(Failure::new(
            format!(
                "Could not open '{target}': vimg does not write through raw offset/size windows named by a json: target"
            ),
            1,
        ));
    }
    a.target_key_secret = name.key_secret.clone();
    cmdline::bind_keys(&name);
    if let Some(last) = a.files.last_mut() {
        *last = name.path.to_string_lossy().into_owned();
    }
    Ok(a)
}

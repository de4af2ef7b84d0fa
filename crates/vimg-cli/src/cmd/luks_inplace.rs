//! LUKS volumes changed in place, as qemu-img changes them: `amend` of key slots (luks, and
//! qcow2's `encrypt.*` key slot options) and `resize` of a luks volume. The secrets come from
//! `--object secret,...`; the image's own `key-secret` (from `--image-opts` or `json:`) must
//! unlock it first, as qemu-img's open does.

use std::path::Path;

use vimg::formats::luks::amend::{qcow2_header_area, KeyslotAmend, KeyslotEditor, AMEND_OPTIONS};
use vimg::formats::luks::update::LuksUpdate;
use vimg::formats::qcow2::Prealloc;
use vimg::Format;

use super::amend::AmendArgs;
use crate::Failure;

/// The `key-secret` (luks) or `encrypt.key-secret` (qcow2) the image name gives.
pub fn key_secret(name: &str) -> Result<Option<String>, Failure> {
    let image_opts = crate::trust::image_opts();
    if !image_opts && !vimg::source::cmdline::is_special(name) {
        return Ok(None);
    }
    let u = vimg::source::cmdline::parse(name, image_opts).map_err(|e| Failure::open(name, &e))?;
    Ok(u.key_secret)
}

/// The key slot options among `-o` (`prefix` stripped), or `None` when some option is not
/// one (qcow2: then the qcow2 amend handles them, or refuses).
fn keyslot_options(list: &[String], prefix: &str) -> Result<Option<KeyslotAmend>, Failure> {
    let mut a = KeyslotAmend::default();
    for opts in list {
        for kv in opts.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let Some(k) = k.strip_prefix(prefix).filter(|k| AMEND_OPTIONS.contains(k)) else {
                return Ok(None);
            };
            a.set(prefix, k, v).map_err(Failure::from)?;
        }
    }
    Ok(Some(a))
}

/// `amend` on a luks volume, or on a qcow2 image with `encrypt.*` key slot options only.
/// `None` when this is not such an amend (the caller goes on).
pub fn amend(a: &AmendArgs, path: &Path, format: Format) -> Result<Option<u8>, Failure> {
    let editor = |open: &dyn Fn(Option<&str>) -> vimg::Result<KeyslotEditor>| {
        let secret = key_secret(&a.filename)?;
        open(secret.as_deref()).map_err(|e| Failure::open(&a.filename, &e))
    };
    match format {
        Format::Luks => {
            if super::wants_help(&a.options) {
                return Ok(None);
            }
            let Some(opts) = keyslot_options(&a.options, "")? else {
                let bad = a
                    .options
                    .iter()
                    .flat_map(|o| o.split(','))
                    .filter(|s| !s.is_empty())
                    .map(|kv| kv.split_once('=').map_or(kv, |(k, _)| k))
                    .find(|k| !AMEND_OPTIONS.contains(k))
                    .unwrap_or_default();
                // qemu-img's words: the luks create options (and `size`) are creation-only.
                let create_only = bad == "size"
                    || vimg::formats::luks::CREATE_OPTIONS
                        .iter()
                        .any(|o| o.name == bad);
                let more = match create_only {
                    true => "\nThis option is only supported for image creation",
                    false => "",
                };
                return Err(Failure::new(format!("Invalid parameter '{bad}'{more}"), 1));
            };
            let mut ed = editor(&|s| KeyslotEditor::open(path, 0, None, s, ""))?;
            ed.amend(&opts, a.force).map_err(Failure::from)?;
            Ok(Some(0))
        }
        Format::Qcow2 => {
            let any_encrypt = a
                .options
                .iter()
                .flat_map(|o| o.split(','))
                .any(|kv| kv.starts_with("encrypt."));
            if !any_encrypt {
                return Ok(None);
            }
            let Some(opts) = keyslot_options(&a.options, "encrypt.")? else {
                let others = a
                    .options
                    .iter()
                    .flat_map(|o| o.split(','))
                    .any(|kv| !kv.is_empty() && !kv.starts_with("encrypt."));
                if others {
                    return Err(Failure::new(
                        format!(
                            "vimg amends encrypt.* key slot options alone, not together with other options ('{}' is unchanged); run them as two amends",
                            a.filename
                        ),
                        1,
                    ));
                }
                // encrypt.format, encrypt.key-secret, ...: the qcow2 amend's words.
                return Ok(None);
            };
            let (at, len) = qcow2_header_area(path).map_err(Failure::from)?;
            let mut ed = editor(&|s| KeyslotEditor::open(path, at, Some(len), s, "encrypt."))?;
            ed.amend(&opts, a.force).map_err(Failure::from)?;
            Ok(Some(0))
        }
        _ => Ok(None),
    }
}

/// `resize` of a luks volume to `[+|-]n` (`sign` 1, -1 or 0), qemu-img's checks and words.
pub fn resize(
    name: &str,
    path: &Path,
    sign: i8,
    n: u64,
    shrink: bool,
    prealloc: Prealloc,
    quiet: bool,
) -> Result<u8, Failure> {
    let secret = key_secret(name)?;
    let mut vol = LuksUpdate::open(path, secret.as_deref()).map_err(|e| Failure::open(name, &e))?;
    let cur = vol.virtual_size();
    let total = super::resize::target(cur, sign, n)?;
    super::resize::check_shrink(cur, total, shrink)?;
    if total < cur && prealloc != Prealloc::Off {
        return Err(Failure::new(
            "Preallocation can only be used for growing images",
            1,
        ));
    }
    vol.resize(total, prealloc).map_err(Failure::from)?;
    if !quiet {
        crate::print_out("Image resized.\n")?;
    }
    Ok(0)
}

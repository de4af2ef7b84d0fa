//! `vimg convert --output=json`: what was written, as JSON, for a pipeline that registers the
//! result with an image service. The `image-service` block is the library's
//! ([`ImageServiceInfo`]), the one `vimg info --output=json` gives for the same file, with
//! `os_hash_algo`/`os_hash_value` from the checksum taken while converting.

use std::path::Path;

use serde_json::{json, Map, Value};
use vimg::glance::ImageServiceInfo;
use vimg::{ConvertReport, Format, Image, OpenOptions};

use crate::Failure;

/// The report of a finished conversion into `dst` (written as `format`, named `out_name` on
/// the command line): `filename`, `format`, `vimg-checksum` (with `--checksum`) and
/// `image-service`. `dst` is opened as what was written, nothing it names followed.
pub fn json_report(
    dst: &Path,
    format: Format,
    out_name: &str,
    report: &ConvertReport,
) -> Result<String, Failure> {
    let opts = OpenOptions::with_format(Some(format)).open_backing(false);
    let shown = dst.display().to_string();
    let image = Image::open(dst, &opts).map_err(|e| Failure::open(&shown, &e))?;
    let svc = ImageServiceInfo::of(&image, report.checksum.as_ref());
    let mut m = Map::new();
    m.insert("filename".into(), shown.into());
    m.insert("format".into(), out_name.into());
    if let Some(c) = &report.checksum {
        m.insert(
            "vimg-checksum".into(),
            json!({"algorithm": c.alg.name(), "value": c.hex}),
        );
    }
    m.insert(
        "image-service".into(),
        serde_json::to_value(svc).unwrap_or(Value::Null),
    );
    let mut text = serde_json::to_string_pretty(&Value::Object(m)).unwrap_or_default();
    text.push('\n');
    Ok(text)
}

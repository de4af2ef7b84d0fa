//! Python bindings for the vimg library (`import vimg`).
//!
//! A thin layer: every call goes to vimg's public API; what is here converts types
//! (paths, option dicts, serde values to Python objects), releases the GIL around the
//! blocking work, and maps [`vimg::ErrorKind`] to one Python exception class per kind.
//! The Python package (`python/vimg/__init__.py`) re-exports these names; the stub
//! (`python/vimg/__init__.pyi`) documents their types.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use serde_json::{Map, Value};

mod captured;
mod mbr;
mod oslo_rules;

use vimg::glance::ImageServiceInfo;
use vimg::{
    Checksum, ConvertOptions, CreateOptions, ErrorKind, ExternalPolicy, Format, HashAlg, Image,
    ImageInfo, OpenOptions, Progress,
};

pyo3::create_exception!(
    vimg,
    Error,
    PyException,
    "Base class of every error vimg raises. `kind` is the error kind's short name \
     ('invalid', 'corrupt', ...); `path` the file it concerns, `structure` the on-disk \
     structure ('L2 table', 'VHD footer') and `offset` its byte offset in the file, each \
     None when not known."
);
pyo3::create_exception!(
    vimg,
    InvalidArgumentError,
    Error,
    "The caller asked for something impossible (bad option, format name, combination)."
);
pyo3::create_exception!(
    vimg,
    InvalidImageError,
    Error,
    "The image is malformed: a header field out of range, a bad magic, a bad checksum."
);
pyo3::create_exception!(
    vimg,
    CorruptImageError,
    Error,
    "The image parses but its tables contradict themselves or the file."
);
pyo3::create_exception!(
    vimg,
    UnsupportedError,
    Error,
    "A valid feature vimg does not implement (encryption, an unknown incompatible bit)."
);
pyo3::create_exception!(
    vimg,
    UnsafeReferenceError,
    Error,
    "The image names a file outside what the external-file policy allows."
);
pyo3::create_exception!(vimg, CancelledError, Error, "The operation was cancelled.");
pyo3::create_exception!(vimg, IoError, Error, "An operating-system I/O error.");
pyo3::create_exception!(
    vimg,
    SafetyCheckFailed,
    Error,
    "Raised by Inspection.safety_check(): the image names other files. `failures` maps \
     each naming field to the reason."
);

/// The Python exception for a vimg error, with `kind`, `path`, `structure` and `offset`
/// attributes (the last two None when the error names no on-disk structure). `opening`
/// is the file name the caller gave when the error happened while opening it, for
/// qemu-img's "Could not open 'FILE': reason" (as the `vimg` binary prints it).
fn to_py(py: Python<'_>, e: &vimg::Error, opening: Option<&str>) -> PyErr {
    let msg = match opening {
        Some(f) => format!("Could not open '{f}': {}", e.message()),
        // The file is the exception's `path` attribute, as before.
        None => e.message().to_string(),
    };
    let err = match e.kind() {
        ErrorKind::InvalidArgument => InvalidArgumentError::new_err(msg),
        ErrorKind::Invalid => InvalidImageError::new_err(msg),
        ErrorKind::Corrupt => CorruptImageError::new_err(msg),
        ErrorKind::Unsupported => UnsupportedError::new_err(msg),
        ErrorKind::UnsafeReference => UnsafeReferenceError::new_err(msg),
        ErrorKind::Cancelled => CancelledError::new_err(msg),
        ErrorKind::Io => IoError::new_err(msg),
        // `ErrorKind` is non-exhaustive: a kind added later is still a vimg.Error.
        _ => Error::new_err(msg),
    };
    let value = err.value(py);
    let path = e
        .path()
        .map(|p| p.to_string_lossy().into_owned())
        .or_else(|| opening.map(str::to_string));
    // Attribute setting on a fresh exception instance cannot fail in practice; if it did,
    // the exception is still raised, only without the attribute.
    let _ = value.setattr("kind", e.kind().as_str());
    let _ = value.setattr("path", path);
    let _ = value.setattr("structure", e.structure());
    let _ = value.setattr("offset", e.offset());
    err
}

fn parse_format(py: Python<'_>, name: &str) -> PyResult<Format> {
    Format::from_name(name).ok_or_else(|| {
        to_py(
            py,
            &vimg::Error::invalid_argument(format!("Unknown file format '{name}'")),
            None,
        )
    })
}

fn parse_format_opt(py: Python<'_>, name: Option<&str>) -> PyResult<Option<Format>> {
    name.map(|n| parse_format(py, n)).transpose()
}

/// A serde value as the Python object `json.loads` would make of it.
fn to_object(py: Python<'_>, v: &Value) -> PyResult<PyObject> {
    let text =
        serde_json::to_string(v).map_err(|e| PyException::new_err(format!("serializing: {e}")))?;
    let json = py.import("json")?;
    Ok(json.call_method1("loads", (text,))?.unbind())
}

fn serialize<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// One layer's `vimg info --output=json` object, from the library's serializable types
/// (`children` included), keys in the library's order.
fn info_value(image: &Image) -> Value {
    let mut m = Map::new();
    if let Value::Object(rest) = serialize(&ImageInfo::of(image)) {
        m.extend(rest);
    }
    let origin = image.origin();
    if let Some(c) = &origin.container {
        m.insert("vimg-container".into(), serialize(c));
    }
    if let Some(o) = &origin.ova {
        m.insert("vimg-ova".into(), serialize(o));
    }
    m.insert("image-service".into(), image_service_value(image, None));
    Value::Object(m)
}

/// The library's image-service block for `image` ([`ImageServiceInfo`], the one the
/// binary prints): what to register and upload. For an image in a compressed container
/// or an OVA it describes the image inside, converted out to a file of its own
/// (`container_format` `bare`), with `input_container_format`, `input_usable`, `note` and
/// `convert_command`; `os_hash_algo`/`os_hash_value` when `checksum` is of this very file.
fn image_service_value(image: &Image, checksum: Option<&Checksum>) -> Value {
    serialize(&ImageServiceInfo::of(image, checksum))
}

/// info(path, backing_chain=False)
/// --
///
/// What `vimg info --output=json PATH` prints, as a dict (a list of dicts, top image
/// first, with `backing_chain=True`), `children` (qemu-img's node tree) included.
/// `image-service` describes what to upload: for an image in a compressed container or
/// an OVA, the image inside as a file of its own. Files the image names are opened only
/// inside its own folder.
#[pyfunction]
#[pyo3(signature = (path, backing_chain = false))]
fn info(py: Python<'_>, path: std::path::PathBuf, backing_chain: bool) -> PyResult<PyObject> {
    let shown = path.to_string_lossy().into_owned();
    let value = py
        .allow_threads(|| {
            let opts = OpenOptions::default().open_backing(backing_chain);
            let image = Image::open(&path, &opts)?;
            Ok::<Value, vimg::Error>(if backing_chain {
                Value::Array(image.chain().into_iter().map(info_value).collect())
            } else {
                info_value(&image)
            })
        })
        .map_err(|e| to_py(py, &e, Some(&shown)))?;
    to_object(py, &value)
}

/// What `inspect()` found. Plain data: the image file is closed again.
#[pyclass(module = "vimg", frozen)]
struct Inspection {
    /// The format name (`raw`, `qcow2`, `vmdk`, `vpc`, `vhdx`, `vdi`, ...).
    #[pyo3(get)]
    format: String,
    /// Guest-visible size in bytes.
    #[pyo3(get)]
    virtual_size: u64,
    /// Bytes the file takes on disk (None when unknown).
    #[pyo3(get)]
    actual_size: Option<u64>,
    /// Every file the image names: dicts with `field`, `name` (as stored) and `role`.
    #[pyo3(get)]
    references: PyObject,
    /// The image-service block of `info` (`disk_format`, `container_format`, `min_disk`,
    /// `safe`, ...).
    #[pyo3(get)]
    image_service: PyObject,
    /// The file inspected.
    #[pyo3(get)]
    path: String,
    failures: Vec<(String, String)>,
}

#[pymethods]
impl Inspection {
    /// safety_check()
    /// --
    ///
    /// Raises SafetyCheckFailed, whose `failures` dict maps each field that names a file
    /// to why that makes the image unsafe, unless the image is self-contained.
    fn safety_check(&self, py: Python<'_>) -> PyResult<()> {
        if self.failures.is_empty() {
            return Ok(());
        }
        let reasons: Vec<&str> = self.failures.iter().map(|(_, r)| r.as_str()).collect();
        let err = SafetyCheckFailed::new_err(format!(
            "Safety check failed for '{}': {}",
            self.path,
            reasons.join("; ")
        ));
        let failures = PyDict::new(py);
        for (field, reason) in &self.failures {
            failures.set_item(field, reason)?;
        }
        let value = err.value(py);
        value.setattr("failures", failures)?;
        value.setattr("kind", ErrorKind::UnsafeReference.as_str())?;
        value.setattr("path", &self.path)?;
        value.setattr("structure", py.None())?;
        value.setattr("offset", py.None())?;
        Err(err)
    }

    fn __repr__(&self) -> String {
        format!(
            "<vimg.Inspection {:?} format={} virtual_size={}>",
            self.path, self.format, self.virtual_size
        )
    }
}

/// inspect(path, format=None)
/// --
///
/// Opens the image without following its backing chain (nothing it names is read) and
/// returns an Inspection: `format`, `virtual_size`, `actual_size`, `references`,
/// `image_service` and `safety_check()`. `format` forces the format instead of probing.
#[pyfunction]
#[pyo3(signature = (path, format = None))]
fn inspect(py: Python<'_>, path: std::path::PathBuf, format: Option<&str>) -> PyResult<Inspection> {
    let format = parse_format_opt(py, format)?;
    let shown = path.to_string_lossy().into_owned();
    let (info, svc, svc_value) = py
        .allow_threads(|| {
            let opts = OpenOptions::with_format(format).open_backing(false);
            let image = Image::open(&path, &opts)?;
            Ok::<_, vimg::Error>((
                ImageInfo::of(&image),
                ImageServiceInfo::of(&image, None),
                image_service_value(&image, None),
            ))
        })
        .map_err(|e| to_py(py, &e, Some(&shown)))?;
    let failures = svc
        .references
        .iter()
        .zip(&svc.unsafe_reasons)
        .map(|(r, why)| (r.reference.field.clone(), why.clone()))
        .collect();
    Ok(Inspection {
        format: info.format,
        virtual_size: info.virtual_size,
        actual_size: info.actual_size,
        references: to_object(py, &serialize(&info.external_references))?,
        image_service: to_object(py, &svc_value)?,
        path: shown,
        failures,
    })
}

/// `-o` options from a dict (`True`/`False` become `on`/`off`) or a qemu-img option
/// string (`cluster_size=64k,compat=1.1`).
fn create_options(py: Python<'_>, options: Option<&Bound<'_, PyAny>>) -> PyResult<CreateOptions> {
    let mut o = CreateOptions::new();
    let Some(options) = options else {
        return Ok(o);
    };
    if let Ok(s) = options.downcast::<PyString>() {
        o.parse_into(&s.to_cow()?)
            .map_err(|e| to_py(py, &e, None))?;
    } else if let Ok(d) = options.downcast::<PyDict>() {
        for (k, v) in d.iter() {
            let key: String = k.extract()?;
            let value = if let Ok(b) = v.extract::<bool>() {
                if b { "on" } else { "off" }.to_string()
            } else {
                v.str()?.to_cow()?.into_owned()
            };
            o.set(&key, value);
        }
    } else {
        return Err(pyo3::exceptions::PyTypeError::new_err(
            "options must be a dict or a qemu-img option string",
        ));
    }
    Ok(o)
}

/// convert(src, dst, out_format, *, src_format=None, options=None, compress=False, checksum=None, progress=None, allow_external=False)
/// --
///
/// Converts `src` into a new image `dst` of `out_format`, as `vimg convert` does:
/// written to a temporary file and renamed into place, so a failed or cancelled run leaves
/// nothing behind. `options` are qemu-img's `-o` options (dict or option string);
/// `compress` is `-c`. `checksum` ('sha256', 'sha512' or 'md5') hashes the written file
/// and the hex digest is returned (else None). `progress(done, total)` is called with the
/// GIL held as data is copied; an exception it raises cancels the conversion and is
/// re-raised. `allow_external=True` lets the source name files anywhere (trusted input
/// only); by default only files in its own folder are opened. With `image_service=True`
/// the result is a dict instead: `checksum` (hex or None) and `image-service`, the block
/// `info` gives, for the file written (with `os_hash_algo`/`os_hash_value` when a
/// checksum was taken): what to register it with.
#[pyfunction]
#[pyo3(signature = (src, dst, out_format, *, src_format = None, options = None, compress = false, checksum = None, progress = None, allow_external = false, image_service = false))]
#[allow(clippy::too_many_arguments)]
fn convert(
    py: Python<'_>,
    src: std::path::PathBuf,
    dst: std::path::PathBuf,
    out_format: &str,
    src_format: Option<&str>,
    options: Option<&Bound<'_, PyAny>>,
    compress: bool,
    checksum: Option<&str>,
    progress: Option<PyObject>,
    allow_external: bool,
    image_service: bool,
) -> PyResult<PyObject> {
    let out = parse_format(py, out_format)?;
    let src_format = parse_format_opt(py, src_format)?;
    let mut create = create_options(py, options)?;
    create.compress = compress;
    create.check_for(out).map_err(|e| to_py(py, &e, None))?;
    let alg = checksum
        .map(|a| a.parse::<HashAlg>())
        .transpose()
        .map_err(|e| to_py(py, &e, None))?;
    if let Some(p) = &progress {
        if !p.bind(py).is_callable() {
            return Err(pyo3::exceptions::PyTypeError::new_err(
                "progress must be callable as progress(done, total)",
            ));
        }
    }
    let shown = src.to_string_lossy().into_owned();
    let cancel = Arc::new(AtomicBool::new(false));
    let raised: Arc<Mutex<Option<PyErr>>> = Arc::new(Mutex::new(None));
    let on_progress = {
        let (cancel, raised) = (cancel.clone(), raised.clone());
        let progress = progress.as_ref().map(|p| p.clone_ref(py));
        move |p: Progress| {
            let Some(cb) = &progress else { return };
            if cancel.load(Ordering::SeqCst) {
                return;
            }
            let outcome = Python::with_gil(|py| {
                // Ctrl-C reaches Python's handler while the GIL is released; honour it here.
                py.check_signals()?;
                cb.call1(py, (p.done, p.total)).map(drop)
            });
            if let Err(e) = outcome {
                if let Ok(mut slot) = raised.lock() {
                    slot.get_or_insert(e);
                }
                cancel.store(true, Ordering::SeqCst);
            }
        }
    };
    enum Failed {
        Open(vimg::Error),
        Convert(vimg::Error),
    }
    let result = py.allow_threads(|| {
        let opts = OpenOptions::with_format(src_format).policy(if allow_external {
            ExternalPolicy::Allow
        } else {
            ExternalPolicy::SameFolder
        });
        let image = Image::open(&src, &opts).map_err(Failed::Open)?;
        let mut copts = ConvertOptions::new(out);
        copts.create = create;
        copts.checksum = alg;
        copts.copy.cancel = Some(cancel.clone());
        if progress.is_some() {
            copts.copy.progress = Some(Arc::new(on_progress));
        }
        vimg::convert_report(&image, &dst, &copts).map_err(Failed::Convert)
    });
    if let Some(e) = raised.lock().ok().and_then(|mut s| s.take()) {
        return Err(e);
    }
    let report = match result {
        Ok(report) => report,
        Err(Failed::Open(e)) => return Err(to_py(py, &e, Some(&shown))),
        Err(Failed::Convert(e)) => return Err(to_py(py, &e, None)),
    };
    let hex = report.checksum.as_ref().map(|c: &Checksum| c.hex.clone());
    if !image_service {
        return Ok(hex.into_pyobject(py)?.into_any().unbind());
    }
    // The block for the file written: opened as what was written, nothing it names
    // followed; the checksum is of that very file.
    let shown_dst = dst.to_string_lossy().into_owned();
    let block = py
        .allow_threads(|| {
            let opts = OpenOptions::with_format(Some(out)).open_backing(false);
            Image::open(&dst, &opts).map(|img| image_service_value(&img, report.checksum.as_ref()))
        })
        .map_err(|e| to_py(py, &e, Some(&shown_dst)))?;
    let mut m = Map::new();
    m.insert("checksum".into(), hex.map_or(Value::Null, Value::String));
    m.insert("image-service".into(), block);
    to_object(py, &Value::Object(m))
}

fn open_opts(format: Option<Format>, allow_external: bool) -> OpenOptions {
    OpenOptions::with_format(format).policy(if allow_external {
        ExternalPolicy::Allow
    } else {
        ExternalPolicy::SameFolder
    })
}

/// check(path, format=None, *, allow_external=False)
/// --
///
/// What `vimg check --output=json PATH` prints, as a dict: `check-errors`,
/// `corruptions`, `leaks` (absent when 0), the cluster counts the format tracks,
/// `filename` and `format`. An image whose tables are corrupt enough that it does not
/// open is reported with one corruption, as the binary does; other open errors raise.
/// The image is only read.
#[pyfunction]
#[pyo3(signature = (path, format = None, *, allow_external = false))]
fn check(
    py: Python<'_>,
    path: std::path::PathBuf,
    format: Option<&str>,
    allow_external: bool,
) -> PyResult<PyObject> {
    let format = parse_format_opt(py, format)?;
    let shown = path.to_string_lossy().into_owned();
    enum Failed {
        Open(vimg::Error),
        Check(vimg::Error),
    }
    let found = py.allow_threads(|| {
        let mut opts = open_opts(format, allow_external);
        opts.open_backing = false;
        match Image::open(&path, &opts) {
            Ok(image) => image
                .reader()
                .check()
                .map(|r| (r, image.format()))
                .map_err(Failed::Check),
            Err(e) => match vimg::CheckReport::from_open_error(&e) {
                Some(r) => {
                    let probed = vimg::storage::FileStorage::open(&path)
                        .ok()
                        .and_then(|s| vimg::formats::registry::probe(&s).ok())
                        .unwrap_or(Format::Raw);
                    Ok((r, format.unwrap_or(probed)))
                }
                None => Err(Failed::Open(e)),
            },
        }
    });
    let (report, fmt) = match found {
        Ok(v) => v,
        Err(Failed::Open(e)) => return Err(to_py(py, &e, Some(&shown))),
        Err(Failed::Check(e)) => return Err(to_py(py, &e, None)),
    };
    let mut m = match serialize(&report) {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    m.insert("filename".into(), Value::String(shown));
    m.insert("format".into(), Value::String(fmt.name().into()));
    to_object(py, &Value::Object(m))
}

/// compare(a, b, *, format_a=None, format_b=None, strict=False, allow_external=False)
/// --
///
/// `vimg compare A B` as a dict: `identical` (bool), `result` ('identical',
/// 'content-mismatch', 'size-mismatch' or 'status-mismatch', the last two with
/// `strict=True`), `offset` (the first differing byte, or None), `size-warning` (the
/// sizes differ and the longer image's tail was compared with zeros) and `exit-code`
/// (the binary's: 0 identical, 1 different). Each image is read through its backing chain.
#[pyfunction]
#[pyo3(signature = (a, b, *, format_a = None, format_b = None, strict = false, allow_external = false))]
fn compare(
    py: Python<'_>,
    a: std::path::PathBuf,
    b: std::path::PathBuf,
    format_a: Option<&str>,
    format_b: Option<&str>,
    strict: bool,
    allow_external: bool,
) -> PyResult<PyObject> {
    use vimg::Comparison;
    let (fa, fb) = (
        parse_format_opt(py, format_a)?,
        parse_format_opt(py, format_b)?,
    );
    let (sa, sb) = (
        a.to_string_lossy().into_owned(),
        b.to_string_lossy().into_owned(),
    );
    let ia = py
        .allow_threads(|| Image::open(&a, &open_opts(fa, allow_external)))
        .map_err(|e| to_py(py, &e, Some(&sa)))?;
    let ib = py
        .allow_threads(|| Image::open(&b, &open_opts(fb, allow_external)))
        .map_err(|e| to_py(py, &e, Some(&sb)))?;
    let report = py
        .allow_threads(|| vimg::compare(&ia, &ib, strict, &mut |_, _| {}))
        .map_err(|e| to_py(py, &e, None))?;
    let (result, offset) = match report.result {
        Comparison::Identical => ("identical", None),
        Comparison::SizeMismatch => ("size-mismatch", None),
        Comparison::Mismatch(o) => ("content-mismatch", Some(o)),
        Comparison::StatusMismatch(o) => ("status-mismatch", Some(o)),
        _ => ("unknown", None),
    };
    let identical = result == "identical";
    let v = serde_json::json!({
        "identical": identical,
        "result": result,
        "offset": offset,
        "size-warning": report.size_warning,
        "exit-code": if identical { 0 } else { 1 },
    });
    to_object(py, &v)
}

/// measure(out_format, *, size=None, filename=None, format=None, options=None, allow_external=False)
/// --
///
/// What `vimg measure --output=json -O OUT_FORMAT` prints, as a dict (`required`,
/// `fully-allocated`, and `bitmaps` for qcow2 when there are any): the bytes a new
/// image needs, either for `size` bytes of nothing or for the content of `filename`.
/// `options` are `-o` options (dict or option string).
#[pyfunction]
#[pyo3(signature = (out_format, *, size = None, filename = None, format = None, options = None, allow_external = false))]
fn measure(
    py: Python<'_>,
    out_format: &str,
    size: Option<u64>,
    filename: Option<std::path::PathBuf>,
    format: Option<&str>,
    options: Option<&Bound<'_, PyAny>>,
    allow_external: bool,
) -> PyResult<PyObject> {
    let out = parse_format(py, out_format)?;
    let format = parse_format_opt(py, format)?;
    let opts = create_options(py, options)?;
    if size.is_some() == filename.is_some() {
        return Err(to_py(
            py,
            &vimg::Error::invalid_argument("Either size or one filename must be specified."),
            None,
        ));
    }
    let image = match &filename {
        Some(f) => {
            let shown = f.to_string_lossy().into_owned();
            Some(
                py.allow_threads(|| Image::open(f, &open_opts(format, allow_external)))
                    .map_err(|e| to_py(py, &e, Some(&shown)))?,
            )
        }
        None => None,
    };
    let m = py
        .allow_threads(|| vimg::measure(out, &opts, size, image.as_ref()))
        .map_err(|e| to_py(py, &e, None))?;
    let mut obj = Map::new();
    if let Some(b) = m.bitmaps {
        obj.insert("bitmaps".into(), b.into());
    }
    obj.insert("required".into(), m.required.into());
    obj.insert("fully-allocated".into(), m.fully_allocated.into());
    to_object(py, &Value::Object(obj))
}

/// map(path, format=None, *, start=0, length=None, allow_external=False)
/// --
///
/// What `vimg map --output=json PATH` prints, as a list of dicts: `start`, `length`,
/// `depth`, `present`, `zero`, `data`, `compressed` and, where the bytes sit at one
/// place in a file, `offset`. Runs are merged as qemu-img merges them; `start` and
/// `length` limit the guest range.
#[pyfunction]
#[pyo3(signature = (path, format = None, *, start = 0, length = None, allow_external = false))]
fn map(
    py: Python<'_>,
    path: std::path::PathBuf,
    format: Option<&str>,
    start: u64,
    length: Option<u64>,
    allow_external: bool,
) -> PyResult<PyObject> {
    let format = parse_format_opt(py, format)?;
    let shown = path.to_string_lossy().into_owned();
    let image = py
        .allow_threads(|| Image::open(&path, &open_opts(format, allow_external)))
        .map_err(|e| to_py(py, &e, Some(&shown)))?;
    let entries = py
        .allow_threads(|| vimg::map_range(&image, start, length).collect::<vimg::Result<Vec<_>>>())
        .map_err(|e| to_py(py, &e, None))?;
    let list: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut m = Map::new();
            m.insert("start".into(), e.start.into());
            m.insert("length".into(), e.length.into());
            m.insert("depth".into(), (e.depth as u64).into());
            m.insert("present".into(), e.present.into());
            m.insert("zero".into(), e.zero.into());
            m.insert("data".into(), e.data.into());
            m.insert("compressed".into(), e.compressed.into());
            if let Some(o) = e.offset {
                m.insert("offset".into(), o.into());
            }
            Value::Object(m)
        })
        .collect();
    to_object(py, &Value::Array(list))
}

/// judge_captured(format, pieces, length=None)
/// --
///
/// The library's verdict on an image of which only `pieces` (a list of `(offset, bytes)`)
/// were kept from a stream: a dict with `status` 'ok' (`format`, `disk_format`,
/// `virtual_size`, `references` as (field, name) pairs), 'need' (`ranges`: (offset,
/// length) pairs to keep and ask again) or 'invalid' (`kind`, `message`). `length` is the
/// stream's length once its end was seen. Nothing the image names is opened. Used by
/// `vimg.format_inspector`.
#[pyfunction]
#[pyo3(signature = (format, pieces, length = None))]
fn judge_captured(
    py: Python<'_>,
    format: Option<&str>,
    pieces: Vec<(u64, Vec<u8>)>,
    length: Option<u64>,
) -> PyResult<PyObject> {
    let format = parse_format_opt(py, format)?;
    let v = py.allow_threads(|| captured::judge_value(format, pieces, length));
    to_object(py, &v)
}

/// probe_head(head)
/// --
///
/// The formats whose signature the first bytes of a stream carry, by the library's
/// probes (vimg's names: 'qcow2', 'vpc', 'vmdk', ...); empty for raw.
#[pyfunction]
fn probe_head(head: &[u8]) -> Vec<&'static str> {
    captured::probe_head(head)
}

/// is_iso9660(descriptor)
/// --
///
/// True when the 2048 bytes at offset 32768 start an ISO 9660 volume descriptor.
#[pyfunction]
fn is_iso9660(descriptor: &[u8]) -> bool {
    captured::is_iso9660(descriptor)
}

/// is_mbr(sector)
/// --
///
/// True when the first 512 bytes carry the MBR signature and are not a FAT boot sector.
#[pyfunction]
fn is_mbr(sector: &[u8]) -> bool {
    mbr::is_mbr(sector)
}

/// check_mbr_partitions(sector)
/// --
///
/// None when the MBR's partition entries are what a GPT disk's protective MBR (or a
/// plain MBR) may hold, else the reason (a str).
#[pyfunction]
fn check_mbr_partitions(sector: &[u8]) -> Option<String> {
    mbr::check_partitions(sector).err()
}

/// qcow2_check_features(header, max_bit)
/// --
///
/// None when a qcow2 header's version and incompatible feature bits pass oslo's rule
/// (version 2, or version 3 with no bit at or above `max_bit`), else the reason.
#[pyfunction]
fn qcow2_check_features(header: &[u8], max_bit: u32) -> Option<String> {
    oslo_rules::qcow2_features(header, max_bit).err()
}

/// vmdk_check_descriptor(text, create_type)
/// --
///
/// None when a (lower-cased) VMDK descriptor passes oslo's rules, else the reason.
#[pyfunction]
fn vmdk_check_descriptor(text: &str, create_type: &str) -> Option<String> {
    oslo_rules::vmdk_descriptor(text, create_type).err()
}

/// vmdk_check_footer(header, footer)
/// --
///
/// None when a stream-optimized VMDK's last three sectors agree with its header and
/// carry well-formed markers, else the reason.
#[pyfunction]
fn vmdk_check_footer(header: &[u8], footer: &[u8]) -> Option<String> {
    oslo_rules::vmdk_footer(header, footer).err()
}

/// The native part of the `vimg` package.
#[pymodule]
fn _vimg(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(info, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add_function(wrap_pyfunction!(compare, m)?)?;
    m.add_function(wrap_pyfunction!(measure, m)?)?;
    m.add_function(wrap_pyfunction!(map, m)?)?;
    m.add_function(wrap_pyfunction!(judge_captured, m)?)?;
    m.add_function(wrap_pyfunction!(probe_head, m)?)?;
    m.add_function(wrap_pyfunction!(is_iso9660, m)?)?;
    m.add_function(wrap_pyfunction!(is_mbr, m)?)?;
    m.add_function(wrap_pyfunction!(check_mbr_partitions, m)?)?;
    m.add_function(wrap_pyfunction!(qcow2_check_features, m)?)?;
    m.add_function(wrap_pyfunction!(vmdk_check_descriptor, m)?)?;
    m.add_function(wrap_pyfunction!(vmdk_check_footer, m)?)?;
    m.add("ISO_DESCRIPTOR_AT", captured::ISO_DESCRIPTOR_AT)?;
    m.add("UNKNOWN_STREAM_LENGTH", captured::UNKNOWN_LENGTH)?;
    m.add_class::<Inspection>()?;
    m.add("Error", py.get_type::<Error>())?;
    m.add(
        "InvalidArgumentError",
        py.get_type::<InvalidArgumentError>(),
    )?;
    m.add("InvalidImageError", py.get_type::<InvalidImageError>())?;
    m.add("CorruptImageError", py.get_type::<CorruptImageError>())?;
    m.add("UnsupportedError", py.get_type::<UnsupportedError>())?;
    m.add(
        "UnsafeReferenceError",
        py.get_type::<UnsafeReferenceError>(),
    )?;
    m.add("CancelledError", py.get_type::<CancelledError>())?;
    m.add("IoError", py.get_type::<IoError>())?;
    m.add("SafetyCheckFailed", py.get_type::<SafetyCheckFailed>())?;
    Ok(())
}

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
     ('invalid', 'corrupt', ...); `path` the file it concerns, when known."
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

/// The Python exception for a vimg error, with `kind` and `path` attributes. `opening`
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

/// One layer's `vimg info --output=json` object, from the library's serializable types,
/// keys in the binary's order. The binary's `children` list (qemu's protocol nodes) is
/// assembled in the CLI only and is not part of this object.
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
    m.insert(
        "image-service".into(),
        serialize(&ImageServiceInfo::of(image, None)),
    );
    Value::Object(m)
}

/// info(path, backing_chain=False)
/// --
///
/// What `vimg info --output=json PATH` prints, as a dict (a list of dicts, top image
/// first, with `backing_chain=True`). The binary's `children` key (qemu's protocol
/// nodes) is not included. Files the image names are opened only inside its own folder.
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
    let (info, svc) = py
        .allow_threads(|| {
            let opts = OpenOptions::with_format(format).open_backing(false);
            let image = Image::open(&path, &opts)?;
            Ok::<_, vimg::Error>((ImageInfo::of(&image), ImageServiceInfo::of(&image, None)))
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
        image_service: to_object(py, &serialize(&svc))?,
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
/// only); by default only files in its own folder are opened.
#[pyfunction]
#[pyo3(signature = (src, dst, out_format, *, src_format = None, options = None, compress = false, checksum = None, progress = None, allow_external = false))]
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
) -> PyResult<Option<String>> {
    let out = parse_format(py, out_format)?;
    let src_format = parse_format_opt(py, src_format)?;
    let mut create = create_options(py, options)?;
    create.compress = compress;
    vimg::convert::check_create_options(out, &create).map_err(|e| to_py(py, &e, None))?;
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
    match result {
        Ok(report) => Ok(report.checksum.map(|c: Checksum| c.hex)),
        Err(Failed::Open(e)) => Err(to_py(py, &e, Some(&shown))),
        Err(Failed::Convert(e)) => Err(to_py(py, &e, None)),
    }
}

/// The native part of the `vimg` package.
#[pymodule]
fn _vimg(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_function(wrap_pyfunction!(info, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
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

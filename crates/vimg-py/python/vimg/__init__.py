"""vimg: inspect, describe and convert virtual disk images.

Python bindings for the vimg library (a safe, fast drop-in for qemu-img). Calls release
the GIL while they work. Errors are subclasses of :class:`vimg.Error`, one per kind,
whose message names the file, structure and offset as vimg's own messages do, and whose
`path`, `structure` and `offset` attributes give them as data.

    import vimg
    info = vimg.info("disk.qcow2")              # the `vimg info --output=json` dict
    img = vimg.inspect("upload.img")            # format, sizes, references
    img.safety_check()                          # raises SafetyCheckFailed if it names files
    digest = vimg.convert("disk.qcow2", "disk.raw", "raw",
                          checksum="sha512", progress=lambda done, total: None)
    vimg.check("disk.qcow2")                    # `vimg check --output=json`
    vimg.compare("a.qcow2", "b.raw")["identical"]
    vimg.measure("qcow2", filename="disk.raw")  # `vimg measure --output=json`
    vimg.map("disk.qcow2")                      # `vimg map --output=json`
"""

from ._vimg import (
    CancelledError,
    CorruptImageError,
    Error,
    Inspection,
    InvalidArgumentError,
    InvalidImageError,
    IoError,
    SafetyCheckFailed,
    UnsafeReferenceError,
    UnsupportedError,
    check,
    compare,
    convert,
    info,
    inspect,
    map,
    measure,
)

__all__ = [
    "CancelledError",
    "CorruptImageError",
    "Error",
    "Inspection",
    "InvalidArgumentError",
    "InvalidImageError",
    "IoError",
    "SafetyCheckFailed",
    "UnsafeReferenceError",
    "UnsupportedError",
    "check",
    "compare",
    "convert",
    "info",
    "inspect",
    "map",
    "measure",
    "format_inspector",
]

from . import format_inspector  # noqa: E402  (oslo-compatible facade)

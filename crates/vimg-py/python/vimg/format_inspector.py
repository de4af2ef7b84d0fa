"""A drop-in for ``oslo_utils.imageutils.format_inspector``, backed by vimg's parsers.

The public names services use: :func:`detect_file_format`, :func:`get_inspector`,
:data:`ALL_FORMATS`, inspector classes with ``from_file(filename)``, and inspector objects
with ``format``, ``virtual_size``, ``actual_size``, ``safety_check()`` and ``str()``; the
:class:`ImageFormatError` and :class:`SafetyCheckFailed` exceptions (the latter with a
``failures`` mapping of check name to :class:`SafetyViolation`).

Differences: inspection reads whole files through vimg (``from_file``), not streamed
chunks; the chunk-feeding API (``eat_chunk``, ``InspectWrapper``) is not provided. Files
an image names are never opened. A file vimg cannot parse is an ImageFormatError, never
"raw".
"""

import vimg as _vimg

__all__ = [
    "ALL_FORMATS",
    "FileInspector",
    "ImageFormatError",
    "SafetyCheckFailed",
    "SafetyViolation",
    "detect_file_format",
    "get_inspector",
]


class ImageFormatError(Exception):
    """The file is not (or not validly) in the format asked for."""


class SafetyViolation(Exception):
    """One safety check failed."""


class SafetyCheckFailed(Exception):
    """One or more safety checks failed; ``failures`` maps check name -> violation."""

    def __init__(self, failures):
        super().__init__("Safety checks failed: %s" % ",".join(failures.keys()))
        self.failures = failures


# Formats oslo's inspector names but always bans (qed: a backing file oslo cannot vet;
# luks: encrypted, and vimg does not read it yet). The library probes both by their magic
# too; the facade answers for them directly, as oslo does, with a failing safety_check
# (QEMU's docs/interop/qed and the LUKS1 and LUKS2 on-disk specifications).
_UNREAD_MAGICS = {b"QED\x00": "qed", b"LUKS\xba\xbe": "luks"}


def _unread_format(filename):
    with open(filename, "rb") as f:
        head = f.read(8)
    for magic, name in _UNREAD_MAGICS.items():
        if head.startswith(magic):
            return name
    return None


class FileInspector:
    """An inspected image. Use ``<Class>.from_file(filename)`` or
    :func:`detect_file_format`."""

    NAME = ""
    # vimg's format name for this inspector (None: vimg does not read it).
    _VIMG = None

    def __init__(self, inspection=None):
        self._inspection = inspection

    @classmethod
    def from_file(cls, filename):
        """Inspect ``filename`` as this format; ImageFormatError if it is not."""
        if cls._VIMG is None:
            raise ImageFormatError("vimg does not read %s images" % cls.NAME)
        found = _unread_format(filename)
        if found is not None and found != cls.NAME:
            raise ImageFormatError("File is not in requested format (it is %s)" % found)
        try:
            i = _vimg.inspect(filename, format=cls._VIMG)
        except _vimg.Error as e:
            raise ImageFormatError(str(e)) from e
        got = i.image_service.get("disk_format")
        if cls.NAME == "iso" and got != "iso":
            raise ImageFormatError("File is not in requested format")
        return cls(i)

    @property
    def format(self):
        """The format's name (as ``str(inspector)``)."""
        return self.NAME

    @property
    def format_match(self):
        return self._inspection is not None

    @property
    def complete(self):
        return self._inspection is not None

    @property
    def virtual_size(self):
        """Guest-visible size in bytes."""
        return self._inspection.virtual_size if self._inspection else 0

    @property
    def actual_size(self):
        """Bytes the file takes on disk."""
        if self._inspection is None or self._inspection.actual_size is None:
            return 0
        return self._inspection.actual_size

    def safety_check(self):
        """Return if the image is safe; raise SafetyCheckFailed if it names other files,
        ImageFormatError if it was not inspected."""
        if self._inspection is None:
            raise ImageFormatError("Incomplete file cannot be safety checked")
        try:
            self._inspection.safety_check()
        except _vimg.SafetyCheckFailed as e:
            raise SafetyCheckFailed(
                {name: SafetyViolation(why) for name, why in e.failures.items()}
            ) from e

    def __str__(self):
        return self.NAME

    def __repr__(self):
        return "<%s %s>" % (type(self).__name__, self.NAME)


class _Banned(FileInspector):
    """A format vimg identifies but does not read: it never passes the safety check."""

    def safety_check(self):
        raise SafetyCheckFailed(
            {"banned": SafetyViolation("vimg does not read %s images" % self.NAME)}
        )


def _inspector(name, vimg_name, base=FileInspector):
    cls = type(name.upper() + "Inspector", (base,), {"NAME": name, "_VIMG": vimg_name})
    cls.__module__ = __name__
    return cls


RawFileInspector = _inspector("raw", "raw")
QcowInspector = _inspector("qcow2", "qcow2")
VHDInspector = _inspector("vhd", "vpc")
VHDXInspector = _inspector("vhdx", "vhdx")
VMDKInspector = _inspector("vmdk", "vmdk")
VDIInspector = _inspector("vdi", "vdi")
ISOInspector = _inspector("iso", "raw")
QEDInspector = _inspector("qed", None, _Banned)
LUKSInspector = _inspector("luks", None, _Banned)
GPTInspector = _inspector("gpt", None)

ALL_FORMATS = {
    "raw": RawFileInspector,
    "qcow2": QcowInspector,
    "vhd": VHDInspector,
    "vhdx": VHDXInspector,
    "vmdk": VMDKInspector,
    "vdi": VDIInspector,
    "qed": QEDInspector,
    "iso": ISOInspector,
    "gpt": GPTInspector,
    "luks": LUKSInspector,
}

_FROM_VIMG = {"vpc": "vhd"}


def get_inspector(format_name):
    """The inspector class for ``format_name`` (raw, qcow2, ...), or None."""
    return ALL_FORMATS.get(format_name)


def detect_file_format(filename):
    """Inspect ``filename`` and return an inspector instance for the format found.

    Raises ImageFormatError when vimg cannot parse the file. A format vimg identifies
    but does not read (qed, luks) is returned as an inspector whose safety_check fails.
    """
    found = _unread_format(filename)
    if found is not None:
        return ALL_FORMATS[found]()
    try:
        i = _vimg.inspect(filename)
    except _vimg.Error as e:
        raise ImageFormatError(str(e)) from e
    name = i.image_service.get("disk_format") or _FROM_VIMG.get(i.format, i.format)
    name = _FROM_VIMG.get(name, name)
    cls = ALL_FORMATS.get(name)
    if cls is None:
        raise ImageFormatError("Unknown format %r" % i.format)
    return cls(i)

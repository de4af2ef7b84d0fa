"""Type stubs for vimg (see vimg/__init__.py for the overview)."""

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

_Path = Union[str, "os.PathLike[str]"]

class Error(Exception):
    """Base class of every error vimg raises."""

    kind: str
    """The error kind: 'invalid-argument', 'invalid', 'corrupt', 'unsupported',
    'unsafe-reference', 'cancelled' or 'io'."""
    path: Optional[str]
    """The file the error concerns, when known."""
    structure: Optional[str]
    """The on-disk structure the error concerns ('L2 table', 'VHD footer', 'VHDX header 1',
    'VDI header'), when the format's error names one (qcow2, vmdk, vhd, vhdx, vdi)."""
    offset: Optional[int]
    """The byte offset of that structure in the file, when known."""

class InvalidArgumentError(Error):
    """The caller asked for something impossible (bad option, format, combination)."""

class InvalidImageError(Error):
    """The image is malformed: a header field out of range, a bad magic, a bad checksum."""

class CorruptImageError(Error):
    """The image parses but its tables contradict themselves or the file."""

class UnsupportedError(Error):
    """A valid feature vimg does not implement (encryption, an unknown incompatible bit)."""

class UnsafeReferenceError(Error):
    """The image names a file outside what the external-file policy allows."""

class CancelledError(Error):
    """The operation was cancelled."""

class IoError(Error):
    """An operating-system I/O error."""

class SafetyCheckFailed(Error):
    """The image is not self-contained."""

    failures: Dict[str, str]
    """Each field that names a file (e.g. 'backing_file', 'extent 1') -> the reason."""

class Inspection:
    """What :func:`inspect` found (plain data; the file is closed)."""

    format: str
    """Format name: raw, qcow2, vmdk, vpc, vhdx, vdi, ..."""
    virtual_size: int
    """Guest-visible size in bytes."""
    actual_size: Optional[int]
    """Bytes the file takes on disk, when known."""
    references: List[Dict[str, str]]
    """Every file the image names: {'field', 'name' (as stored), 'role'}."""
    image_service: Dict[str, Any]
    """What to register the image with: disk_format, container_format, min_disk, safe,
    references. For an image inside a compressed container or an OVA it describes the
    image inside converted out to a file of its own (container_format 'bare'), with
    input_container_format, input_usable=False, a note and convert_command."""
    path: str
    """The file inspected."""
    def safety_check(self) -> None:
        """Raise SafetyCheckFailed unless the image names no other file."""

def info(path: _Path, backing_chain: bool = False) -> Any:
    """`vimg info --output=json PATH` as a dict; a list of dicts (top image first) with
    backing_chain=True: qemu-img's keys (`children`, the node tree qemu-img 10 prints,
    included), then vimg's (`vimg-external-references`, `vimg-container`, `vimg-ova`,
    `image-service`, the block Inspection.image_service gives)."""

def inspect(path: _Path, format: Optional[str] = None) -> Inspection:
    """Open the image without following what it names and describe it."""

def convert(
    src: _Path,
    dst: _Path,
    out_format: str,
    *,
    src_format: Optional[str] = None,
    options: Optional[Union[Mapping[str, Union[str, int, bool]], str]] = None,
    compress: bool = False,
    checksum: Optional[str] = None,
    progress: Optional[Callable[[int, int], object]] = None,
    allow_external: bool = False,
    image_service: bool = False,
) -> Any:
    """Convert src into a new dst of out_format, all or nothing. Returns the hex digest
    of dst when checksum ('sha256', 'sha512', 'md5') is given, else None; with
    image_service=True a dict {'checksum', 'image-service'} (the block for dst, with
    os_hash_algo/os_hash_value when a checksum was taken). An exception
    raised by progress(done, total) cancels the conversion and is re-raised."""

def check(path: _Path, format: Optional[str] = None, *, allow_external: bool = False) -> Dict[str, Any]:
    """`vimg check --output=json PATH` as a dict (check-errors, corruptions, leaks,
    cluster counts, filename, format). Only reads the image."""

def compare(
    a: _Path,
    b: _Path,
    *,
    format_a: Optional[str] = None,
    format_b: Optional[str] = None,
    strict: bool = False,
    allow_external: bool = False,
) -> Dict[str, Any]:
    """`vimg compare A B`: {'identical', 'result', 'offset', 'size-warning', 'exit-code'}."""

def measure(
    out_format: str,
    *,
    size: Optional[int] = None,
    filename: Optional[_Path] = None,
    format: Optional[str] = None,
    options: Optional[Union[Mapping[str, Union[str, int, bool]], str]] = None,
    allow_external: bool = False,
) -> Dict[str, int]:
    """`vimg measure --output=json`: {'required', 'fully-allocated'[, 'bitmaps']}."""

def map(
    path: _Path,
    format: Optional[str] = None,
    *,
    start: int = 0,
    length: Optional[int] = None,
    allow_external: bool = False,
) -> List[Dict[str, Any]]:
    """`vimg map --output=json PATH` as a list of dicts."""

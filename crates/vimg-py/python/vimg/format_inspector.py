"""A drop-in for ``oslo_utils.imageutils.format_inspector``, backed by vimg's parsers.

The same public names and behaviour: :func:`detect_file_format`, :func:`get_inspector`,
:data:`ALL_FORMATS`, the streaming :class:`InspectWrapper` (a file-like or iterable
wrapper that inspects what passes through it), inspector classes with ``from_file()``,
``eat_chunk()``, capture regions (:class:`CaptureRegion`, :class:`EndCaptureRegion`),
``format``, ``format_match``, ``virtual_size``, ``actual_size``, ``complete``,
``context_info``, ``safety_check()`` and ``str()``; :class:`SafetyCheck`, and the
:class:`ImageFormatError`, :class:`SafetyViolation` and :class:`SafetyCheckFailed`
exceptions (the last with a ``failures`` mapping of check name to violation).

What is vimg's: an inspector for a format vimg reads (qcow2, vhd, vhdx, vmdk, vdi) keeps
the regions of the stream that vimg's own parser asks for and has the library open the
image from them (``vimg._vimg.judge_captured``): the format, the virtual size and every
file the image names are the library's answer, the same as ``vimg info`` gives for the
file. Its ``vimg`` safety check fails unless that open succeeded and the image names no
other file. Format identification is the library's probe, ISO 9660 the library's test;
the protective-MBR rules are Rust next to the bindings (``src/mbr.rs``). oslo's
finer-grained checks (qcow2 feature bits, the VMDK descriptor's lines and footer: Rust in
``src/oslo_rules.rs``) are kept under their oslo names so that callers matching on them
keep working; they add to the library's verdict, never replace it.

Where vimg answers differently, it is the safer answer: an inspector that was never
given an image vimg could open does not pass ``safety_check()``; LUKS payloads are not
decrypted (a passphrase can therefore not be verified, and that check fails).
"""

import abc
import logging
import os
import stat
import struct

from . import _vimg

LOG = logging.getLogger(__name__)

__all__ = [
    "ALL_FORMATS",
    "CaptureRegion",
    "ContainerFileInspector",
    "EndCaptureRegion",
    "FileInspector",
    "ImageFormatError",
    "InspectWrapper",
    "SafetyCheck",
    "SafetyCheckFailed",
    "SafetyViolation",
    "detect_file_format",
    "get_inspector",
]

# Bytes a library-judged inspector keeps at most (all its regions together) from a pure
# stream, and when reading back from a file (the library's own cap on one table). An image
# whose metadata needs more cannot be judged, and is refused.
_MAX_KEPT = 1 << 20
_MAX_KEPT_FILE = 32 << 20
# Reads vimg wants this close to the (still unknown) end of a stream are the end's.
_TAIL_MAX = 256 << 10
# A pure stream (no file to read back from) keeps this much of what it passed last while
# the library has not judged the image: parsers read back and forth (qemu-img's VHDX has
# its BAT a MiB before the metadata table that sizes it). Dropped once judged.
_WINDOW = 2 << 20


class ImageFormatError(Exception):
    """The content is not (or not validly) in the format asked for."""


class SafetyViolation(Exception):
    """One safety check failed."""


class SafetyCheckFailed(Exception):
    """One or more safety checks failed; ``failures`` maps check name -> violation."""

    def __init__(self, failures):
        super().__init__("Safety checks failed: %s" % ",".join(failures.keys()))
        self.failures = failures


class CaptureRegion:
    """Bytes ``offset .. offset + length`` of a stream, kept as the stream passes them.

    Feed every chunk to :meth:`capture` with the stream position *after* the chunk. The
    region is ``complete`` once it holds ``length`` bytes (or ``min_length``, when given).
    Feeding the same chunk twice does no harm.
    """

    def __init__(self, offset, length, min_length=None):
        self.offset = offset
        self.length = length
        self.min_length = min_length
        self.data = b""

    @property
    def complete(self):
        if self.min_length is not None:
            return len(self.data) >= self.min_length
        return len(self.data) == self.length

    def capture(self, chunk, current_position):
        have = len(self.data)
        need = self.length - have
        if need <= 0:
            return b""
        start = current_position - len(chunk)
        at = self.offset + have  # the next byte this region wants
        if start <= at < current_position:
            piece = chunk[at - start : at - start + need]
            if not isinstance(self.data, bytearray):
                self.data = bytearray(self.data)
            self.data += piece
        return b""


class EndCaptureRegion(CaptureRegion):
    """The last ``offset`` bytes of a stream (complete only once :meth:`finish` says the
    stream ended). ``offset`` becomes the region's position in the stream."""

    def __init__(self, offset):
        super().__init__(offset, offset)
        self._ended = False
        self._buf = bytearray()

    @property
    def data(self):
        if len(self._buf) > self.length:
            del self._buf[: len(self._buf) - self.length]
        return self._buf

    @data.setter
    def data(self, value):
        self._buf = bytearray(value)

    def capture(self, chunk, current_position):
        self._buf += chunk
        # Trimmed lazily (amortised), so a small chunk size costs no quadratic copying.
        if len(self._buf) > 2 * self.length + 65536:
            del self._buf[: len(self._buf) - self.length]
        self.offset = current_position - min(len(self._buf), self.length)
        return b""

    @property
    def complete(self):
        return self._ended and len(self.data) == self.length

    def finish(self):
        """The stream has ended."""
        self._ended = True


class SafetyCheck:
    """A named check: calling it returns, or raises SafetyViolation (an unexpected
    exception from the check becomes a SafetyViolation too: it fails closed)."""

    def __init__(self, name, target_fn, description=None):
        self.name = name
        self.target_fn = target_fn
        self.description = description

    def __call__(self):
        try:
            return self.target_fn()
        except (SafetyViolation, SafetyCheckFailed):
            raise
        except Exception as e:
            LOG.error("Safety check %s failed unexpectedly: %s", self.name, e)
            raise SafetyViolation("Unexpected error") from e

    @classmethod
    def null(cls):
        """A check that always passes (a format with nothing to check)."""
        return cls("null", lambda: None, "no checks")

    @classmethod
    def banned(cls):
        """A check that always fails (a format never allowed)."""

        def banned():
            raise SafetyViolation("This file format is not allowed")

        return cls("banned", banned, "format not allowed")


class FileInspector(abc.ABC):
    """Inspects a stream fed to it in chunks (:meth:`eat_chunk`), keeping only the named
    capture regions it needs. Subclasses set ``NAME``, declare regions and safety checks
    in ``_initialize()`` and answer ``format_match``."""

    NAME = ""

    def __init__(self, tracing=False, params=None):
        self._tracing = tracing
        self._params = params or {}
        self._total_count = 0
        self._capture_regions = {}
        self._safety_checks = {}
        self._finished = False
        # A way to read the file the stream comes from where the library asks (a
        # file's pread), or None; and that file's size, once known.
        self._backfill = None
        self._file_size = None
        self._initialize()
        if not self._safety_checks:
            raise RuntimeError("All inspectors must define at least one safety check")

    def _trace(self, *args):
        if self._tracing:
            LOG.debug(*args)

    @abc.abstractmethod
    def _initialize(self):
        """Declare the first capture regions and the safety checks."""

    @property
    @abc.abstractmethod
    def format_match(self):
        """True when the content is this format."""

    def finish(self):
        """The whole stream was fed: end regions complete, nothing more may be fed."""
        self._finished = True
        for r in list(self._capture_regions.values()):
            if isinstance(r, EndCaptureRegion):
                r.finish()

    def _capture(self, chunk, only=None):
        if self._finished:
            raise RuntimeError("Inspector has been marked finished, no more data accepted")
        for name, r in list(self._capture_regions.items()):
            if only is not None and name not in only:
                continue
            if isinstance(r, EndCaptureRegion) or not r.complete:
                r.capture(chunk, self._total_count)

    def eat_chunk(self, chunk):
        """Present the next chunk of the stream."""
        complete_before = {n for n, r in self._capture_regions.items() if r.complete}
        self._total_count += len(chunk)
        self._capture(chunk)
        # post_process may declare regions this very chunk covers: feed it to them and
        # ask again, until it declares no more.
        while True:
            before = dict(self._capture_regions)
            self.post_process()
            new = {n for n, r in self._capture_regions.items() if before.get(n) is not r}
            if not new:
                break
            self._capture(chunk, only=new)
        for name, r in list(self._capture_regions.items()):
            if r.complete and name not in complete_before:
                self.region_complete(name)

    def post_process(self):
        """Called after each chunk is captured; may declare new regions."""

    def region(self, name):
        return self._capture_regions[name]

    def region_name(self, region):
        for name, r in self._capture_regions.items():
            if r is region:
                return name
        raise ValueError("No such region")

    def new_region(self, name, region):
        if name in self._capture_regions:
            raise ImageFormatError("Inspector re-added region %s" % name)
        self._capture_regions[name] = region

    def has_region(self, name):
        return name in self._capture_regions

    def delete_region(self, name):
        del self._capture_regions[name]

    def region_complete(self, region_name):
        """Called once when a region becomes complete."""

    def add_safety_check(self, check):
        if not isinstance(check, SafetyCheck):
            raise RuntimeError("Unable to add safety check of type %s" % type(check).__name__)
        if check.name in self._safety_checks:
            raise RuntimeError("Duplicate check of name %s" % check.name)
        self._safety_checks[check.name] = check

    @property
    def format(self):
        """The format's name (as ``str(inspector)``)."""
        return self.NAME

    def _attach(self, backfill):
        self._backfill = backfill
        if backfill is not None:
            self._file_size = backfill.size

    def _stream_length(self):
        """The stream's length: the file's size when the stream is a file, else what
        was fed so far (so a format whose size is its length is not reported smaller
        than it is because inspection stopped early)."""
        return max(self._total_count, self._file_size or 0)

    @property
    def virtual_size(self):
        """Guest-visible size in bytes (0 while unknown)."""
        return self._stream_length()

    @property
    def actual_size(self):
        """Bytes fed so far (the file's size once all of it was fed)."""
        return self._total_count

    @property
    def complete(self):
        """True when the inspector has all it needs."""
        return all(r.complete for r in self._capture_regions.values())

    def __str__(self):
        return self.NAME

    def __repr__(self):
        return "<%s %s>" % (type(self).__name__, self.NAME)

    @property
    def context_info(self):
        """Bytes kept in memory, per region."""
        return {n: len(r.data) for n, r in self._capture_regions.items()}

    @classmethod
    def from_file(cls, filename):
        """Inspect ``filename`` as this format, reading no more of it than needed.

        :raises ImageFormatError: if it is not this format.
        """
        inspector = cls()
        with open(filename, "rb") as f:
            inspector._attach(_file_backfill(f))
            while True:
                chunk = f.read(512)
                if not chunk:
                    break
                inspector.eat_chunk(chunk)
                if inspector.complete:
                    break
            inspector.finish()
            inspector._attach(None)
        if not inspector.complete or not inspector.format_match:
            raise ImageFormatError("File is not in requested format")
        return inspector

    def safety_check(self):
        """Run every safety check.

        :raises ImageFormatError: if the inspection is incomplete or did not match.
        :raises SafetyCheckFailed: if one or more checks failed.
        """
        if not self.complete:
            raise ImageFormatError("Incomplete file cannot be safety checked")
        if not self.format_match:
            raise ImageFormatError(
                "Unable to safety check format %s because content does not match" % self
            )
        failures = {}
        for check in self._safety_checks.values():
            try:
                check()
            except SafetyViolation as e:
                e.check = check
                failures[check.name] = e
                LOG.warning("Safety check %s on %s failed: %s", check.name, self, e)
            except SafetyCheckFailed as e:
                # A nested inspector's checks, named apart.
                for name, v in e.failures.items():
                    failures["inner_" + name] = v
        if failures:
            raise SafetyCheckFailed(failures)


class ContainerFileInspector(FileInspector):
    """A format that wraps another (LUKS): ``inner_format`` is the wrapped format's
    inspector when known, and the ``inner_safety`` check runs its safety checks."""

    def __init__(self, tracing=False, params=None):
        self._inner_format = None
        super().__init__(tracing=tracing, params=params)
        self.add_safety_check(SafetyCheck("inner_safety", self.check_inner_safety))

    @property
    def inner_format(self):
        return self._inner_format

    def check_inner_safety(self):
        if self._inner_format is not None:
            self._inner_format.safety_check()


class _Backfill:
    """Positional reads of the file a stream comes from (its position untouched), so
    what the library asks for is read where it is, before or after the stream's
    position: ``read(offset, n)`` and the file's ``size``."""

    def __init__(self, read, size):
        self.read = read
        self.size = size


def _file_backfill(f):
    """A :class:`_Backfill` over the regular file or BytesIO ``f``, else None (a pipe,
    a socket, an iterator: those are inspected as pure streams)."""
    try:
        fd = f.fileno()
        st = os.fstat(fd)
    except (AttributeError, OSError, ValueError):
        getbuffer = getattr(f, "getbuffer", None)
        if getbuffer is None:
            return None
        return _Backfill(lambda off, n: bytes(getbuffer()[off : off + n]), len(getbuffer()))
    if not stat.S_ISREG(st.st_mode):
        return None
    return _Backfill(lambda off, n: os.pread(fd, n, off), st.st_size)


class RawFileInspector(FileInspector):
    """Raw: the virtual size is the stream's length. Content that starts with the
    signature of a format the library knows is never raw (its from_file refuses it)."""

    NAME = "raw"

    def _initialize(self):
        self._head = bytearray()
        self.add_safety_check(SafetyCheck.null())

    def eat_chunk(self, chunk):
        if len(self._head) < 512:
            self._head += chunk[: 512 - len(self._head)]
        super().eat_chunk(chunk)

    @property
    def format_match(self):
        return not _vimg.probe_head(bytes(self._head))


class _Judged(FileInspector):
    """A format vimg reads: identified by the library's probe on the first 512 bytes,
    then judged by the library from the regions it asks for (see the module doc).

    Regions the library asks for are named ``vimg@OFFSET+LENGTH`` (and ``vimg-tail``
    for the end of a stream whose length is not known yet). From a file (``from_file``,
    ``detect_file_format``, an ``InspectWrapper`` around a regular file) they are read
    where they are; from a pure stream they are kept as it passes them, and a range the
    stream has already passed makes the image one that cannot be judged (its ``vimg``
    safety check fails).
    """

    # vimg's name for the format.
    _VIMG = ""
    HEADER = 512

    def _initialize(self):
        self._identified = None  # unknown until the header is complete
        self._verdict = None
        self._judged_length = None  # the stream length the verdict assumed (None: unknown)
        self._asked_with = None  # what was kept when the library was last asked
        self._lost = None  # why the stream cannot be judged, when it cannot
        self._chunk_len = 0
        self.new_region("header", CaptureRegion(0, self.HEADER))
        # The look-back window for a pure stream (see _WINDOW); dropped at once when the
        # stream turns out to be a file, or not this format.
        self.new_region("vimg-window", EndCaptureRegion(_WINDOW))
        self._add_checks()
        self.add_safety_check(SafetyCheck("vimg", self.check_vimg, "vimg opens it"))

    def _add_checks(self):
        """Add the format's own regions and oslo-named checks."""

    def _identify(self, header):
        """True when ``header`` (the first 512 bytes) is this format's."""
        return self._VIMG in _vimg.probe_head(bytes(header))

    @property
    def identified(self):
        if self._identified is None:
            if not self.has_region("header") or not self.region("header").complete:
                return False
            self._identified = self._identify(self.region("header").data)
        return self._identified

    def _own_regions(self):
        return [(n, r) for n, r in self._capture_regions.items() if not n.startswith("vimg")]

    def _done(self):
        if self._identified is False:
            return True
        if self._verdict is None and self._lost is None:
            return False
        return all(r.complete and not isinstance(r, EndCaptureRegion) for _, r in self._own_regions())

    def eat_chunk(self, chunk):
        if self._done():
            # Nothing more to learn: only count.
            if self._finished:
                raise RuntimeError("Inspector has been marked finished, no more data accepted")
            self._total_count += len(chunk)
            return
        super().eat_chunk(chunk)

    def _capture(self, chunk, only=None):
        self._chunk_len = len(chunk)
        super()._capture(chunk, only)

    def post_process(self):
        if self.identified and self._verdict is None and self._lost is None:
            self._advance()
        judged = self._verdict is not None or self._lost is not None
        if self.has_region("vimg-window") and (
            judged or self._backfill is not None or self._identified is False
        ):
            self.delete_region("vimg-window")

    def _from_window(self, off, n):
        """Bytes ``off .. off + n`` if the look-back window still holds them, else None."""
        if not self.has_region("vimg-window"):
            return None
        w = self.region("vimg-window")
        data = w.data
        start = self._total_count - len(data)
        if off < start or off + n > self._total_count:
            return None
        return bytes(data[off - start : off - start + n])

    def finish(self):
        # Feeding stopped. From a file, a region not filled yet is read where it is;
        # from a stream that ended, a region cut short by the end holds all there is.
        done = []
        for name, r in self._capture_regions.items():
            if isinstance(r, EndCaptureRegion) or r.complete:
                continue
            have = len(r.data)
            if self._backfill is not None:
                rest = self._backfill.read(r.offset + have, r.length - have)
                r.data = bytes(r.data) + rest
            if not r.complete and (r.data or self._backfill is not None):
                r.length = len(r.data)
                r.min_length = None
            if r.complete:
                done.append(name)
        for name in done:
            self.region_complete(name)
        super().finish()
        if self._verdict is not None and self._judged_length is None:
            # Judged while the stream's length was unknown: judge again against the
            # real length (what a file of this length would be told), from what was kept.
            self._verdict = None
        self.post_process()

    def _pieces(self):
        out = []
        for name, r in self._capture_regions.items():
            if name == "vimg-window":
                continue
            if isinstance(r, EndCaptureRegion) and not self._finished:
                continue
            if r.data:
                out.append((r.offset, bytes(r.data)))
        return out

    def _advance(self):
        """Ask the library; keep what it asks for; a verdict once it read only kept bytes."""
        file = self._backfill
        pending = [
            r for n, r in self._capture_regions.items() if n.startswith("vimg@")
        ]
        if file is None and not self._finished and not all(r.complete for r in pending):
            return
        # Nothing kept since the last question (only the end of the stream is awaited):
        # the answer would be the same.
        known = (len(pending), self._finished)
        if known == self._asked_with:
            return
        self._asked_with = known
        if self._file_size is not None:
            length = self._file_size
        elif self._finished:
            length = self._total_count
        else:
            length = None
        for _ in range(64):
            v = _vimg.judge_captured(self._VIMG, self._pieces(), length)
            if v["status"] != "need":
                self._verdict = v
                self._judged_length = length
                self._on_verdict()
                return
            waiting = False
            added = False
            for off, n in v["ranges"]:
                if n <= 0:
                    continue
                if length is None and off >= _vimg.UNKNOWN_STREAM_LENGTH - _TAIL_MAX:
                    self._want_tail(_vimg.UNKNOWN_STREAM_LENGTH - off)
                    waiting = True
                    continue
                name = "vimg@%d+%d" % (off, n)
                if self.has_region(name):
                    waiting = waiting or not self.region(name).complete
                    continue
                kept_now = sum(v for k, v in self.context_info.items() if k != "vimg-window")
                cap = _MAX_KEPT if file is None else _MAX_KEPT_FILE
                if kept_now + n > cap:
                    self._lose("vimg needs more than %d bytes of metadata" % cap)
                    return
                r = CaptureRegion(off, n)
                if file is not None:
                    r.data = file.read(off, n)
                    r.length = len(r.data)
                elif self._finished or off < self._total_count - self._chunk_len:
                    kept = self._from_window(off, min(n, max(0, self._total_count - off)))
                    if kept is None:
                        self._lose("vimg needs bytes at %d, which the stream had passed" % off)
                        return
                    r.data = kept
                    if self._finished:
                        r.length = len(kept)
                self.new_region(name, r)
                added = True
                waiting = waiting or not r.complete
            if waiting:
                if self._finished:
                    self._lose("vimg needs bytes the stream did not hold")
                # else: eat_chunk feeds the current chunk to new regions, then asks again
                return
            if not added:
                break
        self._lose("vimg kept asking for more of the file")

    def _want_tail(self, n):
        n = min(max(n, 64 << 10), _TAIL_MAX)
        if self.has_region("vimg-tail"):
            if self.region("vimg-tail").length >= n:
                return
            self.delete_region("vimg-tail")
        self.new_region("vimg-tail", EndCaptureRegion(n))

    def _lose(self, why):
        self._lost = why
        LOG.debug("%s: the image cannot be judged: %s", self.NAME, why)

    def _on_verdict(self):
        """Called once the library has answered. An image the library refuses stays
        identified as its format (never "raw"); its ``vimg`` safety check fails with
        the library's reason."""

    @property
    def format_match(self):
        if not self.identified:
            return False
        # Identified by its signature: this format, whatever the library's verdict (an
        # image it refuses fails the safety check; it is never taken for raw).
        return True

    @property
    def complete(self):
        if not self.has_region("header") or not self.region("header").complete:
            return False
        if not self.identified:
            return True
        if self._verdict is None and self._lost is None:
            return False
        return all(r.complete for _, r in self._own_regions())

    @property
    def virtual_size(self):
        v = self._verdict
        if v is not None and v["status"] == "ok":
            return v["virtual_size"]
        return 0

    def _references(self):
        v = self._verdict
        return v.get("references", []) if v and v["status"] == "ok" else []

    def check_vimg(self):
        """The library opened the image from what was kept, and it names no file."""
        v = self._verdict
        if v is None:
            raise SafetyViolation(
                "vimg did not judge the image: %s" % (self._lost or "not given enough of it")
            )
        if v["status"] != "ok":
            raise SafetyViolation(v["message"])
        if v["references"]:
            raise SafetyViolation(
                "Image names other files: %s"
                % ", ".join("%s '%s'" % (f, n) for f, n in v["references"])
            )


class QcowInspector(_Judged):
    """qcow2 (QEMU's docs/interop/qcow2.txt)."""

    NAME = "qcow2"
    _VIMG = "qcow2"
    BF_OFFSET = 0x08
    BF_OFFSET_LEN = 8
    I_FEATURES = 0x48
    I_FEATURES_LEN = 8
    I_FEATURES_DATAFILE_BIT = 2
    # Incompatible feature bits below this are known (dirty, corrupt, external data
    # file, compression type, extended L2).
    I_FEATURES_MAX_BIT = 5

    def _add_checks(self):
        self.add_safety_check(SafetyCheck("backing_file", self.check_backing_file))
        self.add_safety_check(SafetyCheck("data_file", self.check_data_file))
        self.add_safety_check(SafetyCheck("unknown_features", self.check_unknown_features))

    def region_complete(self, region_name):
        if region_name == "header":
            self._identified = None

    def _header_field(self, at, n):
        return int.from_bytes(bytes(self.region("header").data[at : at + n]), "big")

    def check_backing_file(self):
        if any(f == "backing_file" for f, _ in self._references()):
            raise SafetyViolation("Image has a backing file")
        if self._header_field(self.BF_OFFSET, self.BF_OFFSET_LEN) != 0:
            raise SafetyViolation("Image has a backing file")

    def check_data_file(self):
        if any(f == "data_file" for f, _ in self._references()):
            raise SafetyViolation("Image has data_file set")
        v = self._verdict or {}
        if v.get("kind") == "unsafe-reference" and "data_file" in v.get("message", ""):
            raise SafetyViolation("Image has data_file set")
        if self._header_field(4, 4) >= 3:
            features = self._header_field(self.I_FEATURES, self.I_FEATURES_LEN)
            if features & (1 << self.I_FEATURES_DATAFILE_BIT):
                raise SafetyViolation("Image has data_file set")

    def check_unknown_features(self):
        """oslo's rule on the version and incompatible feature bits (src/oslo_rules.rs):
        bits at or above ``I_FEATURES_MAX_BIT`` are unknown."""
        why = _vimg.qcow2_check_features(bytes(self.region("header").data), self.I_FEATURES_MAX_BIT)
        if why is not None:
            raise SafetyViolation(why)


class VHDInspector(_Judged):
    """VHD, dynamic or fixed with its footer copy first (QEMU calls it vpc)."""

    NAME = "vhd"
    _VIMG = "vpc"


class VHDXInspector(_Judged):
    """VHDX ([MS-VHDX])."""

    NAME = "vhdx"
    _VIMG = "vhdx"
    METAREGION = "8B7CA206-4790-4B9A-B8FE-575F050F886E"
    VIRTUAL_DISK_SIZE = "2FA54224-CD1B-4876-B211-5DBED83BF4B8"
    # The metadata table is at most 64 KiB ([MS-VHDX] 2.6.1: 2047 entries of 32 bytes
    # after a 32-byte header).
    VHDX_METADATA_TABLE_MAX_SIZE = 32 * 2048

    @staticmethod
    def _guid(buf):
        """A GUID in its usual text form from its 16 on-disk bytes (mixed-endian)."""
        a, b, c = struct.unpack("<IHH", bytes(buf[:8]))
        rest = bytes(buf[8:16]).hex().upper()
        return "%08X-%04X-%04X-%s-%s" % (a, b, c, rest[:4], rest[4:])

    def _find_meta_entry(self, desired_guid):
        """The capture region of the metadata item ``desired_guid`` (its length capped
        at the table's maximum), from the kept ``metadata`` region; None if absent."""
        meta = bytes(self.region("metadata").data)
        if len(meta) < 32:
            return None
        sig, _reserved, count = struct.unpack("<8sHH", meta[:12])
        if sig != b"metadata":
            raise ImageFormatError("Invalid signature for metadata region: %r" % sig)
        if count >= 2048:
            raise ImageFormatError("Metadata item count is %d (limit 2047)" % count)
        if len(meta) < 32 + 32 * count:
            return None
        for i in range(count):
            e = meta[32 + 32 * i : 64 + 32 * i]
            if self._guid(e[:16]) == desired_guid:
                item_offset, item_length, _ = struct.unpack("<III", e[16:28])
                item_length = min(item_length, self.VHDX_METADATA_TABLE_MAX_SIZE)
                return CaptureRegion(self.region("metadata").offset + item_offset, item_length)
        return None


class VMDKInspector(_Judged):
    """VMDK: monolithicSparse and streamOptimized (one file); a descriptor naming other
    files fails the safety check."""

    NAME = "vmdk"
    _VIMG = "vmdk"
    DESC_OFFSET = 0x200
    DESC_MAX_SIZE = (1 << 20) - 1
    GD_AT_END = 0xFFFFFFFFFFFFFFFF
    MARKER_EOS = 0
    MARKER_FOOTER = 3
    _SPARSE_HEADER = struct.Struct("<4sIIQQQQIQQ")  # through gdOffset (VDF 1.1, 4.1)

    def _add_checks(self):
        self.desc_text = None
        self.vmdktype = None
        self._desc_placed = False
        # A text descriptor is the file itself; a sparse header moves this region to
        # where the header says the embedded descriptor is.
        self.new_region("descriptor", CaptureRegion(0, 512))
        self.add_safety_check(SafetyCheck("descriptor", self.check_descriptor))

    def _sparse(self, data, at=0):
        f = self._SPARSE_HEADER.unpack(bytes(data[at : at + self._SPARSE_HEADER.size]))
        # signature, version, capacity (sectors), descriptor sector, descriptor sectors,
        # grain directory offset
        return f[0], f[1], f[3], f[5], f[6], f[9]

    def post_process(self):
        header = self.region("header") if self.has_region("header") else None
        if not self._desc_placed and header is not None and header.complete:
            head = bytes(header.data)
            self._desc_placed = True
            if head.startswith(b"KDMV"):
                _sig, ver, _cap, d_sec, d_num, gd = self._sparse(head.ljust(64, b"\0"))
                if ver not in (1, 2, 3):
                    raise ImageFormatError("Unsupported format version %d" % ver)
                if d_sec * 512 != self.DESC_OFFSET:
                    raise ImageFormatError("Wrong descriptor location")
                self.delete_region("descriptor")
                size = min(d_num * 512, self.DESC_MAX_SIZE)
                self.new_region("descriptor", CaptureRegion(d_sec * 512, size))
                if gd == self.GD_AT_END and not self.has_region("footer"):
                    self.new_region("footer", EndCaptureRegion(1536))
                    self.add_safety_check(SafetyCheck("footer", self.check_footer))
            elif not self.identified and not _is_text(head):
                raise ImageFormatError("Signature KDMV not found: %r" % head[:4])
        super().post_process()

    def region_complete(self, region_name):
        if region_name == "descriptor":
            self._parse_descriptor()

    def _parse_descriptor(self):
        data = bytes(self.region("descriptor").data)
        data = data.split(b"\x00", 1)[0]
        try:
            text = data.decode("ascii").lower()
        except UnicodeDecodeError:
            LOG.error("VMDK descriptor is not ASCII")
            return
        kind = "formatnotfound"
        key = 'createtype="'
        at = text.find(key)
        if at >= 0:
            end = text.find('"', at + len(key))
            if 0 <= end - (at + len(key)) < 64:
                kind = text[at + len(key) : end]
        self.desc_text = text
        self.vmdktype = kind

    def check_descriptor(self):
        """oslo's descriptor rules (src/oslo_rules.rs)."""
        if not self.desc_text:
            raise SafetyViolation("No descriptor found")
        why = _vimg.vmdk_check_descriptor(self.desc_text, self.vmdktype or "")
        if why is not None:
            raise SafetyViolation(why)

    def check_footer(self):
        """The stream-optimized footer against the header (src/oslo_rules.rs)."""
        why = _vimg.vmdk_check_footer(
            bytes(self.region("header").data), bytes(self.region("footer").data)
        )
        if why is not None:
            raise SafetyViolation(why)


class VDIInspector(_Judged):
    """VirtualBox VDI."""

    NAME = "vdi"
    _VIMG = "vdi"


def _is_text(data):
    """True when ``data`` is printable ASCII text (a VMDK descriptor could be)."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c.isspace() for c in text)


class ISOInspector(FileInspector):
    """ISO 9660, by the library's test on the volume descriptor at 32 KiB. Read as raw;
    the virtual size is the stream's length."""

    NAME = "iso"

    def _initialize(self):
        self.new_region("descriptor", CaptureRegion(_vimg.ISO_DESCRIPTOR_AT, 2048))
        self.add_safety_check(SafetyCheck.null())

    @property
    def format_match(self):
        r = self.region("descriptor")
        return r.complete and _vimg.is_iso9660(bytes(r.data))


class GPTInspector(FileInspector):
    """A raw disk with a GPT, by its protective MBR (the library's MBR rules). Read as
    raw; the virtual size is the stream's length."""

    NAME = "gpt"

    def _initialize(self):
        self.new_region("mbr", CaptureRegion(0, 512))
        self.add_safety_check(SafetyCheck("mbr", self.check_mbr_partitions))

    @property
    def format_match(self):
        r = self.region("mbr")
        return r.complete and _vimg.is_mbr(bytes(r.data))

    def check_mbr_partitions(self):
        why = _vimg.check_mbr_partitions(bytes(self.region("mbr").data))
        if why is not None:
            raise SafetyViolation(why)


class QEDInspector(FileInspector):
    """QED: identified, always refused (its backing files cannot be vetted here)."""

    NAME = "qed"

    def _initialize(self):
        self.new_region("header", CaptureRegion(0, 512))
        self.add_safety_check(SafetyCheck.banned())

    @property
    def format_match(self):
        r = self.region("header")
        return r.complete and "qed" in _vimg.probe_head(bytes(r.data))


class LUKSInspector(ContainerFileInspector):
    """LUKS1 (the LUKS1 on-disk format specification, 1.2.3): identified by the
    library's probe; the payload is not decrypted, so no inner format is found and a
    passphrase given in ``params['luks_passphrase']`` cannot be verified (that check
    fails). The virtual size is the stream's length less the payload offset."""

    NAME = "luks"
    _HEADER = struct.Struct(">6sH32s32s32sII20s32sI")
    _NAMES = (
        "magic",
        "version",
        "cipher_alg",
        "cipher_mode",
        "hash",
        "payload_offset",
        "key_bytes",
        "mk_digest",
        "mk_digest_salt",
        "mk_digest_iter",
    )
    # Key slots: 8 of 48 bytes from 208 (active, iterations, salt[32], key offset,
    # stripes).
    _SLOT = struct.Struct(">II32sII")
    _SLOT_ACTIVE = 0x00AC71F3

    def _initialize(self):
        self._passphrase = self._params.get("luks_passphrase")
        self._iter_limit = int(self._params.get("luks_iter_limit", 12000000))
        self._active_slot = None
        self.new_region("header", CaptureRegion(0, 592))
        self.add_safety_check(SafetyCheck("version", self.check_version))
        self.add_safety_check(SafetyCheck("passphrase", self.check_passphrase))

    @property
    def format_match(self):
        r = self.region("header")
        return len(r.data) >= 6 and "luks" in _vimg.probe_head(bytes(r.data[:512]))

    @property
    def header_items(self):
        return dict(zip(self._NAMES, self._HEADER.unpack(bytes(self.region("header").data[:168]))))

    def post_process(self):
        r = self.region("header")
        if not r.complete or not self._passphrase or self.has_region("key_material"):
            return
        if not self.format_match:
            return
        items = self.header_items
        for i in range(8):
            active, _iters, _salt, key_offset, stripes = self._SLOT.unpack(
                bytes(r.data[208 + 48 * i : 256 + 48 * i])
            )
            if active == self._SLOT_ACTIVE:
                self._active_slot = i
                self.new_region(
                    "key_material",
                    CaptureRegion(key_offset * 512, items["key_bytes"] * stripes),
                )
                return

    def region_complete(self, region_name):
        if region_name == "key_material":
            # Fails closed: a passphrase cannot be verified without decrypting.
            raise ValueError(
                "Could not recover master key: vimg does not decrypt LUKS payloads"
            )

    def _decrypt_first_block(self):
        if not self.has_region("key_material") or not self.region("key_material").complete:
            raise ValueError("Key material not available")
        raise ValueError("vimg does not decrypt LUKS payloads")

    def check_version(self):
        version = self.header_items["version"]
        if version != 1:
            raise SafetyViolation("LUKS version %d is not supported" % version)

    def check_passphrase(self):
        if self._passphrase is not None and self._inner_format is None:
            raise SafetyViolation("Passphrase is incorrect")

    @property
    def virtual_size(self):
        if not self.region("header").complete or not self.format_match:
            return 0
        return max(0, self._stream_length() - self.header_items["payload_offset"] * 512)


class InspectWrapper:
    """Wraps a file-like object (``read(size)``) or an iterator of chunks and inspects
    what passes through with every format's inspector (or those in
    ``allowed_formats``). ``format`` is then the single format found.

    With ``expected_format``, an error from that format's inspector, or its finding that
    the content is not that format, is raised from ``read()`` at once.
    """

    def __init__(self, source, expected_format=None, allowed_formats=None, tracing=False, params=None):
        self._source = source
        self._expected_format = expected_format
        self._errored_inspectors = set()
        self._inspectors = {
            cls(tracing=tracing, params=params)
            for name, cls in ALL_FORMATS.items()
            if not allowed_formats or name in allowed_formats
        }
        backfill = _file_backfill(source) if hasattr(source, "read") else None
        for i in self._inspectors:
            i._attach(backfill)
        self._finished = False

    def __iter__(self):
        return self

    def _process_chunk(self, chunk):
        for inspector in [i for i in self._inspectors if i not in self._errored_inspectors]:
            try:
                inspector.eat_chunk(chunk)
            except Exception as e:
                if inspector.NAME == self._expected_format:
                    raise
                if not self._expected_format:
                    LOG.debug("Format inspector for %s does not match (%s)", inspector.NAME, e)
                self._errored_inspectors.add(inspector)
            else:
                if (
                    inspector.NAME == self._expected_format
                    and inspector.complete
                    and not inspector.format_match
                ):
                    raise ImageFormatError(
                        "Content does not match expected format %r" % inspector.NAME
                    )

    def __next__(self):
        try:
            chunk = next(self._source)
        except StopIteration:
            self._finish()
            raise
        self._process_chunk(chunk)
        return chunk

    def read(self, size):
        chunk = self._source.read(size)
        if chunk:
            self._process_chunk(chunk)
        else:
            self._finish()
        return chunk

    def _finish(self):
        if self._finished:
            return
        self._finished = True
        for i in self._inspectors:
            try:
                i.finish()
            except Exception as e:
                if i.NAME == self._expected_format:
                    raise
                self._errored_inspectors.add(i)
                LOG.debug("Format inspector for %s failed at the end (%s)", i.NAME, e)

    def close(self):
        if hasattr(self._source, "close"):
            self._source.close()
        self._finish()

    @property
    def formats(self):
        """Every format that matched (raw alone when none did); None while undecided."""
        live = [i for i in self._inspectors if i not in self._errored_inspectors]
        specific = [i for i in live if i.NAME != "raw"]
        if not self._finished and not all(i.complete for i in specific):
            return None
        matches = [i for i in specific if i.format_match]
        if not matches:
            raw = [i for i in self._inspectors if i.NAME == "raw"]
            if raw and not raw[0].format_match:
                # A known signature whose inspector failed: never taken for raw.
                raise ImageFormatError(
                    "Content carries the signature of %s but could not be inspected as it"
                    % ", ".join(_vimg.probe_head(bytes(raw[0]._head)))
                )
            return raw
        return matches

    @property
    def format(self):
        """The one format found; None while undecided.

        :raises ImageFormatError: if several formats matched, or none of the allowed
            ones did.
        """
        matches = self.formats
        if matches is None:
            return None
        if len(matches) > 1:
            raise ImageFormatError(
                "Multiple formats detected: %s" % ",".join(sorted(str(i) for i in matches))
            )
        if not matches:
            raise ImageFormatError("Content does not match any allowed format")
        return matches[0]


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


def get_inspector(format_name):
    """The inspector class for ``format_name`` (raw, qcow2, ...), or None."""
    return ALL_FORMATS.get(format_name)


def detect_file_format(filename, tracing=False, params=None):
    """Inspect ``filename`` with every inspector at once and return the one that matched
    (raw when none did), reading no more of it than needed.

    :raises ImageFormatError: if several formats matched.
    """
    with open(filename, "rb") as f:
        wrapper = InspectWrapper(f, tracing=tracing, params=params)
        try:
            while wrapper.read(4096):
                if wrapper.format:
                    return wrapper.format
        finally:
            wrapper.close()
        return wrapper.format

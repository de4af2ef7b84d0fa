"""vimg.format_inspector: oslo.utils' format-inspector names and behaviour."""

import pytest

from vimg import format_inspector as fi


def test_public_names():
    assert set(fi.ALL_FORMATS) == {
        "raw", "qcow2", "vhd", "vhdx", "vmdk", "vdi", "qed", "iso", "gpt", "luks"
    }
    assert fi.get_inspector("qcow2") is fi.ALL_FORMATS["qcow2"]
    assert fi.get_inspector("nope") is None
    e = fi.SafetyCheckFailed({"a": fi.SafetyViolation("x"), "b": fi.SafetyViolation("y")})
    assert str(e) == "Safety checks failed: a,b"
    assert list(e.failures) == ["a", "b"]


@pytest.mark.parametrize(
    "qemu_fmt,name", [("qcow2", "qcow2"), ("vpc", "vhd"), ("vhdx", "vhdx"), ("vmdk", "vmdk"), ("vdi", "vdi"), ("raw", "raw")]
)
def test_detect_and_from_file(tmp_path, qemu_img, qemu_fmt, name):
    p = tmp_path / ("disk." + qemu_fmt)
    qemu_img("create", "-f", qemu_fmt, p, "16M")
    i = fi.detect_file_format(p)
    assert str(i) == name and i.format == name
    assert i.virtual_size >= 16 << 20  # vpc rounds to its geometry
    assert i.actual_size > 0
    i.safety_check()
    j = fi.get_inspector(name).from_file(p)
    assert j.virtual_size == i.virtual_size
    other = "qcow2" if name != "qcow2" else "vmdk"
    if name != "raw":
        with pytest.raises(fi.ImageFormatError):
            fi.get_inspector(other).from_file(p)


def test_backing_file_fails_safety_check(tmp_path, qemu_img):
    p = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", p, "1M")
    i = fi.detect_file_format(p)
    assert str(i) == "qcow2"
    with pytest.raises(fi.SafetyCheckFailed) as e:
        i.safety_check()
    assert list(e.value.failures) == ["backing_file"]
    assert isinstance(e.value.failures["backing_file"], fi.SafetyViolation)


@pytest.mark.parametrize("fmt", ["qed", "luks"])
def test_formats_vimg_does_not_read_are_never_raw(tmp_path, qemu_img, fmt):
    p = tmp_path / ("disk." + fmt)
    if fmt == "qed":
        qemu_img("create", "-f", "qed", "-u", "-b", "/etc/shadow", "-F", "raw", p, "1M")
    else:
        qemu_img("create", "-f", "luks", "--object", "secret,id=s,data=x",
                 "-o", "key-secret=s", p, "1M")
    i = fi.detect_file_format(p)
    assert str(i) == fmt
    with pytest.raises(fi.SafetyCheckFailed):
        i.safety_check()
    with pytest.raises(fi.ImageFormatError):
        fi.get_inspector("raw").from_file(p)


def test_garbage_qcow2_is_a_format_error(tmp_path):
    p = tmp_path / "bad.qcow2"
    p.write_bytes(b"QFI\xfb" + b"\xff" * 508)
    with pytest.raises(fi.ImageFormatError) as e:
        fi.detect_file_format(p)
    assert str(p) in str(e.value)

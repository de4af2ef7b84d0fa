"""vimg.check / compare / measure / map against the vimg binary's JSON (and exit codes),
and qemu-img's where the binary mirrors it."""

import json
import subprocess

import pytest

import vimg


def run_json(exe, *args, ok=(0,)):
    p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True)
    assert p.returncode in ok, p.stderr
    return json.loads(p.stdout), p.returncode


def test_check_matches_the_binary(vimg_bin, qcow2_image):
    want, code = run_json(vimg_bin, "check", "--output=json", qcow2_image)
    assert code == 0
    got = vimg.check(qcow2_image)
    assert got == want
    assert got["check-errors"] == 0 and "corruptions" not in got


def test_check_corrupt_image_is_a_report(vimg_bin, tmp_path, qemu_img):
    p = tmp_path / "bad.qcow2"
    qemu_img("create", "-f", "qcow2", p, "1M")
    data = bytearray(p.read_bytes())
    # L1 table offset (header byte 40) pointing past the end of the file.
    data[40:48] = (1 << 40).to_bytes(8, "big")
    p.write_bytes(data)
    p2 = subprocess.run([vimg_bin, "check", "--output=json", str(p)], capture_output=True, text=True)
    if p2.returncode == 2:
        assert vimg.check(p) == json.loads(p2.stdout)
    else:
        # The binary could not check it (exit 1): the binding raises.
        with pytest.raises(vimg.Error):
            vimg.check(p)


def test_check_unsupported_format_raises(raw_image):
    with pytest.raises(vimg.UnsupportedError):
        vimg.check(raw_image, "raw")


@pytest.mark.parametrize("strict", [False, True])
def test_compare_matches_the_binary(vimg_bin, tmp_path, raw_image, qcow2_image, strict):
    other = tmp_path / "other.raw"
    data = bytearray(raw_image.read_bytes())
    data[3 << 20 | 5] ^= 0xFF
    other.write_bytes(data)
    longer = tmp_path / "longer.raw"
    longer.write_bytes(raw_image.read_bytes() + bytes(1 << 20))
    flags = ["-s"] if strict else []
    for a, b in [(raw_image, qcow2_image), (raw_image, other), (raw_image, longer)]:
        p = subprocess.run([vimg_bin, "compare", *flags, str(a), str(b)], capture_output=True, text=True)
        got = vimg.compare(a, b, strict=strict)
        assert got["exit-code"] == p.returncode, (a, b, p.stdout)
        assert got["identical"] == (p.returncode == 0)
        if got["offset"] is not None:
            assert str(got["offset"]) in p.stdout
        assert got["size-warning"] == ("Image size mismatch!" in p.stdout and not strict)
    assert vimg.compare(raw_image, other)["offset"] == (3 << 20)  # the sector, as qemu-img


def test_measure_matches_the_binary(vimg_bin, raw_image):
    for args, kw in [
        (["-O", "qcow2", str(raw_image)], dict(filename=raw_image)),
        (["-O", "qcow2", "-o", "cluster_size=4k", str(raw_image)], dict(filename=raw_image, options={"cluster_size": "4k"})),
        (["-O", "vhdx", "--size", "1G"], dict(size=1 << 30)),
        (["-O", "raw", "--size", "1G"], dict(size=1 << 30)),
    ]:
        fmt = args[1]
        want, _ = run_json(vimg_bin, "measure", "--output=json", *args)
        assert vimg.measure(fmt, **kw) == want


def test_measure_needs_one_of_size_or_filename():
    with pytest.raises(vimg.InvalidArgumentError):
        vimg.measure("qcow2")


def test_map_matches_the_binary(vimg_bin, qcow2_image, tmp_path, qemu_img):
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", qcow2_image.name, "-F", "qcow2", top)
    # Data in the overlay over part of the base: depth 0 and depth 1 runs.
    subprocess.run(["qemu-io", "-c", "write -P 7 1M 64k", str(top)], check=True, capture_output=True)
    for img, kw, extra in [
        (qcow2_image, {}, []),
        (top, {}, []),
        (qcow2_image, dict(start=1 << 20, length=1 << 20), ["--start-offset=1M", "--max-length=1M"]),
    ]:
        want, _ = run_json(vimg_bin, "map", "--output=json", *extra, img)
        assert vimg.map(img, **kw) == want


def test_map_matches_qemu_img(qemu_img, qcow2_image):
    assert vimg.map(qcow2_image) == json.loads(qemu_img("map", "--output=json", qcow2_image))

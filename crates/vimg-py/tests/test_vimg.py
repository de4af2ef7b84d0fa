"""The vimg Python API against qemu-img and the vimg binary."""

import hashlib
import json
import os
import subprocess
import threading

import pytest

import vimg

from conftest import REPO


def listing(d):
    return sorted(os.listdir(d))


# --- info -------------------------------------------------------------------------------


def test_info_matches_the_binary_json(qcow2_image, vimg_bin):
    out = subprocess.run(
        [vimg_bin, "info", "--output=json", str(qcow2_image)],
        check=True, capture_output=True, text=True,
    ).stdout
    expected = json.loads(out)
    got = vimg.info(qcow2_image)
    assert got == expected
    assert list(got) == list(expected), "keys in the binary's order"
    assert got["format"] == "qcow2"
    assert got["virtual-size"] == 4 << 20
    # qemu-img 10's node tree: the image's own file, a protocol node.
    (child,) = got["children"]
    assert child["name"] == "file"
    assert child["info"]["filename"] == str(qcow2_image)
    assert child["info"]["format"] == "file"
    assert child["info"]["children"] == []


def test_info_children_of_a_multi_extent_vmdk_match_qemu_img(tmp_path, qemu_img):
    vmdk = tmp_path / "split.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat", vmdk, "5G")
    theirs = json.loads(qemu_img("info", "--output=json", vmdk))
    mine = vimg.info(vmdk)
    assert mine["children"] == theirs["children"]
    assert [c["name"] for c in mine["children"]] == ["extents.2", "extents.1", "extents.0", "file"]
    chain = vimg.info(vmdk, backing_chain=True)
    assert chain[0]["children"] == theirs["children"]


def test_info_of_a_compressed_image_matches_the_binary(tmp_path, qcow2_image, vimg_bin):
    import lzma

    xz = tmp_path / "disk.qcow2.xz"
    xz.write_bytes(lzma.compress(qcow2_image.read_bytes()))
    expected = json.loads(subprocess.run(
        [vimg_bin, "info", "--output=json", str(xz)],
        check=True, capture_output=True, text=True,
    ).stdout)
    got = vimg.info(xz)
    # The whole dict is the binary's, image-service block included: both come from the
    # library, and the block describes what to upload (the image inside, as a file of its
    # own), not the container.
    assert got == expected
    assert got["format"] == "qcow2" and "vimg-container" in got
    got_svc = got["image-service"]
    assert got_svc["container_format"] == "bare"
    assert got_svc["input_container_format"] == "compressed"
    assert got_svc["input_usable"] is False
    assert "cannot boot" in got_svc["note"]
    assert got_svc["convert_command"] == "vimg convert -O qcow2 --checksum sha512 INPUT OUTPUT.qcow2"
    assert "min_ram" not in got_svc
    assert got["children"][0]["info"]["filename"] == str(xz)


def test_info_backing_chain(tmp_path, qcow2_image, qemu_img):
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", qcow2_image.name, "-F", "qcow2", top)
    one = vimg.info(top)
    assert isinstance(one, dict)
    assert one["backing-filename"] == qcow2_image.name
    chain = vimg.info(top, backing_chain=True)
    assert [c["filename"] for c in chain] == [str(top), str(qcow2_image)]
    qemu = json.loads(qemu_img("info", "--output=json", "--backing-chain", top))
    for mine, theirs in zip(chain, qemu):
        for key in ("virtual-size", "format", "cluster-size", "backing-filename"):
            assert mine.get(key) == theirs.get(key), key


def test_info_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.img"
    with pytest.raises(vimg.IoError) as e:
        vimg.info(missing)
    assert str(missing) in str(e.value)
    assert e.value.kind == "io"
    assert e.value.path == str(missing)


def test_malformed_header_is_an_image_error_naming_the_structure(tmp_path, qcow2_image):
    bad = tmp_path / "bad.qcow2"
    data = bytearray(qcow2_image.read_bytes())
    data[20:24] = (31).to_bytes(4, "big")  # cluster_bits: 2 GiB clusters, out of range
    bad.write_bytes(bytes(data))
    with pytest.raises(vimg.Error) as e:
        vimg.info(bad)
    assert isinstance(e.value, (vimg.InvalidImageError, vimg.UnsupportedError))
    msg = str(e.value)
    assert str(bad) in msg and "cluster" in msg, msg
    # The same facts as attributes: the file, the structure and the field's offset.
    assert e.value.path == str(bad)
    assert (e.value.structure, e.value.offset) == ("qcow2 header", 0x14)
    # The qemu-img oracle refuses it too.
    r = subprocess.run(["qemu-img", "info", str(bad)], capture_output=True)
    assert r.returncode != 0


def test_corrupt_table_error_has_structure_and_offset(tmp_path, qcow2_image):
    bad = tmp_path / "l1.qcow2"
    data = bytearray(qcow2_image.read_bytes())
    data[40:48] = (1 << 40).to_bytes(8, "big")  # l1_table_offset: far past the end
    bad.write_bytes(bytes(data))
    with pytest.raises(vimg.Error) as e:
        vimg.info(bad)
    assert e.value.path == str(bad)
    assert e.value.structure is not None, str(e.value)
    assert e.value.structure in str(e.value)
    assert e.value.offset == 1 << 40, str(e.value)


def test_errors_without_a_structure_say_none(tmp_path):
    missing = tmp_path / "nope.qcow2"
    with pytest.raises(vimg.Error) as e:
        vimg.info(missing)
    assert (e.value.structure, e.value.offset) == (None, None)


# --- inspect ----------------------------------------------------------------------------


def test_inspect_self_contained(qcow2_image):
    i = vimg.inspect(qcow2_image)
    assert (i.format, i.virtual_size) == ("qcow2", 4 << 20)
    assert i.actual_size == os.stat(qcow2_image).st_blocks * 512
    assert i.references == []
    assert i.image_service["disk_format"] == "qcow2"
    assert i.image_service["safe"] is True
    i.safety_check()


def test_inspect_backing_reference_fails_the_safety_check(tmp_path, qemu_img):
    top = tmp_path / "top.qcow2"
    # A backing file outside the image's folder; inspect must not open it.
    qemu_img("create", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw", top, "1M")
    i = vimg.inspect(top)
    assert i.references == [
        {"field": "backing_file", "name": "/etc/passwd", "role": "backing"}
    ]
    assert i.image_service["safe"] is False
    with pytest.raises(vimg.SafetyCheckFailed) as e:
        i.safety_check()
    assert list(e.value.failures) == ["backing_file"]
    assert "/etc/passwd" in e.value.failures["backing_file"]
    assert isinstance(e.value, vimg.Error)


def test_inspect_forced_format(raw_image):
    assert vimg.inspect(raw_image, format="raw").format == "raw"
    with pytest.raises(vimg.Error) as e:
        vimg.inspect(raw_image, format="qcow2")
    assert str(raw_image) in str(e.value)
    with pytest.raises(vimg.InvalidArgumentError, match="Unknown file format 'nope'"):
        vimg.inspect(raw_image, format="nope")


# --- convert ----------------------------------------------------------------------------


def test_convert_qcow2_to_raw_with_progress_and_sha512(tmp_path, qcow2_image, raw_image, qemu_img):
    dst = tmp_path / "out.raw"
    calls = []
    threads = set()

    def progress(done, total):
        calls.append((done, total))
        threads.add(threading.get_ident())

    digest = vimg.convert(qcow2_image, dst, "raw", checksum="sha512", progress=progress)
    data = dst.read_bytes()
    assert data == raw_image.read_bytes()
    assert digest == hashlib.sha512(data).hexdigest()
    assert calls, "progress was called"
    dones = [d for d, _ in calls]
    assert dones == sorted(dones)
    assert calls[-1][0] == calls[-1][1] > 0
    ref = tmp_path / "qemu.raw"
    qemu_img("convert", "-O", "raw", qcow2_image, ref)
    assert ref.read_bytes() == data


def test_convert_to_qcow2_with_options_reads_back_in_qemu(tmp_path, raw_image, qemu_img):
    for opts in ({"cluster_size": 65536 * 2, "lazy_refcounts": True}, "cluster_size=128k,lazy_refcounts=on"):
        dst = tmp_path / "out.qcow2"
        assert vimg.convert(raw_image, dst, "qcow2", options=opts) is None
        info = json.loads(qemu_img("info", "--output=json", dst))
        assert info["cluster-size"] == 131072
        assert info["format-specific"]["data"]["lazy-refcounts"] is True
        qemu_img("check", dst)
        assert "identical" in qemu_img("compare", "-f", "raw", "-F", "qcow2", raw_image, dst)
        dst.unlink()


def test_convert_compressed(tmp_path, raw_image, qemu_img):
    dst = tmp_path / "c.qcow2"
    digest = vimg.convert(raw_image, dst, "qcow2", compress=True, checksum="sha256")
    assert digest == hashlib.sha256(dst.read_bytes()).hexdigest()
    qemu_img("check", dst)
    assert "identical" in qemu_img("compare", "-f", "raw", "-F", "qcow2", raw_image, dst)


class Stop(Exception):
    pass


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk"])
def test_exception_in_progress_cancels_and_leaves_nothing(tmp_path, raw_image, fmt):
    out = tmp_path / "out"
    out.mkdir()
    dst = out / f"disk.{fmt}"
    seen = []

    def progress(done, total):
        seen.append(done)
        raise Stop("user cancelled")

    with pytest.raises(Stop, match="user cancelled"):
        vimg.convert(raw_image, dst, fmt, progress=progress, checksum="sha512")
    assert len(seen) == 1, "no call after the exception"
    assert listing(out) == [], "nothing left behind"


def test_exception_in_progress_keeps_an_existing_destination(tmp_path, raw_image):
    dst = tmp_path / "keep.raw"
    dst.write_bytes(b"old content")

    def progress(done, total):
        raise KeyError("stop")

    with pytest.raises(KeyError):
        vimg.convert(raw_image, dst, "raw", progress=progress)
    assert dst.read_bytes() == b"old content"
    assert listing(tmp_path) == sorted(["disk.raw", "keep.raw"])


def test_convert_refuses_before_writing(tmp_path, raw_image):
    dst = tmp_path / "x.img"
    with pytest.raises(vimg.InvalidArgumentError, match="Unknown file format 'qcow3'"):
        vimg.convert(raw_image, dst, "qcow3")
    with pytest.raises(vimg.InvalidArgumentError, match="checksum"):
        vimg.convert(raw_image, dst, "raw", checksum="crc7")
    with pytest.raises(vimg.Error):
        vimg.convert(raw_image, dst, "qcow2", options={"cluster_size": 12345})
    with pytest.raises(TypeError):
        vimg.convert(raw_image, dst, "raw", progress=42)
    with pytest.raises(vimg.IoError, match="Could not open"):
        vimg.convert(tmp_path / "missing", dst, "raw")
    assert not dst.exists()


def test_convert_external_backing_needs_allow_external(tmp_path, qcow2_image, raw_image, qemu_img):
    top_dir = tmp_path / "elsewhere"
    top_dir.mkdir()
    top = top_dir / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", qcow2_image, "-F", "qcow2", top)
    dst = tmp_path / "flat.raw"
    with pytest.raises(vimg.UnsafeReferenceError) as e:
        vimg.convert(top, dst, "raw")
    assert e.value.kind == "unsafe-reference"
    assert not dst.exists()
    vimg.convert(top, dst, "raw", allow_external=True)
    assert dst.read_bytes() == raw_image.read_bytes()


def test_concurrent_converts_release_the_gil(tmp_path, raw_image, qemu_img):
    # Two conversions in threads, each calling back into Python: no deadlock, both right.
    results = {}

    def run(name):
        results[name] = vimg.convert(
            raw_image, tmp_path / name, "qcow2", checksum="sha256", progress=lambda d, t: None
        )

    ts = [threading.Thread(target=run, args=(n,)) for n in ("a.qcow2", "b.qcow2")]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts)
    for name in ("a.qcow2", "b.qcow2"):
        out = tmp_path / name
        assert results[name] == hashlib.sha256(out.read_bytes()).hexdigest()
        assert "identical" in qemu_img("compare", "-f", "raw", "-F", "qcow2", raw_image, out)
    # Same input, same options, same bytes: two conversions running at once in one process
    # lay out their clusters alike (the library decides allocation order before the work is
    # spread over threads).
    assert (tmp_path / "a.qcow2").read_bytes() == (tmp_path / "b.qcow2").read_bytes()


def test_ctrl_c_in_progress_cancels_and_leaves_nothing(tmp_path, raw_image):
    import signal

    out = tmp_path / "out"
    out.mkdir()

    def progress(done, total):
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        vimg.convert(raw_image, out / "x.qcow2", "qcow2", progress=progress)
    assert listing(out) == []


def test_main_thread_runs_while_converting(tmp_path):
    # The GIL is released during the copy: Python code in another thread keeps running.
    src = tmp_path / "big.raw"
    with open(src, "wb") as f:
        for i in range(64):
            f.write(bytes([i + 1]) * (1 << 20))
    ticks = []
    done = threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(1)
            done.wait(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        vimg.convert(src, tmp_path / "big.qcow2", "qcow2", compress=True)
    finally:
        done.set()
        t.join()
    assert len(ticks) > 5, len(ticks)


# The command docs/pipelines.md gives to turn the image-service block into
# `openstack image create` arguments (kept identical to the docs).
GLANCE_ARGS_JQ = (
    '."image-service" | if .safe and .container_format == "bare" and .input_usable != false '
    'then "--disk-format \\(.disk_format) --container-format \\(.container_format) --min-disk \\(.min_disk)" '
    'else error("not uploadable") end'
)


def _jq():
    import shutil

    exe = shutil.which("jq")
    if exe is None:
        msg = "SKIPPED: jq not on PATH"
        if os.environ.get("CI"):
            pytest.fail(msg + " (required under CI)")
        pytest.skip(msg)
    return exe


def test_docs_pipeline_qcow2_xz_to_glance_arguments(tmp_path, qcow2_image, vimg_bin):
    """A .qcow2.xz: its own block is refused by the docs' command; converted (Python, one
    call with the checksum), the output's block gives arguments Glance accepts for a
    bootable image, and os_hash_* is the sha512 of the file written."""
    import hashlib
    import lzma

    jq = _jq()
    docs = (REPO / "docs" / "pipelines.md").read_text()
    norm = lambda t: " ".join(t.split())  # noqa: E731
    assert norm(GLANCE_ARGS_JQ) in norm(docs)
    xz = tmp_path / "disk.qcow2.xz"
    xz.write_bytes(lzma.compress(qcow2_image.read_bytes()))

    def args_of(block_json):
        p = subprocess.run([jq, "-er", GLANCE_ARGS_JQ], input=block_json, capture_output=True, text=True)
        return p.returncode, p.stdout.strip()

    # The container itself is not uploadable, as the binary describes it and as Python does.
    binary = subprocess.run([vimg_bin, "info", "--output=json", str(xz)], check=True,
                            capture_output=True, text=True).stdout
    assert args_of(binary)[0] != 0
    assert args_of(json.dumps({"image-service": vimg.info(xz)["image-service"]}))[0] != 0

    out = tmp_path / "disk.qcow2"
    r = vimg.convert(xz, out, "qcow2", checksum="sha512", image_service=True)
    svc = r["image-service"]
    assert r["checksum"] == hashlib.sha512(out.read_bytes()).hexdigest()
    assert (svc["os_hash_algo"], svc["os_hash_value"]) == ("sha512", r["checksum"])
    code, args = args_of(json.dumps({"image-service": svc}))
    assert code == 0
    assert args == "--disk-format qcow2 --container-format bare --min-disk 1"
    # The binary's block for the converted file gives the same arguments.
    binary = subprocess.run([vimg_bin, "info", "--output=json", str(out)], check=True,
                            capture_output=True, text=True).stdout
    assert args_of(binary) == (0, args)


OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:href="disk.vmdk" ovf:id="file1"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="8" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
</Envelope>
"""


def test_ova_image_service_block_describes_the_disk_to_upload(tmp_path, raw_image, qemu_img, vimg_bin):
    import tarfile

    vmdk = tmp_path / "disk.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw_image, vmdk)
    ovf = tmp_path / "vm.ovf"
    ovf.write_text(OVF)
    ova = tmp_path / "vm.ova"
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as t:
        t.add(ovf, "vm.ovf")
        t.add(vmdk, "disk.vmdk")
    binary = json.loads(subprocess.run([vimg_bin, "info", "--output=json", str(ova)],
                                       check=True, capture_output=True, text=True).stdout)
    # The binary and the package give the one block the library computes.
    assert vimg.info(ova)["image-service"] == binary["image-service"]
    assert binary["image-service"]["input_container_format"] == "ova"
    for svc in (vimg.info(ova)["image-service"], vimg.inspect(ova).image_service):
        assert svc["disk_format"] == "vmdk" and svc["container_format"] == "bare"
        assert svc["input_container_format"] == "ova" and svc["input_usable"] is False
        assert "OVA" in svc["note"]
        assert svc["convert_command"].startswith("vimg convert -O vmdk")
        assert svc["min_disk"] == binary["image-service"]["min_disk"]
    out = tmp_path / "disk.qcow2"
    r = vimg.convert(ova, out, "qcow2", checksum="sha256", image_service=True)
    svc = r["image-service"]
    assert (svc["disk_format"], svc["container_format"]) == ("qcow2", "bare")
    assert "input_container_format" not in svc
    assert svc["os_hash_value"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert vimg.compare(raw_image, out)["identical"]

#!/usr/bin/env bash
# Regenerates the small committed fixtures in testdata/ with qemu-img (10.x).
# Content is deterministic; the container bytes depend on the qemu-img version.
# Big images are never committed: tests generate them in temporary folders.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A 64 MiB disk: 1 MiB of text-like data at 0, a 0xab-filled MiB at 16 MiB, a partial
# sector run at 40 MiB + 1234, and text again in the last MiB. The rest is unallocated.
python3 - "$tmp/small.raw" <<'PY'
import sys
size = 64 << 20
words = b"vimg converts disk images: raw qcow2 vmdk vhd vhdx vdi. "
text = (words * ((1 << 20) // len(words) + 1))[: 1 << 20]
with open(sys.argv[1], "wb") as f:
    f.truncate(size)
    f.seek(0); f.write(text)
    f.seek(16 << 20); f.write(b"\xab" * (1 << 20))
    f.seek((40 << 20) + 1234); f.write(bytes(range(256)) * 7)
    f.seek(size - (1 << 20)); f.write(text)
PY
sha256sum "$tmp/small.raw" | cut -d' ' -f1 > small.raw.sha256

# qcow2 v3, compressed clusters (zlib).
qemu-img convert -q -f raw -O qcow2 -c "$tmp/small.raw" small.qcow2

# VHD (vpc) and VDI of the same disk: dynamic and fixed VHD (force_size=on keeps the 64 MiB
# exactly, so the raw content still has small.raw.sha256), dynamic and static VDI. Stored
# xz-compressed: the fixed and static images are 64 MiB uncompressed.
qemu-img convert -q -f raw -O vpc -o force_size=on "$tmp/small.raw" "$tmp/small.vhd"
qemu-img convert -q -f raw -O vpc -o subformat=fixed,force_size=on "$tmp/small.raw" "$tmp/small-fixed.vhd"
qemu-img convert -q -f raw -O vdi "$tmp/small.raw" "$tmp/small.vdi"
qemu-img convert -q -f raw -O vdi -o static=on "$tmp/small.raw" "$tmp/small-static.vdi"
for f in small.vhd small-fixed.vhd small.vdi small-static.vdi; do
  xz -9 -c "$tmp/$f" > "$f.xz"
done

# vmdk streamOptimized, as qemu-img writes it (tables ahead of the grains) and as vimg
# writes it (VMware's stream layout: tables after the grains, footer, end-of-stream marker).
qemu-img convert -q -f raw -O vmdk -o subformat=streamOptimized "$tmp/small.raw" small-stream.vmdk
vimg=${VIMG:-../target/debug/vimg}
"$vimg" convert -f raw -O vmdk -o subformat=streamOptimized "$tmp/small.raw" small-vimg-stream.vmdk

# vhdx as qemu-img writes it (1 MiB blocks), xz-compressed: most of the file is holes
# and repeated bytes. Tests decompress it with `xz -dc`.
qemu-img convert -q -f raw -O vhdx -o block_size=1M "$tmp/small.raw" "$tmp/small.vhdx"
xz -9 -c "$tmp/small.vhdx" > small.vhdx.xz

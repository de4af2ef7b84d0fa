#!/usr/bin/env bash
# Makes the seed corpus for the qcow2 fuzz target (fuzz/corpus/qcow2, not committed) from
# small qemu-img images: every cluster mapping kind, v2 and v3, compression, extended L2,
# refcount widths, snapshots, bitmaps, a backing file name, an external data file name.
set -euo pipefail
cd "$(dirname "$0")"
out=corpus/qcow2
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
python3 - <<'PY'
import random
r = random.Random(1)
with open("src.raw", "wb") as f:
    f.truncate(256 << 10)
    f.seek(0); f.write(r.randbytes(3000))
    f.seek(20000); f.write(b"qcow2 seed text " * 200)
    f.seek(200000); f.write(bytes(range(256)) * 8)
PY
n=0
seed() { n=$((n + 1)); qemu-img convert -q -O qcow2 "$@" src.raw "s$n.qcow2"; }
seed -o cluster_size=512
seed -o cluster_size=512,compat=0.10
seed -o cluster_size=512,refcount_bits=1
seed -o cluster_size=512,refcount_bits=64
seed -c -o cluster_size=512
seed -c -o cluster_size=1k,compression_type=zstd
seed -o cluster_size=16k,extended_l2=on
seed -o cluster_size=4k,preallocation=metadata
qemu-img create -q -f qcow2 -o cluster_size=512,extended_l2=off sub.qcow2 256k
qemu-io -f qcow2 -c "write -P 7 0 1k" -c "write -z 4k 1k" -c "write -P 9 100k 2k" sub.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=16k,extended_l2=on -b s1.qcow2 -F qcow2 ext.qcow2 256k
qemu-io -f qcow2 -c "write -P 7 0 1k" -c "write -z 8k 1k" -c "write -z -u 64k 16k" ext.qcow2 >/dev/null
cp s1.qcow2 snap.qcow2
qemu-img snapshot -c one snap.qcow2
qemu-io -f qcow2 -c "write -P 5 0 4k" snap.qcow2 >/dev/null
qemu-img bitmap --add snap.qcow2 bm
qemu-img create -q -f qcow2 -o cluster_size=512,data_file=d.bin df.qcow2 256k
cp ./*.qcow2 "$OLDPWD/$out/"
echo "seeds in fuzz/$out: $(ls "$OLDPWD/$out" | wc -l)"

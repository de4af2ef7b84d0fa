#!/usr/bin/env bash
# Builds the seed corpora of every fuzz target in fuzz/corpus/TARGET (not committed) from
# small qemu-img images (every format and subformat, a few KiB each, with data, zeros and
# holes), the small committed fixtures in testdata/, and hand-made container inputs.
# Seeds are kept small: libFuzzer's default maximum input length follows the largest seed,
# and a big seed makes every run slow.
#
#   fuzz/seeds.sh            # all targets
#   fuzz/seeds.sh qcow2 vdi  # only these
set -euo pipefail
cd "$(dirname "$0")"
fuzz=$PWD
testdata=$fuzz/../testdata
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"

targets=("$@")
wanted() {
  [ ${#targets[@]} -eq 0 ] && return 0
  local t
  for t in "${targets[@]}"; do [ "$t" = "$1" ] && return 0; done
  return 1
}
put() { # put TARGET FILE...
  local t=$1; shift
  wanted "$t" || return 0
  mkdir -p "$fuzz/corpus/$t"
  local f
  for f in "$@"; do cp "$f" "$fuzz/corpus/$t/$(basename "$f")"; done
}

# A 256 KiB disk: random bytes, text, a byte ramp; the rest unallocated.
python3 - <<'PY'
import random
r = random.Random(1)
with open("src.raw", "wb") as f:
    f.truncate(256 << 10)
    f.seek(0); f.write(r.randbytes(3000))
    f.seek(20000); f.write(b"vimg seed text " * 200)
    f.seek(200000); f.write(bytes(range(256)) * 8)
PY

# ---- qcow2: every cluster mapping kind, v2 and v3, compression, extended L2, refcount
# widths, snapshots, bitmaps, a backing file name, an external data file name.
mkdir q && cd q
n=0
seed() { n=$((n + 1)); qemu-img convert -q -O qcow2 "$@" ../src.raw "s$n.qcow2"; }
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
put qcow2 ./*.qcow2 "$testdata/small.qcow2"
put probe s1.qcow2 s5.qcow2 ext.qcow2
# qcow2_update: each image behind an 8-byte program of in-place operations (low nibble: the
# operation, high nibble: its parameter; see fuzz_targets/qcow2_update.rs), a few programs
# per image; also an image over the raw file `b` the target puts next to it, and vimg's own.
if wanted qcow2_update; then
  qemu-img create -q -f qcow2 -u -o cluster_size=512 -b b -F raw overb.qcow2 256k
  truncate -s 256k b && qemu-io -f qcow2 -c "write -P 8 0 2k" overb.qcow2 >/dev/null && rm b
  qemu-img create -q -f qcow2 -o cluster_size=4k,lazy_refcounts=on lazy.qcow2 256k
  qemu-io -f qcow2 -c "write -P 1 0 8k" -c "write -c -P 2 64k 4k" lazy.qcow2 >/dev/null
  vimg=$(command -v vimg || echo "$fuzz/../target/debug/vimg")
  if [ -x "$vimg" ]; then "$vimg" convert -O qcow2 -o cluster_size=1k ../src.raw vimg.qcow2; fi
  mkdir -p "$fuzz/corpus/qcow2_update"
  progs=("\x00\x01\x02\x03\x04\x05\x06\x0f" # repair, resize, snapshots, reopen
         "\x07\x08\x09\x0a\x0b\x0c\x0d\x0f" # bitmaps, writes, backing, amend
         "\x14\x15\x39\x12\x33\x16\x3e\x01" # snapshot s0, write, grow, shrink
         "\x35\x19\x0f\x36\x28\x47\x0f\x00")  # apply bm/one, bitmap ops
  i=0
  for f in ./*.qcow2 "$testdata/small.qcow2"; do
    [ -f "$f" ] || continue
    for prog in "${progs[@]}"; do
      i=$((i + 1))
      { printf "$prog"; cat "$f"; } > "$fuzz/corpus/qcow2_update/u$i-$(basename "$f")"
    done
  done
fi
# qcow2_chain: tops over the raw file `b` the target writes next to them (256 KiB), the
# first byte the operation (0 commit, 1 commit -d, 2 rebase onto nothing, 3 rebase onto c).
if wanted qcow2_chain; then
  truncate -s 256k b
  mkdir -p "$fuzz/corpus/qcow2_chain"
  i=0
  for o in "cluster_size=512" "cluster_size=64k" "cluster_size=16k,extended_l2=on" "cluster_size=4k,compat=0.10"; do
    i=$((i + 1))
    qemu-img create -q -f qcow2 -o "$o" -b b -F raw "top$i.qcow2" 256k
    qemu-io -f qcow2 -c "write -P 3 0 3k" -c "write -z 64k 8k" -c "write -P 4 200k 5k" "top$i.qcow2" >/dev/null
  done
  qemu-img create -q -f qcow2 -o cluster_size=1k -b b -F raw topc.qcow2 256k
  qemu-io -f qcow2 -c "write -c -P 6 0 4k" topc.qcow2 >/dev/null
  for f in top*.qcow2; do
    for op in 0 1 2 3; do
      { printf "\x0$op"; cat "$f"; } > "$fuzz/corpus/qcow2_chain/c$op-$f"
    done
  done
  rm b
fi
cd ..

# ---- vmdk: every subformat qemu-img writes; the descriptors alone for the descriptor
# parser; the extent files alone for the extent target (first byte: 0 sparse, 1 COWD,
# 2 seSparse, 3 flat).
mkdir v && cd v
for sub in monolithicSparse monolithicFlat twoGbMaxExtentSparse twoGbMaxExtentFlat streamOptimized; do
  qemu-img convert -q -O vmdk -o subformat=$sub ../src.raw "$sub.vmdk"
done
qemu-img convert -q -O vmdk -o subformat=monolithicSparse,zeroed_grain=on ../src.raw zeroed.vmdk
qemu-img create -q -f vmdk -o adapter_type=lsilogic,hwversion=6 hw.vmdk 256k
qemu-img create -q -f vmdk -b monolithicSparse.vmdk -F vmdk delta.vmdk 256k
qemu-io -f vmdk -c "write -P 3 4k 8k" delta.vmdk >/dev/null
put vmdk monolithicSparse.vmdk streamOptimized.vmdk zeroed.vmdk hw.vmdk delta.vmdk \
  monolithicFlat.vmdk twoGbMaxExtentSparse.vmdk "$testdata/small-vimg-stream.vmdk"
put probe monolithicSparse.vmdk streamOptimized.vmdk
# Descriptors: the text files, and the embedded descriptor of a sparse file (sector 1..).
cp monolithicFlat.vmdk desc-flat.txt
cp twoGbMaxExtentSparse.vmdk desc-split.txt
cp delta.vmdk delta.bin && dd if=delta.bin of=desc-delta.txt bs=512 skip=1 count=20 status=none
dd if=monolithicSparse.vmdk of=desc-sparse.txt bs=512 skip=1 count=20 status=none
put vmdk_descriptor desc-*.txt
# Extent files, with the selector byte the target reads first.
{ printf '\x00'; cat monolithicSparse.vmdk; } > ext-sparse.bin
{ printf '\x00'; cat twoGbMaxExtentSparse-s001.vmdk; } > ext-split.bin
{ printf '\x03'; head -c 4096 monolithicFlat-flat.vmdk; } > ext-flat.bin
put vmdk_extent ext-*.bin
cd ..

# ---- vhd (vpc): dynamic, fixed, the creator-size variants; small VHDs use qemu's CHS size.
mkdir h && cd h
qemu-img convert -q -O vpc ../src.raw dyn.vhd
qemu-img convert -q -O vpc -o force_size=on ../src.raw dynf.vhd
qemu-img convert -q -O vpc -o subformat=fixed,force_size=on ../src.raw fixed.vhd
put vhd dyn.vhd dynf.vhd fixed.vhd
put probe dyn.vhd fixed.vhd
cd ..

# ---- vhdx: dynamic with small blocks (a VHDX is at least 8 MiB: 1 MiB-aligned regions and a
# 1 MiB log; the committed 64 MiB fixture would be bigger still).
mkdir x && cd x
qemu-img convert -q -O vhdx -o block_size=1M,log_size=1M ../src.raw dyn.vhdx
qemu-img convert -q -O vhdx -o block_size=1M,log_size=1M,block_state_zero=off ../src.raw bsz.vhdx
put vhdx dyn.vhdx bsz.vhdx
# The probe target needs only the signatures and the header area.
head -c $((320 << 10)) dyn.vhdx > head.vhdx
put probe head.vhdx
cd ..

# ---- vdi: dynamic and static.
mkdir d && cd d
qemu-img convert -q -O vdi ../src.raw dyn.vdi
qemu-img convert -q -O vdi -o static=on ../src.raw static.vdi
put vdi dyn.vdi static.vdi
put probe dyn.vdi
cd ..

# ---- parallels: 64 KiB and odd (1000 -> 1024 byte) clusters.
mkdir pl && cd pl
qemu-img convert -q -O parallels -o cluster_size=64k ../src.raw c64k.hds
qemu-img convert -q -O parallels -o cluster_size=1000 ../src.raw c1k.hds
put parallels c64k.hds c1k.hds
put probe c64k.hds
cd ..

# ---- qed: small clusters and tables.
mkdir qe && cd qe
qemu-img convert -q -O qed -o cluster_size=4k,table_size=2 ../src.raw small.qed
put qed small.qed
put probe small.qed
qemu-img convert -q -O qcow ../src.raw plain.qcow
# qemu-img 10 exits 1 after writing a complete compressed qcow (see tests/qcow.rs).
qemu-img convert -q -c -O qcow ../src.raw packed.qcow || true
put qcow plain.qcow packed.qcow
cd ..

# ---- bochs, cloop, dmg: qemu-img cannot create them; the shared corpus has QEMU's sample
# images (used here as local seeds, never committed). Without the corpus these targets
# start from an empty corpus.
corpus=$fuzz/../../shared/corpus/qemu-iotests
if [ -d "$corpus" ]; then
  mkdir sm && cd sm
  bzip2 -dc "$corpus/empty.bochs.bz2" > empty.bochs
  bzip2 -dc "$corpus/simple-pattern.cloop.bz2" > pattern.cloop
  bzip2 -dc "$corpus/simple-dmg.dmg.bz2" > simple.dmg
  bzip2 -dc "$corpus/parallels-with-bitmap.bz2" > bitmap.hds
  put bochs empty.bochs
  put cloop pattern.cloop
  put dmg simple.dmg
  put parallels bitmap.hds
  put probe empty.bochs pattern.cloop simple.dmg
  cd ..
else
  echo "seeds.sh: no shared corpus at $corpus; bochs, cloop and dmg start empty" >&2
fi

# ---- the in-place targets: each image behind programs of in-place operations (8 bytes,
# low nibble the operation, high nibble its parameter; see fuzz_targets/inplace_common.rs).
inplace_progs=("\x00\x11\x02\x03\x14\x0f\x06\x07"  # writes, zeros, across a unit, grow, reopen, repair
               "\x09\x0a\x0c\x08\x18\x0b\x05\x0f"  # convert -n, commit, several, rebase -u, safe rebase, shrink
               "\x21\x1a\x39\x4c\x30\x12\x0f\x07"  # commit growing the base, convert -n, writes
               "\x3c\x2a\x01\x0e\x19\x22\x13\x06")
inplace_seeds() { # inplace_seeds TARGET PREFIX FILE...
  local t=$1 pre=$2; shift 2
  wanted "$t" || return 0
  mkdir -p "$fuzz/corpus/$t"
  local f prog i=0
  for f in "$@"; do
    for prog in "${inplace_progs[@]}"; do
      i=$((i + 1))
      { printf "$pre$prog"; cat "$f"; } > "$fuzz/corpus/$t/$(basename "$f")-$i"
    done
  done
}
if wanted qed_update || wanted bat_update || wanted repair; then
  mkdir ip && cd ip
  truncate -s 256k b
  head -c $((192 << 10)) ../src.raw > src192.raw
  qemu-img convert -q -O qed -o cluster_size=4k,table_size=2 src192.raw small.qed
  qemu-img create -q -f qed -o cluster_size=4k,table_size=2 -b b -F raw overb.qed 256k
  qemu-io -f qed -c "write -P 3 0 3k" -c "write -z 64k 8k" -c "write -P 4 200k 5k" overb.qed >/dev/null
  qemu-img create -q -f qed -o cluster_size=4k,table_size=2 empty.qed 128k
  inplace_seeds qed_update "" small.qed overb.qed empty.qed
  qemu-img convert -q -O vdi src192.raw dyn.vdi
  qemu-img create -q -f vdi e.vdi 1M
  qemu-img convert -q -O vpc -o force_size=on src192.raw dyn.vhd
  qemu-img create -q -f vpc -o subformat=fixed,force_size=on fixed.vhd 64k
  qemu-img convert -q -O parallels -o cluster_size=4k src192.raw c4k.hds
  qemu-img create -q -f parallels -o cluster_size=1000 e1k.hds 64k
  head -c $((64 << 10)) ../src.raw > r.raw
  inplace_seeds bat_update "\x00" dyn.vdi e.vdi
  inplace_seeds bat_update "\x01" dyn.vhd fixed.vhd
  inplace_seeds bat_update "\x02" c4k.hds e1k.hds
  inplace_seeds bat_update "\x03" r.raw
  qemu-img convert -q -O qcow src192.raw plain.qcow
  qemu-img convert -q -c -O qcow src192.raw comp.qcow 2>/dev/null || true
  qemu-img create -q -f qcow -b b -F raw overb.qcow 256k
  qemu-io -f qcow -c "write -P 5 0 3k" -c "write -P 6 100k 2k" overb.qcow >/dev/null
  inplace_seeds bat_update "\x04" plain.qcow comp.qcow overb.qcow
  # repair: leaks (a cluster appended), the in-use flag, as leaks and all.
  if wanted repair; then
    mkdir -p "$fuzz/corpus/repair"
    cp c4k.hds leak.hds && head -c 4096 ../src.raw >> leak.hds
    cp c4k.hds inuse.hds && printf '\x59\x6e\x6f\x74' | dd of=inuse.hds bs=1 seek=44 conv=notrunc status=none
    cp small.qed leak.qed && head -c 4096 ../src.raw >> leak.qed
    qemu-img convert -q -O qcow2 -o cluster_size=512 src192.raw q.qcow2
    cp q.qcow2 leak.qcow2 && head -c 1024 ../src.raw >> leak.qcow2
    qemu-img create -q -f qcow2 -o cluster_size=512 -b b -F raw overb.qcow2 256k
    qemu-io -f qcow2 -c "write -P 8 0 2k" overb.qcow2 >/dev/null
    # vhdx (8-9 MiB files: run with -max_len=10485760): empty, and a block written.
    qemu-img create -q -f vhdx -o block_size=1M e.vhdx 1M
    cp e.vhdx w.vhdx && qemu-io -f vhdx -c "write -P 3 0 4k" w.vhdx >/dev/null
    i=0
    for sel in 0 4; do
      for f in small.qed leak.qed overb.qed; do i=$((i + 1)); { printf "\x0$sel"; cat $f; } > "$fuzz/corpus/repair/r$i-$f"; done
      for f in c4k.hds leak.hds inuse.hds e1k.hds; do i=$((i + 1)); { printf "\x0$((sel + 1))"; cat $f; } > "$fuzz/corpus/repair/r$i-$f"; done
      for f in q.qcow2 leak.qcow2 overb.qcow2; do i=$((i + 1)); { printf "\x0$((sel + 2))"; cat $f; } > "$fuzz/corpus/repair/r$i-$f"; done
      for f in e.vhdx w.vhdx; do i=$((i + 1)); { printf "\x0$((sel + 3))"; cat $f; } > "$fuzz/corpus/repair/r$i-$f"; done
    done
  fi
  cd ..
fi

# ---- probe: also a raw file and an empty one.
head -c 4096 src.raw > raw.img
: > empty.img
put probe raw.img empty.img

# ---- pipeline: compressed images and a small OVA.
mkdir p && cd p
cp ../q/s1.qcow2 disk.qcow2
xz -1 -c disk.qcow2 > disk.qcow2.xz
gzip -1 -c disk.qcow2 > disk.qcow2.gz
zstd -q -1 -c disk.qcow2 > disk.qcow2.zst
head -c 65536 ../src.raw > disk.img
xz -1 --block-size=16KiB -c disk.img > blocks.img.xz
cat > vm.ovf <<'OVF'
<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References><File ovf:href="disk.img" ovf:id="file1"/></References>
  <DiskSection><Info>x</Info>
    <Disk ovf:capacity="64" ovf:capacityAllocationUnits="byte * 2^10" ovf:diskId="d1" ovf:fileRef="file1"/>
  </DiskSection>
</Envelope>
OVF
tar --format=ustar -cf vm.ova vm.ovf disk.img
put pipeline disk.qcow2.xz disk.qcow2.gz disk.qcow2.zst blocks.img.xz vm.ova
cd ..

# ---- luks: small volumes in three cipher set-ups, with few PBKDF2 iterations (iter-time=1)
# so an unlock stays cheap for the target.
mkdir l && cd l
for c in "aes-256 xts plain64 sha256" "aes-128 cbc essiv sha1" "aes-256 ecb plain sha256"; do
  set -- $c
  qemu-img create -q -f luks --object secret,id=s,data=pw \
    -o key-secret=s,cipher-alg=$1,cipher-mode=$2,ivgen-alg=$3,hash-alg=$4,iter-time=1 \
    "seed-$1-$2.luks" 64k
done
put luks seed-*.luks
cd ..

# ---- roundtrip: the input is a recipe (format, size and extents), not an image; a few
# byte strings of different lengths are enough to start from.
mkdir r && cd r
for i in 1 2 3 4 5 6; do head -c $((i * 37)) ../src.raw > "r$i.bin"; done
put roundtrip r*.bin
cd ..

for t in "$fuzz"/corpus/*; do
  wanted "$(basename "$t")" && echo "fuzz/corpus/$(basename "$t"): $(ls "$t" | wc -l) seeds"
done

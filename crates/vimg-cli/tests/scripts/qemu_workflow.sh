#!/usr/bin/env bash
# A pipeline script written for qemu-img: it creates, fills, converts, inspects, checks,
# compares, measures and maps images of every format. The test runs it once with
# IMG=qemu-img and once with IMG=vimg and compares what it prints.
set -euo pipefail
IMG=${IMG:-qemu-img}
cd "$1"
json() { python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"; }

qemu-img create -q -f raw src.raw 64M
qemu-io -f raw -c 'write -P 1 0 2M' -c 'write -P 2 30M 1M' -c 'write -P 3 63M 4k' src.raw >/dev/null

for fmt in qcow2 vmdk vpc vhdx vdi raw; do
  echo "== $fmt"
  $IMG convert -f raw -O $fmt src.raw disk.$fmt
  $IMG info --output=json disk.$fmt | json 'v["format"], v["virtual-size"] >= 64<<20'
  $IMG info disk.$fmt | grep -E '^(file format|virtual size):'
  $IMG compare -f $fmt -F raw disk.$fmt src.raw
  rc=0; $IMG compare -q disk.$fmt src.raw || rc=$?; echo "compare rc=$rc"
  # qemu counts a vpc/vdi block (or a whole vhdx) as data when any of it is; vimg counts the
  # data in it, so its `required` is smaller there (and still covers what either tool writes).
  case $fmt in
    qcow2|vmdk|raw) $IMG measure --output=json -O qcow2 -f $fmt disk.$fmt | json 'v["required"], v["fully-allocated"]';;
    *) $IMG measure --output=json -O qcow2 -f $fmt disk.$fmt | json 'v["fully-allocated"]';;
  esac
  $IMG measure -O raw -f $fmt disk.$fmt
  case $fmt in
    qcow2|vmdk|vdi) $IMG check -q disk.$fmt; echo "check rc=$?";;
  esac
  case $fmt in
    qcow2|raw) $IMG map --output=json -f $fmt disk.$fmt | json 'sum(e["length"] for e in v if e["data"])';;
  esac
  $IMG convert -O raw disk.$fmt back.raw
  cmp back.raw src.raw && echo "round trip ok"
  rm -f back.raw
done

echo "== overlay"
$IMG create -q -f qcow2 -b disk.qcow2 -F qcow2 overlay.qcow2
qemu-io -f qcow2 -c 'write -P 9 1M 64k' overlay.qcow2 >/dev/null
$IMG info --output=json --backing-chain overlay.qcow2 | json '[i["filename"] for i in v]'
$IMG info --output=json overlay.qcow2 | json 'v["backing-filename"], v["full-backing-filename"]'
rc=0; $IMG compare overlay.qcow2 src.raw || rc=$?; echo "compare rc=$rc"
$IMG convert -O qcow2 -B disk.qcow2 -F qcow2 overlay.qcow2 rebased.qcow2
$IMG compare rebased.qcow2 overlay.qcow2
$IMG map --output=json rebased.qcow2 | json '[(e["start"], e["length"], e["depth"], e["data"]) for e in v]'
rc=0; $IMG info missing.qcow2 >/dev/null 2>&1 || rc=$?; echo "missing rc=$rc"

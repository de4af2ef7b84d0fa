#!/usr/bin/env bash
# Times vimg against qemu-img on the same images, alternating runs, and prints a Markdown
# table of median wall time, peak RSS and output size for both, with the ratio vimg/qemu-img.
# Every output pair is checked with `qemu-img compare`.
#
# Usage: benches/compare.sh [-n RUNS] [-w WORKDIR] [-o REPORT.md] [CASE...]
#   RUNS     runs per tool and case (default 5; the median is reported)
#   WORKDIR  where the workload and outputs live (default $TMPDIR/vimg-bench; ~10 GiB
#            sparse, ~2 GiB of real data)
#   CASE     case names to run (default: all), e.g. raw-qcow2 qcow2c-raw
#
# The workload is deterministic (seeded) and cached in WORKDIR:
#   big.raw   8 GiB sparse: 512 MiB random, 256 MiB text-like, 128 MiB written zeros, in
#             1 MiB chunks scattered over the image
#   small.raw 2 GiB sparse: 96 MiB random + 96 MiB text-like (for compressed cases)
# Page cache is warm (one untimed run of each command first).
set -euo pipefail

runs=5
work="${TMPDIR:-/tmp}/vimg-bench"
report=""
while getopts "n:w:o:" opt; do
  case $opt in
    n) runs=$OPTARG ;;
    w) work=$OPTARG ;;
    o) report=$OPTARG ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work"
cd "$work"

echo "building vimg (release)..." >&2
(cd "$root" && cargo build --release -q -p vimg-cli)
vimg="$root/target/release/vimg"
command -v qemu-img >/dev/null || { echo "qemu-img is required" >&2; exit 1; }

gen() { # name size_gib random_mib text_mib zero_mib seed
  [ -f "$1" ] && return 0
  echo "generating $1..." >&2
  python3 - "$@" <<'PY'
import random, sys
name, size_gib, rnd, txt, zer, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
size = size_gib << 30
chunks = size >> 20
r = random.Random(seed)
slots = r.sample(range(chunks), rnd + txt + zer)
words = [w.encode() for w in "the of and to in is was for on that with as by at from his her an it this which be are or had have not were but its they all one there also new more first two time some other into after can would may most years these only over such people used when three many where states".split()]
with open(name + ".tmp", "wb") as f:
    f.truncate(size)
    for i, slot in enumerate(slots):
        f.seek(slot << 20)
        if i < rnd:
            f.write(r.randbytes(1 << 20))
        elif i < rnd + txt:
            out = bytearray()
            while len(out) < (1 << 20):
                line = b" ".join(r.choice(words) for _ in range(12)) + b".\n"
                out += line
            f.write(bytes(out[: 1 << 20]))
        else:
            f.write(bytes(1 << 20))
import os
os.rename(name + ".tmp", name)
PY
}
gen big.raw 8 512 256 128 1
gen small.raw 2 96 96 0 2

# Inputs in other formats, made once with qemu-img (the reference writer).
[ -f big.qcow2 ] || qemu-img convert -O qcow2 big.raw big.qcow2
[ -f big.vmdk ] || qemu-img convert -O vmdk big.raw big.vmdk
[ -f small-c.qcow2 ] || qemu-img convert -c -O qcow2 small.raw small-c.qcow2

# name | input | vimg/qemu-img arguments before "IN OUT" | output suffix
cases=(
  "raw-raw|big.raw|-f raw -O raw|raw"
  "raw-qcow2|big.raw|-f raw -O qcow2|qcow2"
  "qcow2-raw|big.qcow2|-f qcow2 -O raw|raw"
  "raw-vmdk|big.raw|-f raw -O vmdk|vmdk"
  "raw-vhd|big.raw|-f raw -O vpc|vhd"
  "raw-vhdx|big.raw|-f raw -O vhdx|vhdx"
  "raw-vdi|big.raw|-f raw -O vdi|vdi"
  "vmdk-qcow2|big.vmdk|-f vmdk -O qcow2|qcow2"
  "raw-qcow2c|small.raw|-f raw -O qcow2 -c|qcow2"
  "qcow2c-raw|small-c.qcow2|-f qcow2 -O raw|raw"
  "raw-vmdkstream|small.raw|-f raw -O vmdk -o subformat=streamOptimized|vmdk"
)

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }
human() { awk -v b="$1" 'BEGIN { split("B KiB MiB GiB", u); i=1; while (b>=1024 && i<4) { b/=1024; i++ } printf "%.1f %s", b, u[i] }'; }

time_one() { # tool args... ; prints "wall_seconds max_rss_kib"
  /usr/bin/time -f "%e %M" -o time.out "$@" >/dev/null 2>&1 || { echo "FAILED: $*" >&2; return 1; }
  cat time.out
}

want() { [ $# -eq 0 ] && return 0; local c; for c in "$@"; do [ "$c" = "$name" ] && return 0; done; return 1; }

rows=()
for c in "${cases[@]}"; do
  IFS='|' read -r name input args suffix <<<"$c"
  want "$@" || continue
  echo "case $name..." >&2
  vout="out-vimg.$suffix"; qout="out-qemu.$suffix"
  # shellcheck disable=SC2086
  "$vimg" convert $args "$input" "$vout" >/dev/null 2>&1 || { echo "vimg failed on $name" >&2; continue; }
  # shellcheck disable=SC2086
  qemu-img convert $args "$input" "$qout"
  vt=(); qt=(); vr=(); qr=()
  for _ in $(seq "$runs"); do
    rm -f "$qout"
    # shellcheck disable=SC2086
    read -r t m < <(time_one qemu-img convert $args "$input" "$qout"); qt+=("$t"); qr+=("$m")
    rm -f "$vout"
    # shellcheck disable=SC2086
    read -r t m < <(time_one "$vimg" convert $args "$input" "$vout"); vt+=("$t"); vr+=("$m")
  done
  ok=same
  ofmt=${args##*-O }; ofmt=${ofmt%% *}
  qemu-img compare -q -f "$ofmt" -F "$ofmt" "$vout" "$qout" || ok=DIFFERENT
  vmed=$(printf '%s\n' "${vt[@]}" | median); qmed=$(printf '%s\n' "${qt[@]}" | median)
  vrss=$(printf '%s\n' "${vr[@]}" | median); qrss=$(printf '%s\n' "${qr[@]}" | median)
  vsize=$(du -B1 --apparent-size "$vout" | cut -f1); qsize=$(du -B1 --apparent-size "$qout" | cut -f1)
  ratio=$(awk -v a="$vmed" -v b="$qmed" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
  sratio=$(awk -v a="$vsize" -v b="$qsize" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }')
  rows+=("| $name | $vmed s | $qmed s | **$ratio** | $(human $((vrss * 1024))) | $(human $((qrss * 1024))) | $(human "$vsize") | $(human "$qsize") | $sratio | $ok |")
  rm -f "$vout" "$qout"
done

{
  echo "Date: $(date -u +%Y-%m-%d), machine: $(nproc) vCPU, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, $(uname -sr)"
  echo "Versions: $("$vimg" --version), $(qemu-img --version | head -1); $runs alternating runs each, medians, page cache warm"
  echo
  echo "| case | vimg | qemu-img | ratio | vimg RSS | qemu-img RSS | vimg size | qemu-img size | size ratio | content |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee "${report:-/dev/null}"

#!/usr/bin/env bash
# Times vimg against qemu-img on the same images and prints Markdown tables: median wall time,
# median CPU time (user+sys), peak RSS and output size for both, with the ratios
# vimg/qemu-img. Every output pair is checked with `qemu-img compare`.
#
# Usage: benches/compare.sh [-n RUNS] [-w WORKDIR] [-o REPORT.md] [-S] [CASE...]
#   RUNS     timed runs per tool and case (default 6: every order of the three commands
#            once; the median is reported)
#   WORKDIR  where the workload and outputs live (default $TMPDIR/vimg-bench; ~10 GiB
#            sparse, ~2 GiB of real data, ~6 GiB free space needed for outputs)
#   -S       also run the scaling table (64 MiB of data in 1 GiB .. 16 TiB qcow2 images)
#   CASE     case names to run (default: all), e.g. raw-qcow2 qcow2c-raw; "scaling" runs
#            only the scaling table
#
# The workload is deterministic (seeded) and cached in WORKDIR:
#   big.raw   8 GiB sparse: 512 MiB random, 256 MiB text-like, 128 MiB written zeros, in
#             1 MiB chunks scattered over the image
#   small.raw 2 GiB sparse: 96 MiB random + 96 MiB text-like (for compressed cases)
#   scale-*.qcow2  64 MiB of data (64 x 1 MiB, spread evenly) in 1G/64G/1T/16T qcow2 images
#
# How it measures (the machine is shared, so single runs are noise):
# - page cache warm: one untimed run of each command first; the inputs stay cached;
# - rotating runs: every order of qemu-img, vimg and vimg -t unsafe in turn;
# - before every timed run the previous outputs are deleted and `sync` runs (untimed), so
#   neither tool pays for the other's dirty pages being written back;
# - medians of RUNS runs; CPU is user+sys of the process (all its threads), from
#   /usr/bin/time, and is less sensitive to other load than wall time.
# vimg fsyncs its outputs before renaming them into place (all-or-nothing output); qemu-img
# does not flush at the end of a convert (it leaves the data dirty in the page cache), so the
# default wall times include vimg's durability and not qemu-img's. Two like-for-like ratios
# follow: vimg against qemu-img plus a `sync -d` of its output right after it (both durable),
# and `vimg -t unsafe` (no fsync, qemu-img's meaning of that cache mode and its convert
# default) against qemu-img (neither syncs). The three commands rotate their order each round.
set -euo pipefail

runs=6
work="${TMPDIR:-/tmp}/vimg-bench"
report=""
scaling=0
while getopts "n:w:o:S" opt; do
  case $opt in
    n) runs=$OPTARG ;;
    w) work=$OPTARG ;;
    o) report=$OPTARG ;;
    S) scaling=1 ;;
    *) sed -n '2,30p' "$0"; exit 2 ;;
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
command -v qemu-io >/dev/null || { echo "qemu-io is required" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "GNU time (/usr/bin/time) is required" >&2; exit 1; }

sel=("$@")
want() { # is case $1 selected on the command line (all cases when none is)?
  [ ${#sel[@]} -eq 0 ] && return 0
  local c; for c in "${sel[@]}"; do [ "$c" = "$1" ] && return 0; done; return 1
}
run_scaling=$scaling
if [ ${#sel[@]} -gt 0 ] && want scaling; then run_scaling=1; fi

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

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.10g\n", (a[NR/2]+a[NR/2+1])/2}'; }
bytes_of_kib() { awk -v k="$1" 'BEGIN { printf "%d", k * 1024 }'; }
human() { awk -v b="$1" 'BEGIN { split("B KiB MiB GiB TiB", u); i=1; while (b>=1024 && i<5) { b/=1024; i++ } printf "%.1f %s", b, u[i] }'; }
ratio() { awk -v a="$1" -v b="$2" -v p="${3:-2}" 'BEGIN { if (b > 0) printf "%.*f", p, a / b; else print "-" }'; }

# Runs "$@" under GNU time; prints "wall cpu max_rss_kib". Output goes to /dev/null.
time_one() {
  /usr/bin/time -f "%e %U %S %M" -o "$work/time.out" "$@" >/dev/null 2>"$work/err.out" \
    || { echo "FAILED: $*" >&2; cat "$work/err.out" >&2; return 1; }
  awk '{ printf "%s %.2f %s\n", $1, $2 + $3, $4 }' "$work/time.out"
}

# bench VOUT QOUT -- ARGS... : times `convert ARGS... OUT` for both tools, RUNS rounds,
# the order rotated every round; sets the globals v_wall v_cpu v_rss q_wall q_cpu q_rss;
# qs_wall: qemu-img's wall time plus that of an fdatasync of its output right after it
# (what qemu-img would take with vimg's durability); u_wall: vimg with `-t unsafe` (no
# fsync, as qemu-img's default), when UNSAFE=1.
bench() {
  local vout=$1 qout=$2; shift 3
  local vt=() vc=() vr=() qt=() qc=() qr=() qs=() ut=() i t c m s order
  rm -f "$vout" "$qout"
  "$vimg" convert "$@" "$vout" >/dev/null
  qemu-img convert "$@" "$qout" >/dev/null
  for i in $(seq "$runs"); do
    if [ "${UNSAFE:-0}" = 1 ]; then
      # Every order of the three in turn (use a multiple of 6 rounds), so each tool follows
      # each other one equally often: in a VM whose balloon returns freed memory to the host,
      # a run that follows one that freed a lot of page cache pays for faulting it back in.
      case $((i % 6)) in
        1) order="q v u" ;; 2) order="v u q" ;; 3) order="u q v" ;;
        4) order="q u v" ;; 5) order="u v q" ;; *) order="v q u" ;;
      esac
    else
      order=$( ((i % 2)) && echo "q v" || echo "v q")
    fi
    for tool in $order; do
      if [ "$tool" = u ]; then
        rm -f "$vout"; sync
        read -r t _ < <(time_one "$vimg" convert -t unsafe "$@" "$vout"); ut+=("$t")
      elif [ "$tool" = q ]; then
        rm -f "$qout"; sync
        read -r t c m < <(time_one qemu-img convert "$@" "$qout"); qt+=("$t"); qc+=("$c"); qr+=("$m")
        read -r s _ < <(time_one sync -d "$qout"); qs+=("$(awk -v a="$t" -v b="$s" 'BEGIN { printf "%.2f", a + b }')")
      else
        rm -f "$vout"; sync
        read -r t c m < <(time_one "$vimg" convert "$@" "$vout"); vt+=("$t"); vc+=("$c"); vr+=("$m")
      fi
    done
  done
  v_wall=$(printf '%s\n' "${vt[@]}" | median); q_wall=$(printf '%s\n' "${qt[@]}" | median)
  v_cpu=$(printf '%s\n' "${vc[@]}" | median); q_cpu=$(printf '%s\n' "${qc[@]}" | median)
  v_rss=$(printf '%s\n' "${vr[@]}" | median); q_rss=$(printf '%s\n' "${qr[@]}" | median)
  qs_wall=$(printf '%s\n' "${qs[@]}" | median)
  u_wall=-; [ ${#ut[@]} -gt 0 ] && u_wall=$(printf '%s\n' "${ut[@]}" | median)
  return 0
}

same() { # FMT A B: "same" when qemu-img compare says the images read identically
  qemu-img compare -q -f "$1" -F "$1" "$2" "$3" && echo same || echo DIFFERENT
}

stamp() {
  echo "Date: $(date -u +%Y-%m-%d), machine: $(nproc) vCPU ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, $(uname -sr), $(df -T . | awk 'NR==2 {print $2}') on $(df . | awk 'NR==2 {print $1}')"
  echo "Versions: $("$vimg" --version) ($(cd "$root" && git rev-parse --short HEAD 2>/dev/null || echo unknown)), $(qemu-img --version | head -1); $runs rounds per case in rotating order, medians, page cache warm, sync before each run"
}

out_md() { tee -a "${report:-/dev/null}"; }
[ -n "$report" ] && : >"$report"

# ---------------------------------------------------------------- conversion pairs
# name | input | convert arguments before "IN OUT" | output suffix
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

any_case=0
for c in "${cases[@]}"; do if want "${c%%|*}"; then any_case=1; fi; done
if [ "$any_case" = 1 ]; then
  gen big.raw 8 512 256 128 1
  gen small.raw 2 96 96 0 2
  # Inputs in other formats, made once with qemu-img (the reference writer).
  [ -f big.qcow2 ] || qemu-img convert -O qcow2 big.raw big.qcow2
  [ -f big.vmdk ] || qemu-img convert -O vmdk big.raw big.vmdk
  [ -f small-c.qcow2 ] || qemu-img convert -c -O qcow2 small.raw small-c.qcow2

  rows=()
  for c in "${cases[@]}"; do
    IFS='|' read -r name input args suffix <<<"$c"
    want "$name" || continue
    ofmt=${args##*-O }; ofmt=${ofmt%% *}
    # A format vimg cannot write yet (vhdx while it is being finished) is listed as pending.
    if ! err=$("$vimg" create -q -f "$ofmt" "probe.$suffix" 1M 2>&1 >/dev/null); then
      rm -f "probe.$suffix"
      if [[ $err == *"not supported yet"* ]]; then
        rows+=("| $name | pending: vimg cannot write $ofmt yet | | | | | | | | | | | | | |")
      else
        rows+=("| $name | vimg FAILED: ${err//|/ } | | | | | | | | | | | | | |")
      fi
      continue
    fi
    rm -f "probe.$suffix"
    echo "case $name..." >&2
    vout="out-vimg.$suffix"; qout="out-qemu.$suffix"
    # shellcheck disable=SC2086
    UNSAFE=1 bench "$vout" "$qout" -- $args "$input"
    ok=$(same "$ofmt" "$vout" "$qout")
    vsize=$(du -B1 --apparent-size "$vout" | cut -f1); qsize=$(du -B1 --apparent-size "$qout" | cut -f1)
    rows+=("| $name | $v_wall s | $q_wall s | $(ratio "$v_wall" "$q_wall") | $qs_wall s | **$(ratio "$v_wall" "$qs_wall")** | $u_wall s | **$(ratio "$u_wall" "$q_wall")** | $v_cpu s | $q_cpu s | $(ratio "$v_cpu" "$q_cpu") | $(human "$(bytes_of_kib "$v_rss")") | $(human "$(bytes_of_kib "$q_rss")") | $(human "$vsize") | $(human "$qsize") | $(ratio "$vsize" "$qsize" 3) | $ok |")
    rm -f "$vout" "$qout"
  done

  {
    stamp
    echo
    echo "| case | vimg wall | qemu-img wall | ratio (defaults) | qemu-img + fdatasync | **ratio, both durable** | vimg -t unsafe | **ratio, neither syncs** | vimg CPU | qemu-img CPU | CPU ratio | vimg RSS | qemu-img RSS | vimg size | qemu-img size | size ratio | content |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
  } | out_md
fi

# ---------------------------------------------------------------- scaling
# The same 64 MiB (64 x 1 MiB of distinct patterns at evenly spread offsets) in qcow2 images
# of growing virtual size: the cost must follow the data, not the virtual size.
if [ "$run_scaling" = 1 ]; then
  rows=()
  for vs in 1G 64G 1T 16T; do
    img="scale-$vs.qcow2"
    if [ ! -f "$img" ]; then
      echo "generating $img..." >&2
      qemu-img create -q -f qcow2 "$img.tmp" "$vs"
      bytes=$(numfmt --from=iec "$vs")
      cmds=()
      for i in $(seq 0 63); do
        cmds+=(-c "write -q -P $((i + 1)) $(( (bytes / 64 * i) / 1048576 * 1048576 )) 1M")
      done
      qemu-io -f qcow2 "${cmds[@]}" "$img.tmp" >/dev/null
      mv "$img.tmp" "$img"
    fi
    for ofmt in qcow2 raw; do
      # ext4 cannot hold a 16 TiB file, so no raw output for that one.
      [ "$ofmt" = raw ] && [ "$vs" = 16T ] && continue
      echo "scaling $vs -> $ofmt..." >&2
      bench "out-vimg.$ofmt" "out-qemu.$ofmt" -- -f qcow2 -O "$ofmt" "$img"
      ok=$(same "$ofmt" "out-vimg.$ofmt" "out-qemu.$ofmt")
      rows+=("| $vs | qcow2->$ofmt | $v_wall s | $v_cpu s | $(human "$(bytes_of_kib "$v_rss")") | $q_wall s | $q_cpu s | $(human "$(bytes_of_kib "$q_rss")") | $ok |")
      rm -f "out-vimg.$ofmt" "out-qemu.$ofmt"
    done
  done
  {
    stamp
    echo
    echo "64 MiB of data in qcow2 images of growing virtual size:"
    echo
    echo "| virtual size | conversion | vimg wall | vimg CPU | vimg RSS | qemu-img wall | qemu-img CPU | qemu-img RSS | content |"
    echo "|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
  } | out_md
fi

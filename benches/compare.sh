#!/usr/bin/env bash
# Times vimg against qemu-img as users run them and prints Markdown tables: median wall time,
# median CPU time (user+sys), peak RSS and output size for both, with the ratios
# vimg/qemu-img. Every output pair is checked with `qemu-img compare`.
#
# Usage: benches/compare.sh [-n RUNS] [-w WORKDIR] [-o REPORT.md] [-s] [-S] [CASE...]
#   RUNS     timed rounds per case (default 6; the median is reported)
#   WORKDIR  where the workload and outputs live (default $TMPDIR/vimg-bench; ~10 GiB
#            sparse, ~2 GiB of real data, ~6 GiB free space needed for outputs)
#   -s       the labelled `sync` variant: `sync` (untimed) before every timed run, so no run
#            pays for the dirty pages the one before left behind. Not what users meet;
#            without -s the runs follow each other with nothing in between.
#   -S       also run the scaling table (64 MiB of data in 1 GiB .. 16 TiB qcow2 images)
#   CASE     case names to run (default: all), e.g. raw-qcow2 qcow2c-raw xz-workflow;
#            "scaling" runs only the scaling table
#
# The workload is deterministic (seeded) and cached in WORKDIR:
#   big.raw   8 GiB sparse: 512 MiB random, 256 MiB text-like, 128 MiB written zeros, in
#             1 MiB chunks scattered over the image
#   small.raw 2 GiB sparse: 96 MiB random + 96 MiB text-like (for compressed cases)
#   small.qcow2.xz  small.raw as a qcow2, `xz -T1 -6` (one xz block, as images published
#             before xz 5.4 are), for the seed workflow
#   scale-*.qcow2  64 MiB of data (64 x 1 MiB, spread evenly) in 1G/64G/1T/16T qcow2 images
#
# How it measures (the machine is shared, so single runs are noise):
# - page cache warm: one untimed run of each command first; the inputs stay cached;
# - two modes per case, four commands, timed back to back in rotating order (each round
#   starts one command later, so every command follows every other one):
#     defaults: `qemu-img convert ...` against `vimg convert ...`; neither flushes its output
#               (qemu-img's convert default is cache=unsafe; vimg's follows it);
#     durable:  both with `-t writeback`, which makes each flush its output before it exits;
# - the previous output of a command is deleted (untimed) before it runs; nothing else
#   happens between runs (unless -s), so a run pays for the writeback of what earlier runs
#   left dirty, as it does for a user converting one image after another;
# - medians of RUNS rounds, ratios from the medians of the same rounds; CPU is user+sys of
#   the process (all its threads), from /usr/bin/time, and is less sensitive to other load
#   than wall time; the load average (`uptime`) before and after is printed with the table.
# xz-workflow: `vimg convert -O raw --checksum sha512 small.qcow2.xz OUT` against
# `xz -dc small.qcow2.xz > t.qcow2 && qemu-img convert -f qcow2 -O raw t.qcow2 OUT &&
# sha512sum OUT` (defaults only; the durable columns are left empty).
set -euo pipefail

runs=6
work="${TMPDIR:-/tmp}/vimg-bench"
report=""
scaling=0
sync_before=0
while getopts "n:w:o:sS" opt; do
  case $opt in
    n) runs=$OPTARG ;;
    w) work=$OPTARG ;;
    o) report=$OPTARG ;;
    s) sync_before=1 ;;
    S) scaling=1 ;;
    *) sed -n '2,45p' "$0"; exit 2 ;;
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
load() { awk '{ print $1 ", " $2 ", " $3 }' /proc/loadavg; }

# Runs the shell command $1 under GNU time; prints "wall cpu max_rss_kib". Its output goes
# to /dev/null.
time_one() {
  /usr/bin/time -f "%e %U %S %M" -o "$work/time.out" bash -c "$1" >/dev/null 2>"$work/err.out" \
    || { echo "FAILED: $1" >&2; cat "$work/err.out" >&2; return 1; }
  awk '{ printf "%s %.2f %s\n", $1, $2 + $3, $4 }' "$work/time.out"
}

# bench OUT1 CMD1 [OUT2 CMD2 ...]: each CMD is a shell command writing OUT (removed before
# every run; several names separated by spaces). One untimed run of each, then RUNS rounds, each round starting one command
# later than the one before. Sets wall[i], cpu[i], rss[i]: the medians of command i.
bench() {
  local outs=() cmds=() n i k r t c m
  while [ $# -gt 0 ]; do outs+=("$1"); cmds+=("$2"); shift 2; done
  n=${#cmds[@]}
  local -a ts cs ms
  for i in $(seq 0 $((n - 1))); do
    # shellcheck disable=SC2086 # an OUT may name several files
    rm -f ${outs[$i]}; bash -c "${cmds[$i]}" >/dev/null
    ts[$i]=""; cs[$i]=""; ms[$i]=""
  done
  for r in $(seq "$runs"); do
    for k in $(seq 0 $((n - 1))); do
      i=$(( (k + r) % n ))
      # shellcheck disable=SC2086
      rm -f ${outs[$i]}
      if [ "$sync_before" = 1 ]; then sync; fi
      read -r t c m < <(time_one "${cmds[$i]}")
      ts[$i]+="$t "; cs[$i]+="$c "; ms[$i]+="$m "
    done
  done
  wall=(); cpu=(); rss=()
  for i in $(seq 0 $((n - 1))); do
    wall[$i]=$(printf '%s\n' ${ts[$i]} | median)
    cpu[$i]=$(printf '%s\n' ${cs[$i]} | median)
    rss[$i]=$(printf '%s\n' ${ms[$i]} | median)
  done
  return 0
}

same() { # FMT A B: "same" when qemu-img compare says the images read identically
  qemu-img compare -q -f "$1" -F "$1" "$2" "$3" && echo same || echo DIFFERENT
}

variant() {
  if [ "$sync_before" = 1 ]; then echo "sync before every run (labelled variant, not what users meet)"; else echo "back to back, nothing between runs"; fi
}
stamp() {
  echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC'), machine: $(nproc) vCPU ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, $(uname -sr), $(df -T . | awk 'NR==2 {print $2}') on $(df . | awk 'NR==2 {print $1}')"
  echo "Versions: $("$vimg" --version) ($(cd "$root" && git rev-parse --short HEAD 2>/dev/null || echo unknown)), $(qemu-img --version | head -1); $runs rounds per case in rotating order, medians, page cache warm, $(variant)"
  echo "Load average (1, 5, 15 min): $load_before before, $(load) after"
}

out_md() { tee -a "${report:-/dev/null}"; }
[ -n "$report" ] && : >"$report"
load_before=$(load)

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
if want xz-workflow; then any_case=1; fi
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
    echo "case $name..." >&2
    q="qemu.$suffix"; v="vimg.$suffix"; qd="qemu-d.$suffix"; vd="vimg-d.$suffix"
    bench "$q" "qemu-img convert $args $input $q" \
          "$v" "$vimg convert $args $input $v" \
          "$qd" "qemu-img convert -t writeback $args $input $qd" \
          "$vd" "$vimg convert -t writeback $args $input $vd"
    ok=$(same "$ofmt" "$v" "$q")
    vsize=$(du -B1 --apparent-size "$v" | cut -f1); qsize=$(du -B1 --apparent-size "$q" | cut -f1)
    rows+=("| $name | ${wall[1]} s | ${wall[0]} s | **$(ratio "${wall[1]}" "${wall[0]}")** | ${wall[3]} s | ${wall[2]} s | **$(ratio "${wall[3]}" "${wall[2]}")** | ${cpu[1]} s | ${cpu[0]} s | $(ratio "${cpu[1]}" "${cpu[0]}") | $(human "$(bytes_of_kib "${rss[1]}")") | $(human "$(bytes_of_kib "${rss[0]}")") | $(ratio "$vsize" "$qsize" 3) | $ok |")
    rm -f "$q" "$v" "$qd" "$vd"
  done

  if want xz-workflow; then
    if [ ! -f small.qcow2.xz ]; then
      echo "generating small.qcow2.xz (xz -T1 -6, about a minute)..." >&2
      qemu-img convert -O qcow2 small.raw small-x.qcow2
      xz -T1 -6 -c small-x.qcow2 >small.qcow2.xz.tmp && mv small.qcow2.xz.tmp small.qcow2.xz
      rm -f small-x.qcow2
    fi
    echo "case xz-workflow..." >&2
    bench "qemu-w.raw t.qcow2" "xz -dc small.qcow2.xz > t.qcow2 && qemu-img convert -f qcow2 -O raw t.qcow2 qemu-w.raw && sha512sum qemu-w.raw" \
          "vimg-w.raw" "$vimg convert -O raw --checksum sha512 small.qcow2.xz vimg-w.raw"
    ok=$(cmp -s qemu-w.raw vimg-w.raw && echo same || echo DIFFERENT)
    rows+=("| xz-workflow | ${wall[1]} s | ${wall[0]} s | **$(ratio "${wall[1]}" "${wall[0]}")** | | | | ${cpu[1]} s | ${cpu[0]} s | $(ratio "${cpu[1]}" "${cpu[0]}") | $(human "$(bytes_of_kib "${rss[1]}")") | $(human "$(bytes_of_kib "${rss[0]}")") | 1.000 | $ok |")
    rm -f qemu-w.raw vimg-w.raw t.qcow2
  fi

  {
    stamp
    echo
    echo "| case | vimg | qemu-img | **ratio, defaults** | vimg -t writeback | qemu-img -t writeback | **ratio, durable** | vimg CPU | qemu-img CPU | CPU ratio | vimg RSS | qemu-img RSS | size ratio | content |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
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
      bench "out-qemu.$ofmt" "qemu-img convert -f qcow2 -O $ofmt $img out-qemu.$ofmt" \
            "out-vimg.$ofmt" "$vimg convert -f qcow2 -O $ofmt $img out-vimg.$ofmt"
      ok=$(same "$ofmt" "out-vimg.$ofmt" "out-qemu.$ofmt")
      rows+=("| $vs | qcow2->$ofmt | ${wall[1]} s | ${cpu[1]} s | $(human "$(bytes_of_kib "${rss[1]}")") | ${wall[0]} s | ${cpu[0]} s | $(human "$(bytes_of_kib "${rss[0]}")") | $ok |")
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

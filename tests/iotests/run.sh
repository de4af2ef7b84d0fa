#!/usr/bin/env bash
# Runs QEMU's own qemu-iotests against vimg: the qemu-img-only subset (bash tests that start
# no VM, NBD server or storage daemon), once with the real qemu-img and once with vimg in its
# place, per format, and prints pass counts and the cases that pass with qemu-img but not
# with vimg. Slow (minutes per format); kept out of `cargo test`. See docs/iotests.md.
#
# Usage: tests/iotests/run.sh [-q QEMU_SRC_OR_IOTESTS_DIR] [-f "qcow2 raw ..."] [-k]
#                             [-R KEPT_WORK_DIR] [TEST...]
#   -q DIR   QEMU 10.0 source tree (or its tests/qemu-iotests); default $QEMU_SRC, else
#            fetched with `apt-get source qemu` into $TMPDIR (needs deb-src).
#   -f LIST  formats (default: qcow2 raw vmdk vpc vhdx vdi qed parallels qcow luks
#            bochs cloop dmg)
#   -k       keep the work folder (results and diffs) and print its path
#   -R DIR   reuse the qemu-img results (qemu-FMT.pass) of an earlier run kept with -k
#            instead of running every test twice
#   TEST...  only these tests (default: the whole qemu-img-only subset)
# Environment: VIMG (the binary; default target/release/vimg, else target/debug/vimg),
#   QEMU_IMG (the real qemu-img; default from PATH), VIMG_ARGS (flags inserted after the
#   subcommand for vimg, e.g. "--allow-external").
#
# Nothing from QEMU is copied into this repository: the tests are run where they lie, with
# a scratch copy of the iotests folder under a temporary folder.

set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
src=${QEMU_SRC:-}
formats="qcow2 raw vmdk vpc vhdx vdi qed parallels qcow luks bochs cloop dmg"
keep=0
reuse=
while getopts "q:f:kR:" o; do
    case $o in
        q) src=$OPTARG ;;
        f) formats=$OPTARG ;;
        k) keep=1 ;;
        R) reuse=$(cd "$OPTARG" && pwd) ;;
        *) sed -n '2,24p' "$0"; exit 1 ;;
    esac
done
shift $((OPTIND - 1))

real_qemu_img=${QEMU_IMG:-$(command -v qemu-img || true)}
[ -x "$real_qemu_img" ] || { echo "run.sh: qemu-img not found (set QEMU_IMG)" >&2; exit 1; }
qemu_io=$(command -v qemu-io || true)
[ -x "$qemu_io" ] || { echo "run.sh: qemu-io not found" >&2; exit 1; }
vimg=${VIMG:-}
if [ -z "$vimg" ]; then
    for c in "$root/target/release/vimg" "$root/target/debug/vimg"; do
        [ -x "$c" ] && { vimg=$c; break; }
    done
fi
[ -x "${vimg:-}" ] || { echo "run.sh: build vimg first (cargo build -p vimg-cli)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vimg-iotests.XXXXXX")
cleanup() { if [ "$keep" = 1 ]; then echo "work folder: $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT

if [ -z "$src" ]; then
    echo "run.sh: no QEMU source given; trying 'apt-get source qemu' (needs deb-src)" >&2
    (cd "$work" && apt-get source --download-only qemu >/dev/null 2>&1 || true)
    tarball=$(ls "$work"/qemu_*.orig.tar.* 2>/dev/null | head -1 || true)
    [ -n "$tarball" ] || { echo "run.sh: could not get the QEMU source; pass -q DIR" >&2; exit 1; }
    tar -C "$work" -xf "$tarball" --wildcards '*/tests/qemu-iotests/*'
    src=$(ls -d "$work"/qemu-*/ | head -1)
fi
if [ -f "$src/check" ] && [ -f "$src/common.rc" ]; then
    iotests=$(cd "$src" && pwd)
else
    iotests=$(cd "$src/tests/qemu-iotests" && pwd)
fi
[ -f "$iotests/common.rc" ] || { echo "run.sh: no qemu-iotests in $src" >&2; exit 1; }

# A private copy of the test folder: `check` writes its scratch files next to itself.
mkdir -p "$work/src/tests"
cp -r "$iotests" "$work/src/tests/qemu-iotests"
cp -r "$iotests/../../python" "$work/src/python" 2>/dev/null || true
tdir="$work/src/tests/qemu-iotests"

# The programs `check` insists on but the subset never starts: a stand-in for
# qemu-system that only answers `-machine help`.
bin="$work/bin"
mkdir -p "$bin"
cat > "$bin/qemu-system-stub" <<'STUB'
#!/bin/sh
if [ "$1" = "-machine" ] && [ "$2" = "help" ]; then
    echo "Supported machines are:"; echo "pc                   Standard PC (default)"; exit 0
fi
echo "qemu-system-stub: this run starts no VM" >&2; exit 1
STUB
chmod +x "$bin/qemu-system-stub"

# The qemu-img under test: vimg for every subcommand it implements (reached through a link
# named qemu-img, so vimg's qemu-img compatibility mode applies where it has one), the real
# qemu-img for the rest. A subcommand is routed whole: when vimg refuses a form it does not
# implement yet (e.g. `snapshot -c`), the test fails and is counted as failed (the summary
# lists such refusals separately). vimg's message prefix is shown as qemu-img's.
ln -sf "$vimg" "$bin/qemu-img"
routed=
for sub in amend bench bitmap check commit compare convert create dd info map measure \
        rebase resize snapshot; do
    if "$vimg" "$sub" --help >/dev/null 2>&1; then routed="$routed|$sub"; fi
done
routed=${routed#|}
[ -n "$routed" ] || { echo "run.sh: $vimg implements none of qemu-img's subcommands?" >&2; exit 1; }
echo "routed to vimg: ${routed//|/ }"
# When the binary has a qemu-img compatibility mode (its --version then starts with
# "qemu-img version"), it prints qemu-img's prefix itself; otherwise stderr goes through a
# line-buffered rewrite (lines written to stderr and stdout in quick succession may then
# come out in another order than vimg wrote them).
if "$bin/qemu-img" --version 2>/dev/null | head -1 | grep -q '^qemu-img version'; then
    native=1
else
    native=0
fi
cat > "$bin/qemu-img-vimg" <<WRAP
#!/usr/bin/env bash
case "\${1:-}" in
    $routed)
        sub=\$1; shift
        extra=\${VIMG_ARGS:-}
        [ "\$sub" = create ] && extra=
        if [ $native = 1 ]; then exec "$bin/qemu-img" "\$sub" \$extra "\$@"; fi
        { "$bin/qemu-img" "\$sub" \$extra "\$@" 2>&1 1>&3 3>&- |
            sed -u -e 's/^vimg: /qemu-img: /' >&2; exit "\${PIPESTATUS[0]}"; } 3>&1 ;;
    *) exec "$real_qemu_img" "\$@" ;;
esac
WRAP
chmod +x "$bin/qemu-img-vimg"

# The qemu-img-only subset: bash tests that use neither a VM nor NBD nor the storage daemon.
select_tests() {
    local t
    for t in "$tdir"/[0-9][0-9][0-9] "$tdir"/tests/*; do
        [ -f "$t" ] && [ -f "$t.out" ] || continue
        head -1 "$t" | grep -q bash || continue
        if grep -qE '_launch_qemu|_send_qemu_cmd|\$QEMU_PROG|\$\{?QEMU\}? |QEMU_NBD|qemu-nbd|_qemu_nbd|nbd:|QSD|storage-daemon|_qmp|QEMU_COMM|qemu_comm_method|_require_devices|_require_large_file|valgrind' "$t"; then
            continue
        fi
        echo "${t##*/}"
    done
}
if [ $# -gt 0 ]; then tests=("$@"); else mapfile -t tests < <(select_tests); fi
echo "qemu-img-only subset: ${#tests[@]} tests"

run_check() { # $1: qemu-img to use, $2: format, $3: result file, $4: scratch folder
    mkdir -p "$4" "$work/sock"
    (cd "$tdir" && env QEMU_PROG="$bin/qemu-system-stub" QEMU_IMG_PROG="$1" \
        QEMU_IO_PROG="$qemu_io" QEMU_NBD_PROG="$(command -v qemu-nbd || echo /bin/false)" \
        QSD_PROG="$(command -v qemu-storage-daemon || echo /bin/false)" \
        TEST_DIR="$4" SOCK_DIR="$work/sock" \
        timeout 3600 ./check -tap -"$2" "${tests[@]}" >"$3" 2>&1 || true)
}

# TAP lines read "ok FORMAT TEST" (and "# SKIP" for tests the format does not run).
passed() { { grep -E '^ok ' "$1" || true; } | { grep -v '# SKIP' || true; } | awk '{print $3}' | sort; }
printf '%s\n' "${tests[@]}" | sort >"$work/selected"

summary="$work/summary.txt"
: >"$summary"
total_q=0; total_v=0
for fmt in $formats; do
    if [ -n "$reuse" ] && [ -f "$reuse/qemu-$fmt.pass" ]; then
        comm -12 "$reuse/qemu-$fmt.pass" "$work/selected" >"$work/qemu-$fmt.pass"
    else
        run_check "$real_qemu_img" "$fmt" "$work/qemu-$fmt.tap" "$work/scratch-qemu-$fmt"
        passed "$work/qemu-$fmt.tap" >"$work/qemu-$fmt.pass"
    fi
    run_check "$bin/qemu-img-vimg" "$fmt" "$work/vimg-$fmt.tap" "$work/scratch-vimg-$fmt"
    passed "$work/vimg-$fmt.tap" >"$work/vimg-$fmt.pass"
    q=$(wc -l <"$work/qemu-$fmt.pass"); v=$(comm -12 "$work/qemu-$fmt.pass" "$work/vimg-$fmt.pass" | wc -l)
    total_q=$((total_q + q)); total_v=$((total_v + v))
    fails=$(comm -23 "$work/qemu-$fmt.pass" "$work/vimg-$fmt.pass" | tr '\n' ' ')
    # Of those, the ones where vimg refused a form it does not implement (its own
    # "vimg cannot ...", "vimg does not ..." refusals; the rule of the house: refuse rather
    # than do it wrong).
    refused=
    for t in $fails; do
        bad=$(ls "$work/scratch-vimg-$fmt"/*-"$t"/"$t".out.bad 2>/dev/null | head -1 || true)
        [ -n "$bad" ] && grep -qE 'vimg (cannot|does not|changes|refuses) |vimg writes .* only|is not supported$' "$bad" && refused="$refused$t "
    done
    printf '%-9s qemu-img passes %3d, vimg passes %3d of them; differ: %s\n' "$fmt" "$q" "$v" "$fails" | tee -a "$summary"
    [ -z "$refused" ] || printf '%-9s   of which vimg refused a form it does not implement: %s\n' "$fmt" "$refused" | tee -a "$summary"
done
printf 'total     qemu-img passes %3d, vimg passes %3d of them\n' "$total_q" "$total_v" | tee -a "$summary"

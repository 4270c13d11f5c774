#!/usr/bin/env bash
# tests/run.sh: run every test of dsgate and add up the results.
#
# Called by `make test` after it has built build/asan/dsgate,
# build/fake_upstream and build/asan/test_* (cmocka unit tests).  Runs, in
# order: the unit test binaries, the Python integration tests
# (tests/integration/test_*.py), the real-client tests (tests/clients: the
# openai and Anthropic SDKs, LangChain),
# then scans every dsgate log for sanitizer reports.  The last line is
# `N passed, N failed`; the exit status is non-zero when anything failed.
#
# Logs: build/test-logs/ (dsgate-*.log is dsgate's stderr, one per process).
# Environment: DSGATE_TEST_VERBOSE=1 prints Python tracebacks.

set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

LOGDIR=$ROOT/build/test-logs
rm -rf "$LOGDIR"
mkdir -p "$LOGDIR"
export DSGATE_TEST_LOGDIR=$LOGDIR
export PYTHONDONTWRITEBYTECODE=1

PASSED=0
FAILED=0

pass() { PASSED=$((PASSED + $1)); }
fail() { FAILED=$((FAILED + $1)); }
section() { printf '\n== %s\n' "$1"; }

# LeakSanitizer needs ptrace; where it cannot run, leak checks are turned off
# (and the run says so) rather than failing every test.
LEAKS=1
if [ -x build/asan/dsgate ]; then
    probe=$(ASAN_OPTIONS=detect_leaks=1 build/asan/dsgate --version 2>&1 || true)
    if printf '%s' "$probe" | grep -q -e "LeakSanitizer has encountered a fatal error" \
                                      -e "LeakSanitizer does not work under ptrace"; then
        LEAKS=0
        echo "# LeakSanitizer cannot run here (no ptrace): running with detect_leaks=0"
    fi
fi
# A small quarantine: ASan's default (256 MiB of freed memory held back)
# would swamp the tests that watch dsgate's RSS for unbounded buffering.
export ASAN_OPTIONS="detect_leaks=$LEAKS:abort_on_error=0:halt_on_error=1:quarantine_size_mb=8"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export DSGATE_ASAN_OPTIONS=$ASAN_OPTIONS
export DSGATE_UBSAN_OPTIONS=$UBSAN_OPTIONS

# ---------------------------------------------------------------- unit tests
section "unit tests (cmocka)"
shopt -s nullglob
units=(build/asan/test_*)
[ ${#units[@]} -eq 0 ] && echo "# no unit test binaries in build/asan"
for bin in "${units[@]}"; do
    [ -x "$bin" ] || continue
    case $bin in *.d | *.o) continue ;; esac
    out=$LOGDIR/$(basename "$bin").out
    CMOCKA_MESSAGE_OUTPUT=stdout timeout 300 "$bin" >"$out" 2>&1
    rc=$?
    cat "$out"
    p=$(sed -n 's/^\[  PASSED  \] \([0-9][0-9]*\) test(s)\..*/\1/p' "$out" | awk '{s+=$1} END {print s+0}')
    f=$(sed -n 's/^\[  FAILED  \] \([0-9][0-9]*\) test(s).*/\1/p' "$out" | awk '{s+=$1} END {print s+0}')
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "FAIL $bin: exited with status $rc (crash, sanitizer report or timeout)"
        f=1
    elif [ "$rc" -eq 0 ] && [ "$p" -eq 0 ] && [ "$f" -eq 0 ]; then
        echo "FAIL $bin: no cmocka summary in its output"
        f=1
    fi
    pass "$p"
    fail "$f"
done

# A Python or Node test file prints `RESULT passed=N failed=N` last.
run_suite() {    # name, command...
    local name=$1
    shift
    local out=$LOGDIR/$name.out rc p f
    "$@" 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    if grep -q '^RESULT passed=[0-9]* failed=[0-9]*$' "$out"; then
        p=$(sed -n 's/^RESULT passed=\([0-9]*\) failed=\([0-9]*\)$/\1/p' "$out" | tail -n 1)
        f=$(sed -n 's/^RESULT passed=\([0-9]*\) failed=\([0-9]*\)$/\2/p' "$out" | tail -n 1)
        if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
            echo "FAIL $name: exited with status $rc"
            f=1
        fi
    else
        echo "FAIL $name: no RESULT line (exit status $rc)"
        p=0
        f=1
    fi
    pass "$p"
    fail "$f"
}

# ---------------------------------------------------------------- integration
for t in tests/integration/test_*.py; do
    section "integration: $t"
    run_suite "$(basename "$t" .py)" timeout 300 "$PY" -u "$t"
done

# ---------------------------------------------------------------- fuzz corpus
section "fuzz targets over their committed corpus (make fuzz-replay)"
run_suite fuzz_replay timeout 600 make --no-print-directory fuzz-replay

# ---------------------------------------------------------------- packaging
section "packaging: tests/ops/test_packaging.sh"
run_suite test_packaging timeout 120 bash tests/ops/test_packaging.sh

# ---------------------------------------------------------------- clients
section "client tests: openai and Anthropic SDKs, LangChain (npm)"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "FAIL clients: node/npm not installed (make deps installs them)"
    fail 1
else
    c=tests/clients
    if [ ! -d $c/node_modules ] || [ ! -e $c/node_modules/.package-lock.json ] ||
       [ $c/package-lock.json -nt $c/node_modules/.package-lock.json ]; then
        echo "# npm ci in $c"
        if ! (cd $c && npm ci --no-audit --no-fund --loglevel=error >"$LOGDIR/npm-ci.log" 2>&1); then
            echo "FAIL clients: npm ci failed:"
            tail -n 20 "$LOGDIR/npm-ci.log"
            fail 1
        fi
    fi
    if [ -d $c/node_modules/openai ]; then
        run_suite clients timeout 300 "$PY" -u $c/run.py
    fi
fi

# ---------------------------------------------------------------- sanitizers
section "sanitizer reports in dsgate logs"
logs=("$LOGDIR"/dsgate-*.log)
if [ ${#logs[@]} -eq 0 ]; then
    echo "# no dsgate logs to scan"
fi
clean=1
for log in "${logs[@]}"; do
    if grep -q -e "ERROR: AddressSanitizer" -e "runtime error:" -e "LeakSanitizer" "$log"; then
        echo "FAIL sanitizer_report: $log"
        grep -n -m 5 -e "ERROR: AddressSanitizer" -e "runtime error:" -e "LeakSanitizer" "$log" | sed 's/^/    /'
        fail 1
        clean=0
    fi
done
if [ $clean -eq 1 ] && [ ${#logs[@]} -gt 0 ]; then
    echo "PASS sanitizer_reports (${#logs[@]} dsgate logs clean, detect_leaks=$LEAKS)"
    pass 1
fi

echo
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]

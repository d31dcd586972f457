# tests/vm/stress.sh: the scale knob of the hardening suites (t82, t84, t86), sourced after lib.sh.
#
# BLKTAP_STRESS_SCALE (default 1) multiplies their iteration counts: a slow kernel (the debug
# variant under TCG) can run them at e.g. 0.25. The host passes it to the guest (tests/vm/run.py
# forwards every BLKTAP_STRESS_* and BLKTAP_FUZZ_* variable).
SCALE=${BLKTAP_STRESS_SCALE:-1}

# scaled N: N times the scale, rounded, at least 1.
scaled() {
    awk -v n="$1" -v s="$SCALE" 'BEGIN { v = int(n * s + 0.5); if (v < 1) v = 1; print v }'
}

# no_taps_left: no tap is allocated (no blktap! entry in the class directory).
no_taps_left() {
    left=$(ls "$CLASS" 2>/dev/null | grep '^blktap!' || true)
    [ -z "$left" ] || { echo "taps left: $left"; return 1; }
}

# refcnt_zero: the module holds no reference.
refcnt_zero() { is "$(cat /sys/module/blktap/refcnt)" 0; }

# elapsed SINCE: seconds since SINCE (a `date +%s` value).
elapsed() { echo $(( $(date +%s) - $1 )); }

# The benchmark's guest script, booted by scripts/bench: tests/vm/bench.py with the arguments
# scripts/bench left in build/bench-guest-args (one line).
. tests/vm/lib.sh
args=$(cat "$REPO/build/bench-guest-args" 2>/dev/null)
# shellcheck disable=SC2086 # the arguments are words
python3 tests/vm/bench.py run $args

# The benchmark harness (scripts/bench) works: its guest side, smoke-sized (1 run, 1 s per job,
# two jobs, 2 taps for the memory numbers), gives numbers for every device and well-formed
# records. Performance itself is never checked here; `make bench` measures it.
. tests/vm/lib.sh
python3 tests/vm/bench.py run --smoke --taps 2 > /tmp/bench.out 2>&1
rc=$?
cat /tmp/bench.out
check "the benchmark's guest side runs (smoke)" is "$rc" 0
check "every device produced numbers, the records are well-formed" \
    python3 tests/vm/bench.py check /tmp/bench.out
check "nothing left loaded" sh -c "! grep -Eq '^(blktap|null_blk|ublk_drv|rnull_mod) ' /proc/modules"
finish

# Every flag of every original tap-ctl command: accepted with the original meaning, and either
# working or answered EOPNOTSUPP (95) in one line naming the feature; the module check; and
# tap-ctl driving a stand-in of the original tapdisk (tests/vm/origtapdisk.py) that it spawns.
. tests/vm/lib.sh
load
CTL=/var/run/blktap-control
mkdir -p /tmp/mnt

# eopnotsupp WORD CMD...: CMD exits 95 with one line on stderr containing WORD, and leaves no
# tap behind.
eopnotsupp() {
    word=$1; shift
    "$@" >/tmp/out 2>/tmp/err; st=$?
    cat /tmp/err
    test $st = 95 && test "$(wc -l < /tmp/err)" = 1 && grep -qi "$word" /tmp/err &&
        test -z "$(ls -d $CLASS/blktap!* 2>/dev/null)"
}

gone() { ! test -e /proc/$1 || grep -q '^State:.*Z' /proc/$1/status 2>/dev/null; }

# fio_verify DEV SIZE: two concurrent jobs, each writing and verifying (crc32c) its own half.
fio_verify() {
    half=$(($2 / 2))
    fio --name=v --filename="$1" --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-44k \
        --iodepth=8 --size=${half}M --numjobs=2 --offset_increment=${half}M --verify=crc32c \
        --do_verify=1 --verify_fatal=1 --output=/tmp/fio.out >/tmp/fio.err 2>&1 \
    && [ "$(grep -c 'err= 0' /tmp/fio.out)" = 2 ] ||
    { grep -v 'state file' /tmp/fio.err | head -5; grep 'err=' /tmp/fio.out; false; }
}

truncate -s 16M /tmp/a.raw /tmp/b.raw

# --- create -------------------------------------------------------------------------------------
check "create -a -R: a read-only disk" sh -c "dev=\$($TAPCTL create -a aio:/tmp/a.raw -R) &&
    test \$(cat /sys/block/tda/ro) = 1 && $TAPCTL destroy -m 0"
check "create -D -t 30 --log: no O_DIRECT, a 30 s request timeout" sh -c "
    dev=\$($TAPCTL create -a aio:/tmp/a.raw -D -t 30 --log /tmp/c.log) &&
    grep -q 'opened aio:/tmp/a.raw without O_DIRECT, request timeout 30 s' /tmp/c.log &&
    $TAPCTL destroy -m 0"
dev=$($TAPCTL create -a aio:/tmp/a.raw -d /tmp/nodes/vbd-51712)
check "create -d: prints the node it made" is "$dev" /tmp/nodes/vbd-51712
check "...a block device of the tap's disk" sh -c "test -b $dev &&
    test \"\$(stat -c '%t:%T' $dev)\" = \"\$(stat -c '%t:%T' $DEVDIR/tapdev0)\""
check "...that carries I/O (two fio jobs verify)" fio_verify "$dev" 16
check "destroy -t 120" $TAPCTL destroy -m 0 -t 120
for f in "-e 1|parent chain" "-r|local read cache" "-2 aio:/tmp/b.raw|secondary mirror" \
         "-s|standby" "-C /tmp/cbt.log|changed-block log" "-c vm.slice|cgroup slice"; do
    flag=${f%%|*}; word=${f#*|}
    check "create $flag: EOPNOTSUPP naming the $word, no tap left" \
        eopnotsupp "$word" $TAPCTL create -a aio:/tmp/a.raw $flag
done
check "the minor was freed each time" is "$($TAPCTL allocate)" "$DEVDIR/tapdev0"
check "free" $TAPCTL free -m 0

# --- allocate, spawn, attach, open --------------------------------------------------------------
check "allocate -d PATH: makes that block node (the tapdev major, the tap's minor), prints it" sh -c "
    test \"\$($TAPCTL allocate -d /tmp/nodes/td9)\" = /tmp/nodes/td9 && test -b /tmp/nodes/td9 &&
    test \"\$(stat -c '%t:%T' /tmp/nodes/td9)\" = \"\$(printf '%x:0' \$($TAPCTL major))\""
check "allocate --name: the sysfs name" sh -c "
    test \"\$($TAPCTL allocate --name vbd-7-51712)\" = $DEVDIR/tapdev1 &&
    test \"\$(cat '$CLASS/blktap!blktap1/name')\" = vbd-7-51712"
check "spawn -c: EOPNOTSUPP" sh -c "$TAPCTL spawn -c vm.slice 2>&1; test \$? = 95"
pid=$($TAPCTL spawn)
check "attach" $TAPCTL attach -p $pid -m 0
for f in "-e 1|parent chain" "-r|local read cache" "-2 aio:/tmp/b.raw|secondary mirror" \
         "-s|standby" "-C /tmp/cbt.log|changed-block log"; do
    flag=${f%%|*}; word=${f#*|}
    check "open $flag: EOPNOTSUPP naming the $word" sh -c "
        $TAPCTL open -p $pid -m 0 -a aio:/tmp/a.raw $flag 2>/tmp/err; st=\$?; cat /tmp/err
        test \$st = 95 && test \$(wc -l < /tmp/err) = 1 && grep -qi '$word' /tmp/err"
done
check "open -E (key on stdin): EOPNOTSUPP naming encryption" sh -c "
    head -c 32 /dev/urandom | $TAPCTL open -p $pid -m 0 -a aio:/tmp/a.raw -E 2>/tmp/err; st=\$?
    cat /tmp/err; test \$st = 95 && grep -qi encrypt /tmp/err"
check "open -R -D -t 60 --debug: works, the debug lines on stderr" sh -c "
    $TAPCTL open -p $pid -m 0 -a aio:/tmp/a.raw -R -D --debug -t 60 2>/tmp/err &&
    grep -q \"sending 'open' message (minor 0)\" /tmp/err && test \$(cat /sys/block/tda/ro) = 1"
check "list -m -p -t -f filter" sh -c "
    test \"\$($TAPCTL list -m 0 -p $pid -t aio -f /tmp/a.raw)\" = 'pid=$pid minor=0 state=0x0 args=aio:/tmp/a.raw' &&
    test -z \"\$($TAPCTL list -t vhd)\" && test -z \"\$($TAPCTL list -f /tmp/b.raw)\""
check "stats -p -m: JSON" sh -c "$TAPCTL stats -p $pid -m 0 | python3 -c 'import json,sys; json.load(sys.stdin)'"
check "pause -t 30" $TAPCTL pause -p $pid -m 0 -t 30
check "unpause -2: EOPNOTSUPP naming the secondary" sh -c "
    $TAPCTL unpause -p $pid -m 0 -2 aio:/tmp/b.raw 2>&1; test \$? = 95"
check "unpause -c: EOPNOTSUPP naming the changed-block log" sh -c "
    $TAPCTL unpause -p $pid -m 0 -c /tmp/cbt.log 2>&1 | grep -q 'changed-block log'"
check "...the tap stays paused" sh -c "$TAPCTL list -m 0 | grep -q state=0x2a"
check "unpause -a" $TAPCTL unpause -p $pid -m 0 -a aio:/tmp/b.raw
check "close -f: a forced close" $TAPCTL close -p $pid -m 0 -f
check "open again, writable" $TAPCTL open -p $pid -m 0 -a aio:/tmp/a.raw
check "mount the disk" sh -c "mkfs.ext4 -q -F $DEVDIR/tapdev0 && mount $DEVDIR/tapdev0 /tmp/mnt"
t0=$(date +%s)
check "close -t 3 while mounted: EBUSY (16) once the time is up" \
    is "$(errno_of $TAPCTL close -p $pid -m 0 -t 3)" 16
check "...after trying for those 3 s" test $(( $(date +%s) - t0 )) -ge 2
umount /tmp/mnt
check "close -t 120 once unmounted" $TAPCTL close -p $pid -m 0 -t 120
check "detach" $TAPCTL detach -p $pid -m 0
check "free both" sh -c "$TAPCTL free -m 0 && $TAPCTL free -m 1"
check "major, major -c, check" sh -c "$TAPCTL major >/dev/null && $TAPCTL major -c >/dev/null &&
    test \"\$($TAPCTL check)\" = ok"
check "a usage error is EINVAL (22)" is "$(errno_of $TAPCTL close -p 1)" 22

# --- The stand-in of the original tapdisk, spawned by tap-ctl -----------------------------------
export TAPDISK=$REPO/tests/vm/origtapdisk.py
opid=$($TAPCTL spawn)
check "spawn runs the original-style tapdisk with no arguments and reads its pid" \
    test -S "$CTL/ctl$opid"
check "attach, open -t 120 on it" sh -c "$TAPCTL attach -p $opid -m 5 &&
    $TAPCTL open -p $opid -m 5 -a vhd:/sr/leaf.vhd -t 120"
check "list shows its tap" is "$($TAPCTL list -p $opid)" "pid=$opid minor=5 state=0x0 args=vhd:/sr/leaf.vhd"
check "stats is its JSON" sh -c "$TAPCTL stats -p $opid -m 5 | grep -q '\"driver\": {\"type\": 4, \"name\": \"vhd\"'"
check "pause, list 0x2a, unpause -a" sh -c "$TAPCTL pause -p $opid -m 5 &&
    $TAPCTL list -p $opid | grep -q state=0x2a && $TAPCTL unpause -p $opid -m 5 -a vhd:/sr/new.vhd &&
    $TAPCTL list -p $opid | grep -q 'state=0x0 args=vhd:/sr/new.vhd'"
check "close -t 120, detach: it exits when idle" sh -c "$TAPCTL close -p $opid -m 5 -t 120 &&
    $TAPCTL detach -p $opid -m 5 && sleep 0.5 && ! test -e $CTL/ctl$opid"
dev=$($TAPCTL create -a vhd:/sr/other.vhd)
check "create with it: allocate, spawn, attach, open" sh -c "test '$dev' = $DEVDIR/tapdev0 &&
    $TAPCTL list -m 0 | grep -Eq '^pid=[0-9]+ minor=0 state=0x0 args=vhd:/sr/other.vhd$'"
check "destroy -t 120 with it: close, detach, free" sh -c "$TAPCTL destroy -m 0 -t 120 &&
    test -z \"\$($TAPCTL list)\""
unset TAPDISK

# --- Without the module -------------------------------------------------------------------------
check "rmmod" unload
for c in "list" "check" "create -a aio:/tmp/a.raw" "allocate"; do
    check "tap-ctl $c without the module: the original's line on stdout, exit 218" sh -c "
        out=\$($TAPCTL $c 2>/dev/null); st=\$?
        test \$st = 218 && test \"\$out\" = 'blktap kernel module not installed'"
done
finish

# tests/vm/lib.sh: helpers for test scripts that run inside the guest (sourced).
#
# Each `check` prints one TAP-like line, `ok - what` or `not ok - what` followed by the failing
# command's output; the host counts them. A script ends with `finish`, whose status is the
# script's: 0 only if every check passed.

REPO=${BLKTAP_REPO:-$(pwd)}
KO=$REPO/blktap.ko
TAPCTL=$REPO/userspace/target/release/tap-ctl
DEVDIR=/dev/xen/blktap-2
CLASS=/sys/class/blktap2
export PATH=$REPO/userspace/target/release:$PATH

_pass=0
_fail=0
_out=/tmp/check.out

# check WHAT CMD...: CMD must succeed.
check() {
    what=$1
    shift
    if "$@" >"$_out" 2>&1; then
        echo "ok - $what"
        _pass=$((_pass + 1))
    else
        echo "not ok - $what"
        sed 's/^/#   /' "$_out" | head -n 20
        _fail=$((_fail + 1))
    fi
}

# fails CMD...: succeeds if CMD fails (for use inside check).
fails() { ! "$@"; }

# errno_of CMD...: runs a command that reports an errno as its exit status (tap-ctl does), and
# prints that status.
errno_of() {
    "$@" >/dev/null 2>&1
    echo $?
}

# ioctl NODE CMD ARG: prints the errno name an ioctl answers (OK on success). ARG is passed as a
# full-width unsigned long, so out-of-range values reach the kernel as they are.
ioctl() {
    python3 - "$@" <<'PY'
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
node, cmd, arg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    fd = os.open(node, os.O_RDWR)
except OSError as e:
    print("open:" + errno.errorcode[e.errno]); sys.exit(0)
ret = libc.ioctl(fd, ctypes.c_ulong(cmd), ctypes.c_ulong(arg % 2**64))
print("OK" if ret >= 0 else errno.errorcode[ctypes.get_errno()])
PY
}

# is TEXT EXPECTED: the two strings are equal (prints both if not).
is() {
    if [ "$1" = "$2" ]; then return 0; fi
    echo "got:      '$1'"
    echo "expected: '$2'"
    return 1
}

# now: the time in seconds (with nanoseconds); since T: seconds elapsed since T, one decimal.
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# bounded SECONDS CMD...: runs CMD in the background and waits at most SECONDS for it; status 124
# if it did not end by then (it is left behind: a request that never ends cannot be killed),
# else CMD's status.
bounded() {
    s=$1; shift
    "$@" &
    b=$!
    i=0; while kill -0 $b 2>/dev/null && [ $i -lt $((s * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    if kill -0 $b 2>/dev/null; then echo "# still running after $s s: $*"; return 124; fi
    wait $b
}

# fio in the background, and its verdict (the data-path tests: t74, t96, ...).
BAD_BLOCK='verify: bad|verify failed|verify type mismatch'

# fio_ok NAME [STATUS]: fio's exit status (/tmp/fio-NAME.rc) is STATUS (0 by default), every
# job of /tmp/fio-NAME.out says err= 0, and fio reported no bad block.
fio_ok() {
    rc=$(cat /tmp/fio-$1.rc)
    if [ "$rc" = "${2:-0}" ] && grep -q 'err= 0' /tmp/fio-$1.out && ! grep -q 'err=[ ]*[1-9]' /tmp/fio-$1.out \
        && ! grep -Eq "$BAD_BLOCK" /tmp/fio-$1.out /tmp/fio-$1.err; then
        return 0
    fi
    echo "fio $1: exit $rc"
    grep -h -E "err=|$BAD_BLOCK" /tmp/fio-$1.out /tmp/fio-$1.err | head -n 8
    return 1
}

# bad_blocks NAME: how many bad blocks fio reported.
bad_blocks() { cat /tmp/fio-$1.out /tmp/fio-$1.err | grep -Ec "$BAD_BLOCK"; }

# run_fio NAME ARGS...: fio in the background (its pid in /tmp/fio-NAME.pid); its status goes
# to /tmp/fio-NAME.rc. `wait $!` after it waits for it.
run_fio() {
    n=$1; shift
    rm -f /tmp/fio-$n.pid
    {
        fio --name=$n "$@" --output=/tmp/fio-$n.out >/dev/null 2>/tmp/fio-$n.err &
        echo $! > /tmp/fio-$n.pid
        wait $!
        echo $? > /tmp/fio-$n.rc
    } &
}

# The tap under test: $T its sysfs directory, $D its block node (set by the script).

# counter NAME: the value of "NAME: N" in the tap's debug attribute ($T/debug).
counter() { sed -n "s/^$1: //p" "${T:?}/debug"; }

# wait_node [DEV]: DEV (tapdev0) appears within 30 s.
wait_node() {
    _n=${1:-$DEVDIR/tapdev0}
    _i=0; while [ ! -b "$_n" ] && [ $_i -lt 300 ]; do sleep 0.1; _i=$((_i + 1)); done
    test -b "$_n"
}

# node_gone [DEV]: DEV (tapdev0) is gone within 20 s.
node_gone() {
    _n=${1:-$DEVDIR/tapdev0}
    _i=0; while [ -e "$_n" ] && [ $_i -lt 200 ]; do sleep 0.1; _i=$((_i + 1)); done
    test ! -e "$_n"
}

# stop_peer PID: SIGTERM, up to 10 s to exit, then SIGKILL; reaped.
stop_peer() {
    kill "$1" 2>/dev/null
    _i=0; while kill -0 "$1" 2>/dev/null && [ $_i -lt 100 ]; do sleep 0.1; _i=$((_i + 1)); done
    kill -9 "$1" 2>/dev/null
    wait "$1" 2>/dev/null
}

# wait_fio_pair A B SECONDS LABEL: the run_fio jobs A and B end within SECONDS (a stalled disk
# keeps them running: says so, and their fio_ok then fails).
wait_fio_pair() {
    _i=0; while { [ ! -s /tmp/fio-$1.rc ] || [ ! -s /tmp/fio-$2.rc ]; } && [ $_i -lt $(($3 * 10)) ]; do
        sleep 0.1; _i=$((_i + 1)); done
    [ $_i -lt $(($3 * 10)) ] || echo "# $4: fio still running after $3 s"
}

load() { insmod "$KO"; }
unload() { rmmod blktap; }

finish() {
    echo "# $_pass passed, $_fail failed"
    [ "$_fail" = 0 ]
}

# write_attr FILE DATA: writes DATA (no newline added) in one write(2); prints OK or the errno name.
write_attr() {
    python3 - "$@" <<'PY'
import errno, os, sys
try:
    fd = os.open(sys.argv[1], os.O_WRONLY)
    os.write(fd, sys.argv[2].encode())
    print("OK")
except OSError as e:
    print(errno.errorcode[e.errno])
PY
}

# /sys/class/blktap2 after each step.
. tests/vm/lib.sh
load
T="$CLASS/blktap!blktap0"

check "class attributes" is "$(ls $CLASS | tr '\n' ' ')" "devices verbosity "
check "verbosity starts at 0" is "$(cat $CLASS/verbosity)" 0
check "verbosity is writable" sh -c "echo 2 > $CLASS/verbosity"
check "verbosity reads back" is "$(cat $CLASS/verbosity)" 2
check "verbosity refuses non-numbers with EINVAL" is "$(write_attr $CLASS/verbosity many)" EINVAL
check "verbosity unchanged by a bad write" is "$(cat $CLASS/verbosity)" 2
check "verbose mode logs allocations" sh -c "$TAPCTL allocate >/dev/null && dmesg | grep -q 'blktap0: allocated'"
echo 0 > $CLASS/verbosity
check "devices is read-only" is "$(stat -c %a $CLASS/devices)" 444
check "devices is empty without disks" is "$(cat $CLASS/devices)" ""

check "per-tap attributes" sh -c "ls '$T' | grep -E '^(name|task|debug|pause|deadline)$' | tr '\n' ' ' | grep -qx 'deadline debug name pause task '"
check "name permissions" is "$(stat -c %a "$T/name")" 644
check "task permissions" is "$(stat -c %a "$T/task")" 444
check "debug permissions" is "$(stat -c %a "$T/debug")" 444
check "name shows the minor while unset" is "$(cat "$T/name")" 0
check "task is empty without tapdisk" is "$(cat "$T/task")" ""
check "debug shows the state" is "$(cat "$T/debug" | tr '\n' '|')" \
    "minor: 0|name: |ring: closed|disk: none|mapped: no|recovery: off|deadline: 120|pending: 0|late: 0|parked: 0|staged: 0|completed: 0|refused: 0|timed_out: 0|late_answers: 0|reissued: 0|quiet: 0|"
check "pause and deadline permissions" is "$(stat -c %a "$T/pause") $(stat -c %a "$T/deadline")" "644 644"
check "pause reads 0 without a disk" is "$(cat "$T/pause")" 0
check "deadline defaults to 120 s" is "$(cat "$T/deadline")" 120
check "name is writable" sh -c "echo vbd-1-768 > '$T/name'"
check "name reads back" is "$(cat "$T/name")" vbd-1-768
name255=$(head -c 255 /dev/zero | tr '\0' n)
check "a 255-byte name is accepted" is "$(write_attr "$T/name" "$name255")" OK
check "and reads back whole" is "$(cat "$T/name")" "$name255"
check "a 256-byte name is refused with ENAMETOOLONG" is "$(write_attr "$T/name" "${name255}x")" ENAMETOOLONG
check "a 255-byte name and a newline is accepted" is "$(write_attr "$T/name" "$name255
")" OK
check "a name with a NUL is refused with EINVAL" is "$(python3 -c "
import os, errno
fd = os.open('$T/name', os.O_WRONLY)
try:
    os.write(fd, b'a\\0b'); print('OK')
except OSError as e:
    print(errno.errorcode[e.errno])")" EINVAL
check "the old name stays" is "$(cat "$T/name")" "$name255"
check "an empty write unsets the name" sh -c "echo > '$T/name' && test \"\$(cat '$T/name')\" = 0"
check "task is not writable" is "$(write_attr "$T/task" 1)" EACCES

exec 3<> $DEVDIR/blktap0
check "task shows the ring holder" is "$(cat "$T/task")" "$$"
check "debug shows the ring open" sh -c "grep -qx 'ring: open by $$' '$T/debug'"
exec 3>&-
check "debug shows the ring closed" sh -c "grep -qx 'ring: closed' '$T/debug'"

check "free the tap" $TAPCTL free -m 0
check "its directory is gone" test ! -e "$T"
check "rmmod" unload
check "class gone" test ! -e $CLASS
finish

# The demo (run by scripts/demo in the guest): load blktap, allocate taps, show what the tools see.
. tests/vm/lib.sh
set -e
show() { echo; echo "\$ $*"; sh -c "$*"; }

show "insmod blktap.ko; grep blktap /proc/misc; grep -E 'blktap2|tapdev' /proc/devices"
show "tap-ctl check"
show "tap-ctl allocate"
show "tap-ctl allocate -d vbd-1-768"
show "tap-ctl allocate"
show "tap-ctl list"
show "ls -l $DEVDIR"
show "ls $CLASS"
show "cat '$CLASS/blktap!blktap1/name' '$CLASS/blktap!blktap1/debug'"
show "tap-ctl free -m 1"
show "tap-ctl list"
show "tap-ctl free -m 1 || echo \"(exit status \$?)\""
show "rmmod blktap || echo \"(exit status \$?: a tap still exists)\""
show "tap-ctl free -m 0; tap-ctl free -m 2; rmmod blktap && echo unloaded"

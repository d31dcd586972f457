# The module cannot be unloaded while a tap exists.
. tests/vm/lib.sh
load
check "allocate a tap" $TAPCTL allocate
check "rmmod is refused while the tap exists" fails rmmod blktap
check "the module is still there" grep -q '^blktap ' /proc/modules
check "its refcount counts the tap" is "$(cat /sys/module/blktap/refcnt)" 1
check "the tap still works" is "$($TAPCTL list)" "minor=0"
check "free the tap" $TAPCTL free -m 0
check "refcount back to 0" is "$(cat /sys/module/blktap/refcnt)" 0
check "rmmod succeeds now" unload
check "module gone" fails grep -q '^blktap ' /proc/modules
finish

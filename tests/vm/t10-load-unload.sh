# insmod/rmmod ten times; the names the tools look for come and go with the module.
. tests/vm/lib.sh

i=1
while [ $i -le 10 ]; do
    check "insmod #$i" load
    check "blktap/control in /proc/misc #$i" grep -qw 'blktap/control' /proc/misc
    check "blktap2 char region in /proc/devices #$i" grep -Eq '^ *[0-9]+ blktap2$' /proc/devices
    check "tapdev block major in /proc/devices #$i" grep -Eq '^ *[0-9]+ tapdev$' /proc/devices
    check "rmmod #$i" unload
    check "names gone after rmmod #$i" fails grep -Eqw 'blktap/control|blktap2|tapdev' /proc/misc /proc/devices
    i=$((i + 1))
done

load
check "control node is a 0600 char device" is "$(stat -c '%F %a' $DEVDIR/control)" "character special file 600"
check "control node's minor is the misc minor" is \
    "$(stat -c '%t:%T' $DEVDIR/control | tr a-f A-F)" \
    "$(printf '%X:%X' 10 "$(awk '$2 == "blktap/control" {print $1}' /proc/misc)")"
check "sysfs class exists" test -d $CLASS
check "tap-ctl check says ok" is "$($TAPCTL check)" "ok"
check "tap-ctl major matches /proc/devices" is "$($TAPCTL major)" "$(awk '$2 == "tapdev" {print $1}' /proc/devices)"
check "tap-ctl major -c matches /proc/devices" is "$($TAPCTL major -c)" "$(awk '$2 == "blktap2" {print $1}' /proc/devices)"
unload
check "class gone after rmmod" test ! -e $CLASS
check "tap-ctl check explains a missing module" sh -c "$TAPCTL check 2>&1 | grep -q 'not loaded'"
finish

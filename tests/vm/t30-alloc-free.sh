# Allocate 100 taps, list them, check their nodes and sysfs, free them all.
. tests/vm/lib.sh
load

n=0
out=/tmp/alloc.txt
: > $out
while [ $n -lt 100 ]; do
    $TAPCTL allocate >> $out || break
    n=$((n + 1))
done
check "100 taps allocated" is "$n" 100
check "allocate printed tapdev0..tapdev99 in order" is \
    "$(cat $out | md5sum)" "$(i=0; while [ $i -lt 100 ]; do echo $DEVDIR/tapdev$i; i=$((i+1)); done | md5sum)"
check "tap-ctl list shows 100 taps" is "$($TAPCTL list | wc -l)" 100
check "tap-ctl list rows are minor=N for taps without tapdisk" is "$($TAPCTL list | sed -n '1p;100p' | tr '\n' ' ')" "minor=0 minor=99 "
check "tap-ctl list -m 42 shows one tap" is "$($TAPCTL list -m 42)" "minor=42"
check "100 class devices" is "$(ls -d $CLASS/blktap!blktap* | wc -l)" 100
check "100 ring nodes, 0600 char devices" is \
    "$(stat -c '%F %a' $DEVDIR/blktap* | sort | uniq -c | tr -s ' ')" " 100 character special file 600"
ring_major=$(awk '$2 == "blktap2" {print $1}' /proc/devices)
check "ring node minor = tap minor" is "$(stat -c '%t %T' $DEVDIR/blktap57)" "$(printf '%x 39' $ring_major)"
check "class device dev attribute" is "$(cat "$CLASS/blktap!blktap57/dev")" "$ring_major:57"
check "devices lists no tap without a disk" is "$(cat $CLASS/devices)" ""

check "free tap 3" $TAPCTL free -m 3
check "free tap 50" $TAPCTL free -m 50
check "next allocation reuses the lowest free minor" is "$($TAPCTL allocate)" "$DEVDIR/tapdev3"
check "then the next one" is "$($TAPCTL allocate)" "$DEVDIR/tapdev50"
check "then a new one" is "$($TAPCTL allocate)" "$DEVDIR/tapdev100"
check "allocate --name names the tap" is "$($TAPCTL allocate --name vbd-7-51712)" "$DEVDIR/tapdev101"
check "the name is in sysfs" is "$(cat "$CLASS/blktap!blktap101/name")" "vbd-7-51712"

freed=0
for d in $CLASS/blktap!blktap*; do
    m=${d##*blktap!blktap}
    $TAPCTL free -m "$m" && freed=$((freed + 1))
done
check "all 102 taps freed" is "$freed" 102
check "no class device left" is "$(ls -d $CLASS/blktap!* 2>/dev/null | wc -l)" 0
check "no ring node left" is "$(ls $DEVDIR | tr '\n' ' ')" "control "
check "tap-ctl list is empty" is "$($TAPCTL list)" ""
check "rmmod after freeing everything" unload
finish

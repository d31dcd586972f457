# The ring's poll() as epoll sees it: the Python peer reads the ring only when an epoll reports
# the ring fd readable (level-triggered, edge-triggered, registered with an empty mask and then
# EPOLL_CTL_MOD to EPOLLIN, nested in a second epoll), registering at once or 3 s after the disk
# appeared, when the requests of a 1 MiB direct write are already published. A lost wake-up
# stalls the disk: the write must finish within 10 s, read back intact, and fio crc32c verify
# (2 jobs) must finish within 90 s.
. tests/vm/lib.sh
load
$TAPCTL allocate >/dev/null
D=$DEVDIR/tapdev0
head -c 1M /dev/urandom > /tmp/in

fio_verify() {
    fio --name=e1 --filename=$D --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-44k \
        --iodepth=16 --offset=2M --size=4M --verify=crc32c --verify_fatal=1 --output=/tmp/e1.out >/dev/null 2>&1 &
    a=$!
    fio --name=e2 --filename=$D --ioengine=libaio --direct=1 --rw=randrw --bsrange=512-44k \
        --iodepth=32 --offset=8M --size=4M --verify=crc32c --verify_backlog=8 --verify_fatal=1 \
        --output=/tmp/e2.out >/dev/null 2>&1
    rb=$?
    wait $a; ra=$?
    test $ra = 0 && test $rb = 0 && grep -q 'err= 0' /tmp/e1.out && grep -q 'err= 0' /tmp/e2.out \
        || { grep -h 'err=' /tmp/e1.out /tmp/e2.out; false; }
}

for mode in epoll epoll-et epoll-mod epoll-nested; do
    for late in 0 3; do
        label="--$mode, registered ${late} s late"
        python3 tests/vm/pytap.py 0 65536 --$mode --register-late $late > /tmp/pytap.log 2>&1 &
        peer=$!
        i=0; while [ ! -b $D ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
        t=$(now)
        bounded 10 dd if=/tmp/in of=$D bs=1M oflag=direct status=none
        rc=$?
        echo "# $label: 1 MiB direct write: status $rc after $(since $t) s"
        check "$label: a 1 MiB direct write finishes within 10 s" test $rc = 0
        if [ $late != 0 ]; then
            check "$label: its requests were published before the peer registered" \
                sh -c "cat /tmp/pytap.log; grep -Eq '^pytap: [1-9][0-9]* requests published before registration' /tmp/pytap.log"
        fi
        bounded 10 dd if=$D of=/tmp/out bs=1M count=1 iflag=direct status=none
        rc=$?
        check "$label: it reads back intact within 10 s" sh -c "test $rc = 0 && cmp /tmp/in /tmp/out"
        check "$label: fio crc32c verify, 2 jobs at once, within 90 s" bounded 90 fio_verify
        kill $peer
        i=0; while kill -0 $peer 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
        kill -9 $peer 2>/dev/null
        wait $peer
        sed 's/^/# /' /tmp/pytap.log
        check "$label: the peer was woken by epoll and saw the writes" \
            sh -c "grep -Eq 'epoll wakeups=[1-9]' /tmp/pytap.log && grep -Eq 'ops read=[1-9][0-9]* write=[1-9]' /tmp/pytap.log"
        check "$label: the disk is gone with the peer" sh -c "i=0; while [ -b $D ] && [ \$i -lt 50 ]; do sleep 0.1; i=\$((i+1)); done; test ! -b $D"
    done
done
check "free the tap" $TAPCTL free -m 0
check "rmmod" unload
finish

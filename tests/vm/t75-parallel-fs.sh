# A file system under parallel load on one tapdev: ext4 on an aio: image, 4 writers writing
# files of known content (buffered, O_DIRECT, with fsync) while 2 readers read back, from the
# disk (O_DIRECT, and buffered after dropping the caches), every file a writer has finished;
# then sync, umount, fsck -fn clean, remount, and the sha256 of every file matches.
# The number of files scales with BLKTAP_STRESS_SCALE.
. tests/vm/lib.sh
. tests/vm/stress.sh
load
T0=$(date +%s)
FILES=$(scaled 12)
mkdir -p /tmp/mnt /tmp/src /tmp/done

truncate -s 256M /tmp/fs.raw
dev=$($TAPCTL create -a aio:/tmp/fs.raw)
check "mkfs.ext4 on the tapdev" mkfs.ext4 -q -F -b 4096 "$dev"
check "mount" mount "$dev" /tmp/mnt

# The files' known content: FILES per writer, 4 KiB to ~2 MiB, some not a multiple of 4 KiB.
for w in 1 2 3 4; do
    mkdir -p /tmp/src/$w /tmp/mnt/$w
    for i in $(seq 1 $FILES); do
        kb=$(( (w * 37 + i * 151) % 2000 + 4 ))
        head -c $((kb * 1024 + (i % 3) * 512)) /dev/urandom > /tmp/src/$w/f$i
    done
done
(cd /tmp/src && find . -type f | sort | xargs sha256sum) > /tmp/sums
echo "# $((FILES * 4)) files, $(du -sk /tmp/src | cut -f1) KiB"

# writer W: writes its files, each way in turn; after each, its name goes into /tmp/done/W.
writer() {
    w=$1; bad=0
    for i in $(seq 1 $FILES); do
        src=/tmp/src/$w/f$i dst=/tmp/mnt/$w/f$i
        case $((i % 3)) in
        0) cp $src $dst ;;
        1) dd if=$src of=$dst bs=44k oflag=direct status=none 2>/dev/null \
               || dd if=$src of=$dst bs=44k conv=fsync status=none ;;
        2) dd if=$src of=$dst bs=64k conv=fsync status=none ;;
        esac || bad=$((bad + 1))
        echo $w/f$i >> /tmp/done/$w
    done
    echo $bad > /tmp/writer-$w.bad
}

# reader R: until the writers are done, reads back every finished file and compares it with its
# source: O_DIRECT (from the disk), or buffered after dropping the page cache (from the disk
# too). Counts files read and mismatches.
reader() {
    r=$1; n=0; bad=0
    while :; do
        last=0; [ -e /tmp/writers-done ] && last=1
        for f in $(cat /tmp/done/* 2>/dev/null); do
            n=$((n + 1))
            if [ $(( (n + r) % 4 )) = 0 ]; then
                echo 1 > /proc/sys/vm/drop_caches
                cmp -s /tmp/mnt/$f /tmp/src/$f || { bad=$((bad + 1)); echo "buffered $f" >> /tmp/reader-$r.bad; }
            else
                dd if=/tmp/mnt/$f bs=64k iflag=direct status=none 2>/dev/null | cmp -s - /tmp/src/$f \
                    || { bad=$((bad + 1)); echo "direct $f" >> /tmp/reader-$r.bad; }
            fi
        done
        [ $last = 1 ] && break
    done
    echo "$n $bad" > /tmp/reader-$r.res
}

t=$(date +%s)
rm -f /tmp/writers-done
reader 1 & r1=$!
reader 2 & r2=$!
writer 1 & w1=$!
writer 2 & w2=$!
writer 3 & w3=$!
writer 4 & w4=$!
wait $w1 $w2 $w3 $w4
touch /tmp/writers-done
wait $r1 $r2
echo "# writers and readers: $(elapsed $t) s; reader 1 read/bad: $(cat /tmp/reader-1.res), reader 2: $(cat /tmp/reader-2.res)"
check "4 writers at once: every write succeeded" is "$(cat /tmp/writer-*.bad | paste -sd+ | bc)" 0
check "2 readers during the writes: every file read back intact" \
    sh -c "cat /tmp/reader-*.bad 2>/dev/null | head; test \$(cat /tmp/reader-*.res | awk '{s += \$2} END {print s}') = 0"
check "the readers read while the writers wrote" \
    test "$(cat /tmp/reader-*.res | awk '{s += $1} END {print s}')" -ge $((FILES * 4))
check "every file intact after the load (page cache dropped)" \
    sh -c "echo 3 > /proc/sys/vm/drop_caches; cd /tmp/mnt && sha256sum -c --quiet /tmp/sums"
check "sync" sync
check "umount" umount /tmp/mnt
check "fsck -fn is clean" fsck.ext4 -f -n "$dev"
check "mount again" mount "$dev" /tmp/mnt
check "every file's sha256 matches after the remount" sh -c "cd /tmp/mnt && sha256sum -c --quiet /tmp/sums"
check "umount again" umount /tmp/mnt
T="$CLASS/blktap!blktap0"
check "no refused answer, no timeout" sh -c "grep -qx 'refused: 0' '$T/debug' && grep -qx 'timed_out: 0' '$T/debug' || { cat '$T/debug'; false; }"
check "destroy" $TAPCTL destroy -m 0
check "the image alone fscks clean" fsck.ext4 -f -n /tmp/fs.raw
check "rmmod" unload
echo "# parallel fs total $(elapsed $T0) s"
finish

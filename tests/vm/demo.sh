# The demo (run by scripts/demo in the guest): a tapdev backed by a raw image, used for real.
. tests/vm/lib.sh
set -e
show() { echo; echo "\$ $*"; sh -c "$*"; }

show "insmod blktap.ko && grep blktap /proc/misc && grep -E 'blktap2|tapdev' /proc/devices"
show "truncate -s 256M /tmp/disk.raw"
show "tap-ctl create -a aio:/tmp/disk.raw"
show "tap-ctl list"
show "ls -l /dev/xen/blktap-2/ && cat /sys/class/blktap2/devices"
show "mkfs.ext4 -q /dev/xen/blktap-2/tapdev0 && mkdir -p /tmp/mnt && mount /dev/xen/blktap-2/tapdev0 /tmp/mnt"
show "cp -r /usr/share/doc/fio /tmp/mnt/ && head -c 20M /dev/urandom > /tmp/mnt/random.bin && (cd /tmp/mnt && find . -type f | sort | xargs sha256sum) > /tmp/sums && wc -l < /tmp/sums"
show "df -h /tmp/mnt | tail -1"
show "umount /tmp/mnt && fsck.ext4 -n -f /dev/xen/blktap-2/tapdev0 | tail -1"
show "mount /dev/xen/blktap-2/tapdev0 /tmp/mnt && (cd /tmp/mnt && sha256sum -c --quiet /tmp/sums) && echo 'all checksums match' && umount /tmp/mnt"
show "tap-ctl stats -m 0 -p \$(cat '/sys/class/blktap2/blktap!blktap0/task')"
show "fio --name=randread --filename=/dev/xen/blktap-2/tapdev0 --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=32 --runtime=5 --time_based | grep -E 'IOPS|lat \\(usec\\): min'"
show "tap-ctl destroy -m 0 && tap-ctl list && echo destroyed"
show "fsck.ext4 -n -f /tmp/disk.raw | tail -1"
show "rmmod blktap && echo unloaded"

# Installed like an out-of-tree driver: `make install` into a scratch root, depmod, modprobe and
# modinfo by name, module options on the command line and from /etc/modprobe.d, modprobe -r (refused
# while a tap exists), the installed tap-ctl running the installed tapdisk (fio verify), `tap-ctl
# check` before the module is loaded, `make uninstall`.
. tests/vm/lib.sh
ROOT=/tmp/root
KDIR=$BLKTAP_KDIR
KVER=$(uname -r)
MODS=$ROOT/lib/modules/$KVER
T="$CLASS/blktap!blktap0"

check "the guest runs the kernel the module is built for" is "$(cat "$KDIR/include/config/kernel.release")" "$KVER"
check "the module is not loaded" fails grep -q '^blktap ' /proc/modules

# The repo is read-only here: make install only copies what `make module userspace` built.
check "make install DESTDIR=$ROOT" make -C "$REPO" install KDIR="$KDIR" DESTDIR=$ROOT
check "the module is in updates/" test -f "$MODS/updates/blktap.ko"
check "make install ran depmod" grep -q '^updates/blktap.ko:' "$MODS/modules.dep"
check "tap-ctl is in sbin" test -x $ROOT/usr/local/sbin/tap-ctl
check "tapdisk is in libexec" test -x $ROOT/usr/local/libexec/tapdisk
check "and on the PATH, in bin" is "$(readlink -f $ROOT/usr/local/bin/tapdisk)" "$ROOT/usr/local/libexec/tapdisk"
check "tap-ctl runs tapdisk from libexec" sh -c "$ROOT/usr/local/sbin/tap-ctl --version | grep -qF '(tapdisk: /usr/local/libexec/tapdisk)'"

rm -f "$MODS/modules.dep" "$MODS/modules.dep.bin"
check "depmod -b $ROOT" depmod -b $ROOT "$KVER"
check "depmod lists the module again" grep -q '^updates/blktap.ko:' "$MODS/modules.dep"
modinfo -b $ROOT blktap > /tmp/modinfo.out 2>&1
check "modinfo -b finds it by name" grep -q "^filename: *$MODS/updates/blktap.ko$" /tmp/modinfo.out
check "modinfo shows the description" grep -q '^description: *Xen blktap2 userspace block-device driver$' /tmp/modinfo.out
check "modinfo shows the license" grep -q '^license: *GPL$' /tmp/modinfo.out
check "modinfo lists the parameter" grep -q '^parm: *request_timeout:.*(u32)$' /tmp/modinfo.out
check "modinfo shows the kernel it is for" grep -q "^vermagic: *$KVER " /tmp/modinfo.out
check "modprobe would load the installed file" sh -c "modprobe -d $ROOT --show-depends blktap | grep -qx 'insmod $MODS/updates/blktap.ko *'"
check "modinfo shows the alias blktap2" grep -q '^alias: *blktap2$' /tmp/modinfo.out
check "modprobe blktap2 resolves to it" sh -c "modprobe -d $ROOT --show-depends blktap2 | grep -qx 'insmod $MODS/updates/blktap.ko *'"

# Installed but not loaded: tap-ctl says so, and how to load it (its modprobe dry run sees the
# scratch root through MODPROBE_OPTIONS).
# As the original: the storage manager's line on stdout and exit status 218; then ours on stderr.
check "tap-ctl check: not loaded (exit 218, as the original)" is "$(errno_of env MODPROBE_OPTIONS="-d $ROOT" $ROOT/usr/local/sbin/tap-ctl check)" 218
env MODPROBE_OPTIONS="-d $ROOT" $ROOT/usr/local/sbin/tap-ctl check > /tmp/check-out 2> /tmp/check-msg
check "stdout: the original's line" is "$(cat /tmp/check-out)" "blktap kernel module not installed"
check "its message says the module is not loaded" grep -q 'blktap kernel module is not loaded' /tmp/check-msg
check "and that modprobe blktap loads it" grep -q 'installed for this kernel: load it with `modprobe blktap`' /tmp/check-msg
$ROOT/usr/local/sbin/tap-ctl check > /tmp/check-msg 2>&1
check "with no module installed it says so" grep -q 'no blktap module is installed for this kernel' /tmp/check-msg

check "modprobe -d $ROOT blktap request_timeout=30" modprobe -d $ROOT blktap request_timeout=30
check "the module is loaded" grep -q '^blktap ' /proc/modules
check "tap-ctl check: ok" is "$($ROOT/usr/local/sbin/tap-ctl check)" ok
check "allocate a tap" $ROOT/usr/local/sbin/tap-ctl allocate
check "the parameter set its deadline" is "$(cat "$T/deadline")" 30
check "modprobe -r is refused while the tap exists" sh -c "! modprobe -r -d $ROOT blktap 2>/tmp/rm.err && cat /tmp/rm.err && grep -q 'in use' /tmp/rm.err"
check "the module is still loaded" grep -q '^blktap ' /proc/modules
check "free the tap" $ROOT/usr/local/sbin/tap-ctl free -m 0
check "modprobe -r unloads it" modprobe -r -d $ROOT blktap
check "the module is gone" fails grep -q '^blktap ' /proc/modules

# Options from /etc/modprobe.d (a tmpfs over the guest's read-only one).
mount -t tmpfs tmpfs /etc/modprobe.d
echo 'options blktap request_timeout=45' > /etc/modprobe.d/blktap.conf
check "modprobe with options from /etc/modprobe.d" modprobe -d $ROOT blktap
check "the option set the deadline" sh -c "$ROOT/usr/local/sbin/tap-ctl allocate >/dev/null && test \$(cat '$T/deadline') = 45"
check "free, modprobe -r" sh -c "$ROOT/usr/local/sbin/tap-ctl free -m 0 && modprobe -r -d $ROOT blktap"
# (Not also on the command line: Linux 7.3's Rust module parameters take one value, a second one
# fails the load with EEXIST, which modprobe takes for "already loaded" and reports as success.)

# The installed tools where they were installed for: the scratch root's /usr/local over the
# guest's, the build tree off the PATH.
mount --bind $ROOT/usr/local /usr/local
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
unset TAPDISK TAPDISK2
check "tap-ctl on the PATH is the installed one" is "$(command -v tap-ctl)" /usr/local/sbin/tap-ctl
check "so is tapdisk" is "$(command -v tapdisk)" /usr/local/bin/tapdisk
check "modprobe blktap" modprobe -d $ROOT blktap
truncate -s 64M /tmp/disk.raw
dev=$(tap-ctl create -a aio:/tmp/disk.raw)
check "the installed tap-ctl creates a tapdev" is "$dev" "$DEVDIR/tapdev0"
pid=$(cat "$T/task" 2>/dev/null)
check "served by the installed tapdisk, from libexec" is "$(readlink /proc/$pid/exe)" /usr/local/libexec/tapdisk
check "tap-ctl list shows it" sh -c "tap-ctl list | grep -q '^pid=$pid minor=0 state=0x[0-9a-f]* args=aio:/tmp/disk.raw$'"
# Two jobs at once, each writing and verifying its own half of the disk.
fio --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=512-44k \
    --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --name=low --offset=0 --size=32M --name=high --offset=32M --size=32M \
    --output=/tmp/fio.out >/dev/null 2>&1
rc=$?
[ $rc = 0 ] || sed 's/^/#   /' /tmp/fio.out
check "fio verify, two concurrent jobs on their own regions" test $rc = 0
check "both jobs ended without errors" is "$(grep -c 'err= 0' /tmp/fio.out)" 2
check "modprobe -r is refused while the tapdev exists" fails modprobe -r -d $ROOT blktap
check "destroy" tap-ctl destroy -m 0
check "tapdisk exited" sh -c "sleep 0.5; ! test -e /proc/$pid || grep -q '^State:.*Z' /proc/$pid/status"
check "modprobe -r" modprobe -r -d $ROOT blktap
check "the module is gone" fails grep -q '^blktap ' /proc/modules
umount /usr/local
umount /etc/modprobe.d

check "make uninstall DESTDIR=$ROOT" make -C "$REPO" uninstall KDIR="$KDIR" DESTDIR=$ROOT
check "the module file is gone" fails test -e "$MODS/updates/blktap.ko"
check "depmod forgot it" fails grep -q blktap "$MODS/modules.dep"
check "modprobe no longer finds it" fails modprobe -n -d $ROOT blktap
check "the tools are gone" sh -c "! ls $ROOT/usr/local/sbin/tap-ctl $ROOT/usr/local/libexec/tapdisk $ROOT/usr/local/bin/tapdisk 2>/dev/null"
finish

# Loads the module so that its KUnit suites run; the host reads their KTAP from the kernel log.
. tests/vm/lib.sh
check "insmod runs the KUnit suites" load
check "KUnit printed results" sh -c "dmesg | grep -q '# Subtest: blktap_'"
check "rmmod" unload
finish

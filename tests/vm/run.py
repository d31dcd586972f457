#!/usr/bin/env python3
"""Boot the cached test kernel in QEMU and run one test script in the guest.

    tests/vm/run.py [--kernel DIR] [--timeout SECONDS] [--log FILE] [--tsc-khz KHZ] SCRIPT

The guest's root is the host's root, read-only, over virtio-9p, so host binaries (tap-ctl, fio,
mkfs.ext4) and the repo's build outputs run in the guest as they are. tests/vm/guest-init mounts
proc, sys, devtmpfs and tmpfs, runs SCRIPT with sh, and prints its exit status.

The test fails if the script fails, if the guest does not finish within the time limit, or if the
kernel log shows any Oops, BUG, WARNING, lockdep report, KASAN/UBSAN report, hung task or RCU
stall, whatever the script said. KUnit results (KTAP) found in the log are reported as well.

KVM is used when a guest really boots with it (checked once per host boot); otherwise TCG.
Exit status: 0 pass, 1 fail.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BLKTAP_CACHE", Path.home() / ".cache/blktap2-rs"))

# Kernel log lines start with a timestamp (CONFIG_PRINTK_TIME); test output never does.
KLOG_LINE = re.compile(r"^\[\s*\d+\.\d+\]\s?(.*)$")
BAD_PATTERNS = [
    (re.compile(p), what)
    for p, what in [
        (r"\bOops\b|general protection fault|Kernel panic", "oops/panic"),
        (r"\bBUG[: ]|kernel BUG at", "BUG"),
        (r"\bWARNING:", "WARNING"),
        (r"possible circular locking|possible recursive locking|inconsistent lock state"
         r"|suspicious RCU usage|bad unlock balance|held lock freed|lock held when returning"
         r"|possible irq lock inversion|INFO: lockdep is turned off|DEBUG_LOCKS_WARN_ON",
         "lockdep"),
        (r"BUG: KASAN|BUG: KCSAN|\bUBSAN:|BUG: KFENCE", "sanitizer"),
        (r"blocked for more than \d+ seconds|hung_task", "hung task"),
        (r"rcu.*detected stalls|rcu_sched self-detected|soft lockup|hard LOCKUP", "stall"),
        (r"Call Trace:", "stack trace"),
        (r"list_add corruption|list_del corruption|ODEBUG", "list/object debug"),
        (r"rust_panic|panicked at", "Rust panic"),
    ]
]
KTAP_CASE = re.compile(r"^(\s*)(not ok|ok) (\d+) (\S+)(.*)$")
KTAP_SUBTEST = re.compile(r"^(\s*)# Subtest: (\S+)")


def log(msg):
    print(f"[vm] {msg}", file=sys.stderr, flush=True)


def tsc_params(accel, tsc_khz):
    """The kernel parameters that give a TCG guest a real clock. Under TCG the guest's TSC is
    the host's (QEMU answers RDTSC with the host's counter), but the guest has no HPET or PM
    timer to measure its rate against, marks it unstable and falls back to the 4 ms jiffies
    clock. Told the host's rate (`tsc_early_khz`) and that the counter is sound (`tsc=reliable`:
    the host's TSC is invariant and the same on every vCPU), it uses the TSC as its clocksource.
    Nothing under KVM, which has kvm-clock, or without a rate."""
    if accel != "tcg" or not tsc_khz:
        return []
    return [f"tsc_early_khz={int(tsc_khz)}", "tsc=reliable"]


def qemu_cmd(kernel_dir, accel, script, serial_log, tsc_khz=None):
    bzimage = Path(kernel_dir) / "arch/x86/boot/bzImage"
    append = " ".join(tsc_params(accel, tsc_khz) + [
        "console=ttyS0", "earlyprintk=serial", "panic=-1", "oops=panic", "panic_on_warn=0",
        # Under TCG on a loaded host the boot-time check of the timer IRQ can miss its ticks and
        # panic ("IO-APIC + timer doesn't work"); the emulated timer works, so skip the check.
        "no_timer_check",
        # Only the module's KUnit suites run (the kernel's own built-in ones are skipped).
        "kunit.filter_glob=blktap_*",
        "root=blktaproot", "rootfstype=9p", "rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose",
        "ro", f"init={REPO}/tests/vm/guest-init",
        f"BLKTAP_TEST={script}", f"BLKTAP_REPO={REPO}", f"BLKTAP_KDIR={Path(kernel_dir).resolve()}",
    ] + [
        # The hardening suites' knobs (tests/vm/stress.sh), passed on to the guest's init.
        f"{k}={v}" for k, v in sorted(os.environ.items())
        if k.startswith(("BLKTAP_STRESS_", "BLKTAP_FUZZ_")) and v and " " not in v
    ])
    cmd = [
        "qemu-system-x86_64", "-machine", "q35", "-m", "2G",
        "-smp", "2,sockets=2,cores=1,threads=1",
        "-nographic", "-no-reboot", "-nodefaults",
        "-kernel", str(bzimage), "-append", append,
        "-serial", f"file:{serial_log}",
        "-fsdev", "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=root,mount_tag=blktaproot",
        # The repo again, mounted at its own path after the guest's tmpfs mounts, which would
        # hide it if it lived under /tmp.
        "-fsdev", f"local,id=repo,path={REPO},security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=repo,mount_tag=blktaprepo",
    ]
    if accel == "kvm":
        cmd += ["-accel", "kvm", "-cpu", "host"]
    else:
        # Without 5-level paging. 7.3's identify_cpu() clears boot_cpu_data's feature bits
        # while it probes the boot CPU again, with interrupts on; until the alternatives are
        # patched, pgtable_l5_enabled() reads X86_FEATURE_LA57 from there, so an interrupt in
        # that window sees 4-level bounds: KASAN calls every direct-map address (0xff11...)
        # wild ("wild-memory-access in do_raw_spin_lock" under handle_edge_irq, about one debug
        # boot in ten when the guest's TSC calibration fails). 2 GiB guests gain nothing from it.
        cmd += ["-accel", "tcg,thread=multi", "-cpu", "max,la57=off"]
    return cmd


def kvm_works(kernel_dir):
    """True if a KVM guest gets as far as printing the kernel banner (cached per host boot)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    verdict = CACHE / f"kvm-verdict-{boot_id}"
    if verdict.exists():
        return verdict.read_text().strip() == "kvm"
    with tempfile.TemporaryDirectory() as tmp:
        serial = Path(tmp) / "serial.log"
        proc = subprocess.Popen(qemu_cmd(kernel_dir, "kvm", "/bin/true", serial),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ok = False
        deadline = time.time() + 8
        while time.time() < deadline and proc.poll() is None:
            if serial.exists() and b"Linux version" in serial.read_bytes():
                ok = True
                break
            time.sleep(0.2)
        proc.kill()
        proc.wait()
    CACHE.mkdir(parents=True, exist_ok=True)
    verdict.write_text("kvm" if ok else "tcg")
    log(f"KVM {'boots' if ok else 'does not boot a guest here (it hangs)'}: using {'KVM' if ok else 'TCG'}")
    return ok


def scan_kernel_log(text, context=40):
    """Kernel log problems (Oops, WARNING, lockdep, ...) and the kernel lines without timestamps.

    The first problem is followed by the kernel lines that came with it (up to `context`: the
    rest of the report, its stack trace), so a failure seen only in CI's output can be read
    without its log, and says whether it came before the test script started (during boot,
    before the module could have been loaded)."""
    problems = []
    klines = []
    first = None
    started = False
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = KLOG_LINE.match(line)
        if not m:
            started = started or "BLKTAP-VM-START" in line
            continue
        klines.append(m.group(1))
        for pattern, what in BAD_PATTERNS:
            if pattern.search(m.group(1)):
                if first is None:
                    first = (i, started)
                problems.append(f"{what}: {line.strip()}")
                break
    if first is not None:
        i, during_test = first
        report = [l.strip() for l in lines[i:] if KLOG_LINE.match(l)][:context]
        when = "while the test ran" if during_test else "during boot, before the test started"
        problems.append(f"the first report ({when}):\n    " + "\n    ".join(report))
    return problems, klines


def parse_ktap(lines):
    """KUnit case results: a list of (suite, case, passed)."""
    results = []
    suites = []  # (indent, name)
    for line in lines:
        m = KTAP_SUBTEST.match(line)
        if m:
            indent = len(m.group(1))
            suites = [s for s in suites if s[0] < indent] + [(indent, m.group(2))]
            continue
        m = KTAP_CASE.match(line)
        if m:
            indent = len(m.group(1))
            name = m.group(4)
            # A case line is indented deeper than its suite's "# Subtest" line... or at the same
            # depth (KTAP v1 indents both). A suite's own result line closes it.
            owners = [s for s in suites if s[0] <= indent]
            if owners and owners[-1][1] == name and owners[-1][0] < indent:
                continue
            if owners and owners[-1][1] == name:
                suites.remove(owners[-1])
                continue
            if not owners:
                continue
            skipped = "# SKIP" in m.group(5)
            results.append((owners[-1][1], name, m.group(2) == "ok", skipped))
    return results


def run(args):
    kernel_dir = Path(args.kernel).resolve()
    if not (kernel_dir / "arch/x86/boot/bzImage").exists():
        log(f"no kernel in {kernel_dir}: run `make kernel` first")
        return 1, {}
    script = Path(args.script).resolve()
    accel = "kvm" if kvm_works(kernel_dir) else "tcg"
    serial = Path(args.log).resolve() if args.log else Path(tempfile.mkstemp(suffix=".log")[1])
    serial.parent.mkdir(parents=True, exist_ok=True)
    if serial.exists():
        serial.unlink()
    start = time.time()
    boot_failures = []
    # A guest that dies before its script starts (QEMU itself crashing under TCG on a loaded
    # host, or a panic in early boot) never ran the test: it is booted once more, and the
    # first boot's log is kept beside the log as .boot1. A test that started is never rerun.
    for attempt in (1, 2):
        proc = subprocess.Popen(qemu_cmd(kernel_dir, accel, script, serial, args.tsc_khz),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        timed_out = False
        try:
            _, err = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            _, err = proc.communicate()
        text = serial.read_bytes().decode("utf-8", "replace").replace("\r\n", "\n") if serial.exists() else ""
        if attempt == 1 and not timed_out and "BLKTAP-VM-START" not in text:
            kept = serial.with_name(serial.name + ".boot1")
            kept.write_text(text + f"\n(qemu: {err.decode(errors='replace').strip()[:300]})\n")
            boot_failures.append(f"the first boot died before the test started (log: {kept})")
            log(f"{script.name}: {boot_failures[-1]}; booting again")
            serial.unlink(missing_ok=True)
            continue
        break
    elapsed = time.time() - start

    problems, klines = scan_kernel_log(text)
    m = re.search(r"BLKTAP-VM-RESULT rc=(\d+)", text)
    rc = int(m.group(1)) if m else None
    kunit = parse_ktap(klines)

    if timed_out:
        problems.insert(0, f"timed out after {args.timeout}s")
    elif rc is None:
        tail = "\n".join(text.splitlines()[-15:])
        problems.insert(0, f"the guest ended without a result (qemu: {err.decode().strip()[:300]})\n{tail}")
    elif rc != 0:
        problems.insert(0, f"the test script exited {rc}")

    info = {"script": str(script), "accel": accel, "seconds": round(elapsed, 1), "rc": rc,
            "problems": problems, "kunit": kunit, "log": str(serial),
            "boot_failures": boot_failures}
    return (0 if not problems else 1), info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default=str(CACHE / "kernel/default"))
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--log", help="where to keep the guest's console log")
    ap.add_argument("--json", help="write the result as JSON here")
    ap.add_argument("--quiet", action="store_true", help="do not echo the guest console")
    ap.add_argument("--script-output", action="store_true",
                    help="echo only what the script printed (and blktap's kernel messages)")
    ap.add_argument("--tsc-khz", type=int, help="under TCG, the host's TSC rate: the guest then "
                    "uses the TSC as its clock, not 4 ms jiffies (scripts/bench)")
    ap.add_argument("script")
    args = ap.parse_args()
    status, info = run(args)
    if info and not args.quiet:
        text = Path(info["log"]).read_text(errors="replace").replace("\r\n", "\n")
        if args.script_output:
            # What the script printed, and the driver's own kernel messages.
            text = text[text.find("BLKTAP-VM-START"):]
            text = "\n".join(l for l in text.splitlines()
                              if not KLOG_LINE.match(l)
                              or ("blktap" in l and not re.search(r"ok \d|# Subtest|# blktap_", l))) + "\n"
        sys.stdout.write(text)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    for p in info.get("problems", []):
        log(f"FAIL {Path(args.script).name}: {p}")
    if info:
        log(f"{Path(args.script).name}: {'pass' if status == 0 else 'FAIL'} "
            f"({info['accel']}, {info['seconds']}s, log {info['log']})")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Self-tests of the VM runner's log scanner and KTAP parser (host side, no VM)."""

import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402

CLEAN = """\
[    0.000000] Linux version 7.3.4
[    0.000000] rcu: \tRCU lockdep checking is enabled.
[    0.000000] Lock dependency validator: Copyright (c) 2006 Red Hat, Inc., Ingo Molnar
[    0.100000] kasan: KernelAddressSanitizer initialized (generic)
[    3.1] blktap: loading out-of-tree module taints kernel.
ok - a test line that mentions WARNING: in user space output is not a kernel report
BLKTAP-VM-RESULT rc=0
"""


class ScanTest(unittest.TestCase):
    def test_clean_log_has_no_problem(self):
        problems, _ = run.scan_kernel_log(CLEAN)
        self.assertEqual(problems, [])

    def test_each_kind_of_report_is_caught(self):
        for line in [
            "WARNING: CPU: 0 PID: 1 at src/main.rs:10 blktap_init+0x10/0x20",
            "BUG: kernel NULL pointer dereference, address: 0000000000000008",
            "Oops: general protection fault, probably for non-canonical address",
            "WARNING: possible circular locking dependency detected",
            "BUG: KASAN: slab-use-after-free in blktap_free_tap",
            "UBSAN: array-index-out-of-bounds in src/ring.rs:100:5",
            "DEBUG_LOCKS_WARN_ON(1)",
            "INFO: task tapdisk:123 blocked for more than 20 seconds.",
            "rcu: INFO: rcu_sched detected stalls on CPUs/tasks:",
            "watchdog: BUG: soft lockup - CPU#0 stuck for 22s!",
            "rust_kernel: panicked at src/tap.rs:12:5:",
            "Call Trace:",
        ]:
            with self.subTest(line=line):
                problems, _ = run.scan_kernel_log(CLEAN + f"[   10.5] {line}\n")
                # The problem, then the report it starts.
                self.assertEqual(len(problems), 2, problems)
                self.assertIn(line, problems[1])

    def test_the_first_report_comes_with_its_lines_and_when_it_came(self):
        report = ("[    0.068000] BUG: KASAN: wild-memory-access in do_raw_spin_lock+0xbc/0x1d0\n"
                  "[    0.068000] Read of size 4 at addr 1fffffffffffff03 by task swapper/0/0\n"
                  "[    0.068000] Call Trace:\n"
                  "[    0.068000]  <TASK>\n"
                  "[    0.068000]  dump_stack_lvl+0x5d/0x80\n")
        head, tail = CLEAN.split("ok - ", 1)
        problems, _ = run.scan_kernel_log(head + report + "BLKTAP-VM-START t\nok - " + tail)
        self.assertEqual(len(problems), 3, problems)
        self.assertIn("during boot, before the test started", problems[2])
        self.assertIn("Read of size 4", problems[2])
        self.assertIn("dump_stack_lvl", problems[2])
        problems, _ = run.scan_kernel_log("BLKTAP-VM-START t\n" + report)
        self.assertIn("while the test ran", problems[-1])


class KtapTest(unittest.TestCase):
    LOG = [
        "KTAP version 1",
        "1..2",
        "    KTAP version 1",
        "    # Subtest: blktap_minors",
        "    # speed: normal",
        "    1..2",
        "    ok 1 hands_out_the_lowest_free_minor",
        "    not ok 2 refuses_out_of_range_and_taken_minors",
        "# blktap_minors: pass:1 fail:1 skip:0 total:2",
        "not ok 1 blktap_minors",
        "    KTAP version 1",
        "    # Subtest: blktap_uapi",
        "    1..1",
        "    ok 1 ring_geometry # SKIP not on this arch",
        "ok 2 blktap_uapi",
    ]

    def test_cases_are_counted_with_their_suite(self):
        self.assertEqual(run.parse_ktap(self.LOG), [
            ("blktap_minors", "hands_out_the_lowest_free_minor", True, False),
            ("blktap_minors", "refuses_out_of_range_and_taken_minors", False, False),
            ("blktap_uapi", "ring_geometry", True, True),
        ])


if __name__ == "__main__":
    unittest.main()

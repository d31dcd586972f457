"""The kernel mutant list (tests/mutants/kernel.toml) still applies to the code.

Each mutant's `find` must occur exactly once in its file, and the tests it names must exist:
otherwise `make mutants` stops before it starts. Checked in every `make test`, so a change to
the module that moves a mutated line fails here, next to the change, not hours later.
"""

import subprocess
import sys
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class MutantListTest(unittest.TestCase):
    def test_every_kernel_mutant_applies(self):
        p = subprocess.run([sys.executable, str(REPO / "scripts/mutants"), "--check"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        self.assertEqual(p.returncode, 0, p.stdout[-3000:])
        self.assertRegex(p.stdout, r"\d+ kernel mutants; every `find` occurs exactly once")


if __name__ == "__main__":
    unittest.main()

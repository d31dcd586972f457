"""The ABI check passes on the repo and fails on a kernel copy that drifted from the header."""
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "tests/host/abi_check.py"


def run(repo):
    return subprocess.run([sys.executable, str(CHECK), str(repo)], capture_output=True, text=True)


class AbiCheck(unittest.TestCase):
    def test_the_kernel_copy_matches_the_header(self):
        r = run(REPO)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_a_drifted_copy_fails(self):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "src").mkdir()
            (Path(d) / "include/uapi").mkdir(parents=True)
            shutil.copy(REPO / "include/uapi/blktap.h", Path(d) / "include/uapi")
            src = (REPO / "src/uapi.rs").read_text()
            for old, new in [("OP_FLUSH: u8 = 2", "OP_FLUSH: u8 = 5"),
                             ("pub(crate) status: i16,", "pub(crate) status: i32,")]:
                self.assertIn(old, src)
                (Path(d) / "src/uapi.rs").write_text(src.replace(old, new))
                r = run(d)
                self.assertEqual(r.returncode, 1, r.stdout)


if __name__ == "__main__":
    unittest.main()

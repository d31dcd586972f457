"""Host checks of the DKMS packaging (no VM).

dkms.conf names the module, the make command and the destination DKMS needs; `make dkms-source`
ships every file the module builds from; and DKMS builds blktap.ko from that tree against the
cached test kernel: a real `dkms add` + `dkms build` in a scratch DKMS tree when dkms is installed
(scripts/setup installs it), else dkms.conf's MAKE command run the way dkms 3.0 runs it.

    BLKTAP_KDIR=~/.cache/blktap2-rs/kernel/default python3 -m unittest -v tests/host/test_dkms.py
"""

import os
import platform
import re
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BLKTAP_CACHE", Path.home() / ".cache/blktap2-rs"))
KDIR = Path(os.environ.get("BLKTAP_KDIR", CACHE / "kernel/default")).resolve()
KSD = "/lib/modules/KVER/build"  # a kernel_source_dir to expand dkms.conf with

# dkms.conf as DKMS reads it: sourced by bash with DKMS's variables set; prints NAME=VALUE\0.
DUMP = r"""
set -e
kernelver=KVER; kernel_source_dir=$2; dkms_tree=/var/lib/dkms; arch=x86_64
source "$1"
for v in PACKAGE_NAME PACKAGE_VERSION AUTOINSTALL CLEAN BUILD_EXCLUSIVE_CONFIG; do
    printf '%s=%s\0' "$v" "${!v}"
done
for a in BUILT_MODULE_NAME BUILT_MODULE_LOCATION DEST_MODULE_LOCATION DEST_MODULE_NAME MAKE; do
    declare -n ref=$a
    printf '#%s=%s\0' "$a" "${#ref[@]}"
    for i in "${!ref[@]}"; do printf '%s[%s]=%s\0' "$a" "$i" "${ref[$i]}"; done
    unset -n ref
done
"""


def dkms_conf(path=REPO / "dkms.conf"):
    out = subprocess.run(["bash", "-c", DUMP, "dump", str(path), KSD], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return dict(item.split("=", 1) for item in out.split("\0") if item)


def run(cmd, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}")
    return p.stdout


def kernel_release():
    release = KDIR / "include/config/kernel.release"
    return release.read_text().strip() if release.exists() else None


def modinfo(ko, field):
    return run(["modinfo", "-F", field, str(ko)], env=dict(os.environ, PATH=os.environ["PATH"] + ":/usr/sbin:/sbin")).strip()


class DkmsConfTest(unittest.TestCase):
    def setUp(self):
        self.conf = dkms_conf()

    def test_names_the_module_kbuild_builds(self):
        self.assertEqual(self.conf["PACKAGE_NAME"], "blktap")
        self.assertEqual(self.conf["#BUILT_MODULE_NAME"], "1")
        self.assertEqual(self.conf["BUILT_MODULE_NAME[0]"], "blktap")
        kbuild = (REPO / "Kbuild").read_text()
        self.assertRegex(kbuild, r"(?m)^obj-m\s*:?=\s*blktap\.o\s*$")
        # kbuild puts an M= module's .ko at the top of the tree.
        self.assertIn(self.conf["BUILT_MODULE_LOCATION[0]"], (".", "./"))
        self.assertEqual(self.conf.get("#DEST_MODULE_NAME"), "0")

    def test_version_is_the_workspace_version(self):
        cargo = (REPO / "userspace/Cargo.toml").read_text()
        version = re.search(r'(?ms)^\[workspace\.package\].*?^version\s*=\s*"([^"]+)"', cargo).group(1)
        self.assertEqual(self.conf["PACKAGE_VERSION"], version)

    def test_destination_is_updates(self):
        # Where make install puts it too (updates/), in DKMS's own subdirectory; DKMS only
        # accepts /kernel..., /updates... or /extra....
        self.assertEqual(self.conf["#DEST_MODULE_LOCATION"], "1")
        self.assertEqual(self.conf["DEST_MODULE_LOCATION[0]"], "/updates/dkms")

    def test_make_and_clean_commands(self):
        self.assertEqual(self.conf["#MAKE"], "1")
        self.assertEqual(self.conf["MAKE[0]"], f"make KDIR={KSD} module")
        self.assertEqual(self.conf["CLEAN"], f"make KDIR={KSD} clean-module")
        self.assertEqual(self.conf["AUTOINSTALL"], "yes")
        self.assertEqual(self.conf["BUILD_EXCLUSIVE_CONFIG"].split(), ["CONFIG_RUST"])

    def test_the_make_command_builds_the_module_with_kbuild(self):
        if kernel_release() is None:
            self.skipTest(f"no kernel build in {KDIR}")
        # As DKMS runs it for a clang-built kernel (its -j and KERNELRELEASE first, its CC and LD
        # last), with kbuild's make replaced by echo: one kbuild call, with the kernel's LLVM.
        out = run(["make", "-j2", f"KERNELRELEASE={kernel_release()}", f"KDIR={KDIR}", "module",
                   "CC=clang", "LD=ld.lld", "MAKE=echo make"], cwd=REPO)
        self.assertEqual(out.strip().splitlines(),
                         [f"make -C {KDIR} M={REPO} LLVM=-19 CC=clang-19 LD=ld.lld-19 -s modules"])


class DkmsSourceTest(unittest.TestCase):
    def test_ships_every_source_of_the_module(self):
        if shutil.which("git") is None or not (REPO / ".git").exists():
            self.skipTest("not a git checkout")
        tracked = run(["git", "ls-files", "Kbuild", "Makefile", "dkms.conf", "src", "rust",
                       "include/uapi"], cwd=REPO).split()
        with tempfile.TemporaryDirectory() as tmp:
            run(["make", "-s", "dkms-source", f"DESTDIR={tmp}"], cwd=REPO)
            src = Path(tmp) / f"usr/src/blktap-{dkms_conf()['PACKAGE_VERSION']}"
            shipped = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
        self.assertEqual(shipped, sorted(tracked))


class DkmsBuildTest(unittest.TestCase):
    def setUp(self):
        self.kver = kernel_release()
        if self.kver is None:
            self.skipTest(f"no kernel build in {KDIR}")
        self.tmp = Path(tempfile.mkdtemp(prefix="blktap-dkms-"))
        self.addCleanup(shutil.rmtree, self.tmp)
        run(["make", "-s", "dkms-source", f"DESTDIR={self.tmp}/root"], cwd=REPO)
        self.version = dkms_conf()["PACKAGE_VERSION"]
        self.source = self.tmp / f"root/usr/src/blktap-{self.version}"

    def check_module(self, ko):
        self.assertTrue(ko.exists(), ko)
        self.assertEqual(modinfo(ko, "name"), "blktap")
        self.assertEqual(modinfo(ko, "vermagic").split()[0], self.kver)
        self.assertIn("request_timeout:", modinfo(ko, "parm"))

    def test_dkms_builds_the_module_for_the_cached_kernel(self):
        if shutil.which("dkms") is None:
            # Without dkms: its MAKE command, in a copy of the source, as dkms 3.0 runs it.
            build = self.tmp / "build"
            shutil.copytree(self.source, build)
            make = dkms_conf(build / "dkms.conf")["MAKE[0]"].replace(KSD, str(KDIR))
            make = make.replace("make", f"make -j2 KERNELRELEASE={self.kver}", 1)
            run(["bash", "-c", make + " CC=clang LD=ld.lld"], cwd=build)
            self.check_module(build / "blktap.ko")
            return
        tree = self.tmp / "dkms"
        tree.mkdir()
        where = ["--dkmstree", str(tree), "--sourcetree", str(self.source.parent)]
        run(["dkms", "add", "-m", "blktap", "-v", self.version] + where)
        out = run(["dkms", "build", "-m", "blktap", "-v", self.version, "-k", self.kver,
                   "--kernelsourcedir", str(KDIR)] + where)
        arch = platform.machine()
        self.check_module(tree / f"blktap/{self.version}/{self.kver}/{arch}/module/blktap.ko")
        self.assertIn("CC=clang", out)  # what the Makefile's CC=clang-19 overrides


if __name__ == "__main__":
    unittest.main()

# blktap2-rs: top-level targets. `make help` lists them.
#
# The kernel is built once into a cache outside the repo ($(CACHE)); KDIR points at that build,
# unless KDIR (a kernel build tree) or KVERSION (an installed kernel) names another one: then
# nothing is set up or built but the module (see README.md, "Install on a host").

SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/blktap2-rs
VARIANT ?= default

ifeq ($(origin KDIR)$(KVERSION),undefined)
KDIR := $(CACHE)/kernel/$(VARIANT)
KERNEL_DEP := kernel
else
KDIR ?= /lib/modules/$(KVERSION)/build
KERNEL_DEP :=
endif
# The kernel's release: its directory under /lib/modules.
KVERSION ?= $(shell cat $(KDIR)/include/config/kernel.release 2>/dev/null)

# A kernel built with clang (the test kernel: clang 19) builds its modules with the same LLVM
# (LLVM=-19, the name suffix of Debian's clang-19), a gcc-built one without. `LLVM=...` on the
# command line overrides. CC and LD are passed too: they win over a CC=clang that DKMS appends.
CLANG_MAJOR = $(shell sed -n 's/^CONFIG_CLANG_VERSION=\([1-9][0-9]*\)[0-9]\{4\}$$/\1/p' $(KDIR)/.config 2>/dev/null)
KLLVM = $(or $(LLVM),$(if $(CLANG_MAJOR),-$(CLANG_MAJOR)))
llvm_tool = $(if $(filter %/,$(KLLVM)),$(KLLVM))$(1)$(if $(filter -%,$(KLLVM)),$(KLLVM))
KBUILD_ARGS = -C $(KDIR) M=$(CURDIR) \
	$(if $(KLLVM),LLVM=$(KLLVM) CC=$(call llvm_tool,clang) LD=$(call llvm_tool,ld.lld))

# Installation (`make install`, `make uninstall`): DESTDIR is a staging root, PREFIX the tools'
# prefix. tap-ctl runs the tapdisk in LIBEXECDIR (the original's TAPDISK_EXECDIR), fixed when it
# is built: `make userspace` passes it on, so build and install with the same PREFIX.
DESTDIR ?=
PREFIX ?= /usr/local
SBINDIR ?= $(PREFIX)/sbin
BINDIR ?= $(PREFIX)/bin
LIBEXECDIR ?= $(PREFIX)/libexec
# The module goes to /lib/modules/$(KVERSION)/$(MODDIR) (the kernel's INSTALL_MOD_DIR).
MODDIR ?= updates
MODLIB = $(DESTDIR)/lib/modules/$(KVERSION)
RELEASE := userspace/target/release
# depmod and modinfo live in /sbin, which a user's PATH may lack.
export PATH := $(PATH):/usr/sbin:/sbin
# After installing or removing the module: depmod (of the DESTDIR tree). A package build that
# leaves it to the package's scripts passes DEPMOD=true, as for the kernel's modules_install.
DEPMOD ?= depmod
RUN_DEPMOD = $(DEPMOD) -a $(if $(DESTDIR),-b $(DESTDIR)) $(KVERSION)

# DKMS (`make dkms`): the module's sources, copied to /usr/src/blktap-<version>.
DKMS_VERSION = $(shell sed -n 's/^PACKAGE_VERSION="\(.*\)"$$/\1/p' dkms.conf)
DKMS_SRC = $(DESTDIR)/usr/src/blktap-$(DKMS_VERSION)
DKMS_FILES = dkms.conf Makefile Kbuild $(wildcard src/*.rs src/*/*.rs rust/*.rs rust/*.c rust/*.h include/uapi/*.h)

.PHONY: help setup kernel module userspace test test-debug test-kcsan demo bench mutants clean clean-module \
	install install-module install-tools uninstall dkms-source dkms dkms-remove need-kernel

help:
	@echo "make demo       set up everything, then show blktap in a VM (the main job)"
	@echo "make test       run every test (host checks, KUnit, VM tests)"
	@echo "make test-debug the same on the debug kernel (lockdep, KASAN, ...)"
	@echo "make test-kcsan the concurrency tests on a KCSAN (data-race detector) kernel"
	@echo "make bench      benchmark tapdev vs null_blk, rnull, ublk in a VM (bench/results.*)"
	@echo "make setup      install packages, toolchain and kernel source (idempotent)"
	@echo "make kernel     build the test kernel into the cache (once)"
	@echo "make module     build blktap.ko against the cached kernel (KVERSION=\$$(uname -r): the running one)"
	@echo "make userspace  build tap-ctl and tapdisk (PREFIX=/usr/local: where they will be installed)"
	@echo "make install    install blktap.ko (then depmod), tap-ctl, tapdisk (DESTDIR, PREFIX, KVERSION)"
	@echo "make uninstall  remove what make install installed"
	@echo "make dkms       copy the module's source to /usr/src/blktap-$(DKMS_VERSION), dkms add and install"
	@echo "make dkms-remove  dkms remove it from every kernel, and its source"
	@echo "make mutants    mutation testing: kernel mutants vs the VM tests, cargo-mutants (long)"

setup:
	@scripts/setup

kernel: setup
	@scripts/build-kernel $(VARIANT) >/dev/null

module: $(or $(KERNEL_DEP),need-kernel)
	@$(MAKE) $(KBUILD_ARGS) -s modules

userspace:
	@cd userspace && BLKTAP_LIBEXECDIR=$(LIBEXECDIR) cargo build --release --quiet

test:
	@scripts/test

test-debug:
	@scripts/test --variant debug

# The concurrency tests on a KCSAN kernel (built once into the cache, like the others).
test-kcsan:
	@scripts/test --variant kcsan --vm-only --no-debug

demo:
	@scripts/demo

# BENCH_ARGS: e.g. --profile, --rounds 10, --devices ublk-null,tapdev-null,null_blk, --smoke
# (see scripts/bench --help)
bench:
	@scripts/bench $(BENCH_ARGS)

# MUTANTS=id,id: only those kernel mutants (tests/mutants/kernel.toml); MUTANTS_ARGS: more options
mutants: kernel
	@scripts/mutants $(if $(MUTANTS),--only $(MUTANTS)) $(MUTANTS_ARGS)

clean: clean-module
	@cd userspace && cargo clean

clean-module:
	@[ -d $(KDIR) ] && $(MAKE) $(KBUILD_ARGS) -s clean || true

need-kernel:
	@[ -f $(KDIR)/Makefile ] && [ -n "$(KVERSION)" ] || { echo "make: no kernel build tree in" \
		"$(KDIR): install the kernel's headers, or name it with KDIR= or KVERSION=" >&2; exit 1; }

# Installs nothing it would have to build: `make module userspace` comes first (as a user; the
# install as root only copies).
install: install-module install-tools

install-module: need-kernel
	@[ -f blktap.ko ] || { echo "make install: no blktap.ko: run 'make module' first" >&2; exit 1; }
	@built=$$(modinfo -F vermagic blktap.ko | cut -d' ' -f1); [ "$$built" = "$(KVERSION)" ] || { \
		echo "make install: blktap.ko is built for kernel '$$built', not $(KVERSION):" \
			"run 'make module' with the same KDIR/KVERSION" >&2; exit 1; }
	$(MAKE) $(KBUILD_ARGS) -s INSTALL_MOD_PATH=$(DESTDIR) INSTALL_MOD_DIR=$(MODDIR) DEPMOD=true modules_install
	$(RUN_DEPMOD)

install-tools:
	@for t in tap-ctl tapdisk; do [ -x $(RELEASE)/$$t ] || { \
		echo "make install: no $(RELEASE)/$$t: run 'make userspace' first" >&2; exit 1; }; done
	@$(RELEASE)/tap-ctl --version | grep -qF '(tapdisk: $(LIBEXECDIR)/tapdisk)' || { \
		echo "make install: $(RELEASE)/tap-ctl runs tapdisk from elsewhere ($$($(RELEASE)/tap-ctl --version));" \
			"rebuild it: make userspace PREFIX=$(PREFIX)" >&2; exit 1; }
	install -D -m 0755 $(RELEASE)/tap-ctl $(DESTDIR)$(SBINDIR)/tap-ctl
	install -D -m 0755 $(RELEASE)/tapdisk $(DESTDIR)$(LIBEXECDIR)/tapdisk
	install -d $(DESTDIR)$(BINDIR)
	ln -sfr $(DESTDIR)$(LIBEXECDIR)/tapdisk $(DESTDIR)$(BINDIR)/tapdisk
	@# vhd-util, once the workspace builds one.
	@if [ -x $(RELEASE)/vhd-util ]; then \
		echo install -D -m 0755 $(RELEASE)/vhd-util $(DESTDIR)$(BINDIR)/vhd-util; \
		install -D -m 0755 $(RELEASE)/vhd-util $(DESTDIR)$(BINDIR)/vhd-util; fi

uninstall:
	@[ -n "$(KVERSION)" ] || { echo "make: which kernel's module? KVERSION=..." >&2; exit 1; }
	rm -f $(DESTDIR)$(SBINDIR)/tap-ctl $(DESTDIR)$(LIBEXECDIR)/tapdisk $(DESTDIR)$(BINDIR)/tapdisk \
		$(DESTDIR)$(BINDIR)/vhd-util
	rm -f $(MODLIB)/$(MODDIR)/blktap.ko $(MODLIB)/$(MODDIR)/blktap.ko.{gz,xz,zst}
	@if [ -d $(MODLIB) ]; then echo '$(RUN_DEPMOD)'; $(RUN_DEPMOD); fi

# The module's sources where DKMS expects them (DESTDIR too: a blktap-dkms package's files).
dkms-source:
	rm -rf $(DKMS_SRC)
	install -d $(DKMS_SRC)
	cp --parents $(DKMS_FILES) $(DKMS_SRC)/

# Adds and installs the module in DKMS, for the running kernel (or KVERSION=...); DKMS builds it
# again for each kernel installed later (AUTOINSTALL).
dkms: dkms-source
	dkms status -m blktap -v $(DKMS_VERSION) | grep -q . || dkms add -m blktap -v $(DKMS_VERSION)
	dkms install -m blktap -v $(DKMS_VERSION) $(if $(filter command line,$(origin KVERSION)),-k $(KVERSION))

dkms-remove:
	-dkms remove -m blktap -v $(DKMS_VERSION) --all
	rm -rf $(DKMS_SRC)

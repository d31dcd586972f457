# blktap2-rs: top-level targets. `make help` lists them.
#
# The kernel is built once into a cache outside the repo ($(CACHE)); KDIR points at that build.

SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/blktap2-rs
VARIANT ?= default
KDIR ?= $(CACHE)/kernel/$(VARIANT)

.PHONY: help setup kernel module userspace test test-debug demo bench clean mutants

help:
	@echo "make demo       set up everything, then show blktap in a VM (the main job)"
	@echo "make test       run every test (host checks, KUnit, VM tests)"
	@echo "make test-debug the same on the debug kernel (lockdep, KASAN, ...)"
	@echo "make bench      benchmark tapdev vs null_blk, rnull, ublk in a VM (bench/results.*)"
	@echo "make setup      install packages, toolchain and kernel source (idempotent)"
	@echo "make kernel     build the test kernel into the cache (once)"
	@echo "make module     build blktap.ko against the cached kernel"
	@echo "make userspace  build tap-ctl and tapdisk"
	@echo "make mutants    mutation testing: kernel mutants vs the VM tests, cargo-mutants (long)"

setup:
	@scripts/setup

kernel: setup
	@scripts/build-kernel $(VARIANT) >/dev/null

module: kernel
	@$(MAKE) -s -C $(KDIR) M=$(CURDIR) LLVM=-19 modules

userspace:
	@cd userspace && cargo build --release --quiet

test:
	@scripts/test

test-debug:
	@scripts/test --variant debug

demo:
	@scripts/demo

# BENCH_ARGS: e.g. --profile, --runs 5, --smoke (see scripts/bench --help)
bench:
	@scripts/bench $(BENCH_ARGS)

# MUTANTS=id,id: only those kernel mutants (tests/mutants/kernel.toml); MUTANTS_ARGS: more options
mutants: kernel
	@scripts/mutants $(if $(MUTANTS),--only $(MUTANTS)) $(MUTANTS_ARGS)

clean:
	@[ -d $(KDIR) ] && $(MAKE) -s -C $(KDIR) M=$(CURDIR) LLVM=-19 clean || true
	@cd userspace && cargo clean

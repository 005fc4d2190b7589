# kvmpy: `make run` runs the main job, `make test` runs the whole test suite.
# Both install what they need on a fresh Debian machine (system packages through apt-get when
# missing, Python packages into .venv).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvmpy-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages kvmpy needs (installed by `deps` when missing): a C compiler and <linux/kvm.h>
# for the cffi extension, binutils (as, ld) for guests, cpio (tests read initramfs archives back),
# libslirp0 (--net user), qemu-system-x86 (the hwvirt tests' nested run on software-KVM hosts),
# e2fsprogs (mkfs.ext4/debugfs for the virtio-blk hwvirt test), venv support for the virtualenv.

.PHONY: all run demo guest test test-nested build deps bench clean doctor

all: build

# Boots the default Linux guest (Debian's kernel + busybox initramfs, built on first use); on a
# host whose KVM cannot boot Linux (software KVM such as PVM) it says so and runs the demo.
run: build
	$(VENV)/bin/kvmpy up --stats

guest: build
	$(VENV)/bin/kvmpy image

demo: build
	$(VENV)/bin/kvmpy demo --stats

doctor: build
	$(VENV)/bin/kvmpy doctor

test: build
	$(PY) -m pytest -q -ra tests

# The hwvirt tests the suite skips on a software-KVM host, run for real inside a QEMU TCG VM
# that emulates AMD SVM (tests/nested/hwvirt_in_qemu.py, ~6 minutes; nothing to do on a
# VT-x/AMD-V host, where the suite runs them). Not in `make test`: the nested stack fails too
# often (L1 kernel panic, L2 triple faults and stalls; see the script's docstring).
test-nested: build
	$(PY) tests/nested/hwvirt_in_qemu.py --if-needed

# System packages: only installed when something is missing (so CI and developers with them
# already present need no root).
deps:
	@missing=""; \
	command -v gcc >/dev/null || missing="$$missing gcc libc6-dev"; \
	command -v as >/dev/null && command -v ld >/dev/null || missing="$$missing binutils"; \
	[ -f /usr/include/linux/kvm.h ] || missing="$$missing linux-libc-dev"; \
	command -v cpio >/dev/null || missing="$$missing cpio"; \
	ldconfig -p 2>/dev/null | grep -q libslirp.so.0 || missing="$$missing libslirp0"; \
	command -v qemu-system-x86_64 >/dev/null || missing="$$missing qemu-system-x86"; \
	command -v mkfs.ext4 >/dev/null && command -v debugfs >/dev/null || missing="$$missing e2fsprogs"; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "kvmpy needs Python >= 3.11; set PYTHON=python3.11 or newer")'

$(STAMP): pyproject.toml setup.py | deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

build: $(STAMP) kvmpy/_kvm.stamp kvmpy/guests/demo.bin
	@$(PY) -m compileall -q kvmpy >/dev/null   # .pyc even where PYTHONDONTWRITEBYTECODE is set

# the cffi extension, rebuilt in place whenever its definition changes
kvmpy/_kvm.stamp: kvmpy/_kvm_build.py kvmpy/virtio/fastblk.c $(STAMP)
	$(PY) kvmpy/_kvm_build.py
	touch $@

kvmpy/guests/demo.bin: kvmpy/guests/demo.S kvmpy/_kvm.stamp | $(STAMP)
	$(PY) -c 'from kvmpy.guests import build_demo; build_demo()'

bench: build
	$(MAKE) -C benchmarks PY=$(abspath $(PY))

clean:
	rm -rf $(VENV) build dist *.egg-info kvmpy/_kvm.c kvmpy/_kvm.o kvmpy/_kvm*.so \
	  kvmpy/_kvm.stamp kvmpy/guests/demo.bin .pytest_cache

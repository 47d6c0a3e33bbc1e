# The two commands a newcomer runs on a fresh Debian 12 machine, as root:
#   make demo   sets everything up and runs the demo
#   make test   sets everything up and runs ruff, mypy and the tests
# Both are idempotent: a second run installs nothing new.

SHELL := /bin/bash
# The virtual environment lives outside the checkout so that unprivileged test
# users (and slurmd's prolog, which has no PATH) can run it wherever the clone is.
VENV ?= /opt/shifter-sshd/venv
PY := $(VENV)/bin/python
# Slow artefacts (debootstrap images, the udiImage bundle) are cached here.
export SHIFTER_SSHD_LAB_CACHE ?= /var/cache/shifter-sshd-lab
export SHIFTER_SSHD_VENV := $(VENV)

APT_PACKAGES := python3 python3-venv python3-dev gcc make squashfs-tools squashfs-tools-ng \
	debootstrap busybox-static openssh-server openssh-client slurm-wlm slurmctld slurmd \
	munge libslurm-dev iproute2 util-linux psmisc procps zstd xz-utils openmpi-bin mpich \
	libopenmpi-dev libmpich-dev skopeo docker-registry apache2-utils squashfuse fuse3 bubblewrap

.PHONY: demo test setup lint typecheck pytest bench clean-lab

# The commands start Python isolated (-I): a user's PYTHONHOME, PYTHONPATH or user
# site-packages can neither break nor hijack shifter, nor the plugin's checks; the
# prolog and epilog skip the site module too (shifter_sshd/commands/launchers.py says why).
setup: $(VENV)/.installed
	@$(PY) -m pip install -q --no-deps --no-build-isolation . >/dev/null
	@$(PY) -m shifter_sshd.commands.launchers >/dev/null

# Debian starts sshd, munged, slurmd and slurmctld on install; the lab runs its own,
# so a temporary policy-rc.d (exit 101) keeps the packages' daemons from starting.
$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	@missing=$$(dpkg-query -W -f='$${Status} $${Package}\n' $(APT_PACKAGES) 2>&1 | grep -v '^install ok installed' || true); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$(echo "$$missing" | awk '{print $$NF}' | tr '\n' ' ')"; \
		created=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
			chmod 755 /usr/sbin/policy-rc.d; created=1; }; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			-o DPkg::Lock::Timeout=600 $(APT_PACKAGES); status=$$?; \
		[ -z "$$created" ] || rm -f /usr/sbin/policy-rc.d; \
		[ $$status -eq 0 ] || exit $$status; \
	fi
	@[ -x $(PY) ] || /usr/bin/python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip setuptools wheel
	@$(PY) -m pip install -q -c constraints.txt '.[test]'
	@chmod -R a+rX $(dir $(VENV))
	@touch $@

lint: setup
	$(VENV)/bin/ruff check shifter_sshd lab tests benchmarks
	$(VENV)/bin/ruff format --check shifter_sshd lab tests benchmarks

typecheck: setup
	$(VENV)/bin/mypy

# Every test once on Debian 12's Slurm 22.05, then the cluster tests again on 24.11 and
# 26.05 (lab/slurmroots.py: a Debian root each, built once into the cache, ~45 s).
OTHER_SLURM := 24.11 26.05

pytest: setup
	SHIFTER_SSHD_LAB_SLURM=22.05 $(PY) -m pytest $(PYTEST_ARGS)
	@for version in $(OTHER_SLURM); do \
		echo "== the cluster tests on Slurm $$version"; \
		SHIFTER_SSHD_LAB_SLURM=$$version $(PY) -m pytest -m cluster $(PYTEST_ARGS) || exit 1; \
	done

test: lint typecheck pytest

demo: setup
	SHIFTER_SSHD_LAB_SLURM=$${SHIFTER_SSHD_LAB_SLURM:-26.05} $(PY) -m lab.demo

bench: setup
	$(PY) -m benchmarks.run

clean-lab:
	rm -rf $(SHIFTER_SSHD_LAB_CACHE)

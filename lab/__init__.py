"""The lab: test users, test images and the virtual Slurm cluster.

Used by the tests, the benchmarks and ``make demo``; never by the package itself.
Slow artefacts are cached under $SHIFTER_SSHD_LAB_CACHE, outside the checkout.
"""

import os

CACHE = os.environ.get("SHIFTER_SSHD_LAB_CACHE", "/var/cache/shifter-sshd-lab")
VENV = os.environ.get("SHIFTER_SSHD_VENV", "/opt/shifter-sshd/venv")

"""shifter-sshd: a per-job container root with an sshd only the job owner can enter.

The package is split one module per concern; the prolog and epilog (``lifecycle/prolog.py``,
``lifecycle/epilog.py``) read as lists of steps, each a call into one of those modules.
Modules import lazily because the prolog is on every job's start path.
"""

__version__ = "0.1.0"

"""jobworker: run commands as isolated, observable jobs on a Linux host."""

__version__ = "0.1.0"

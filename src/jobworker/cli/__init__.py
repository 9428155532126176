"""jobctl, the command-line client (``python -m jobworker.cli``)."""

"""gpud: a scheduler daemon that runs Python functions on the GPUs of a machine you own."""

__version__ = "0.1.0"

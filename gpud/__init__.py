"""gpud: a scheduler daemon that runs Python functions on the GPUs of a machine you own."""

try:
    # Written by setuptools-scm from the git tag when gpud is built or installed (#16).
    from gpud._version import __version__ as __version__
except ImportError:  # a source tree that was never built nor installed
    __version__ = "0.0.0+unknown"

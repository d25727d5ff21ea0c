"""`python -m gpud` is the `gpud` command."""

from gpud.cli import main

main()

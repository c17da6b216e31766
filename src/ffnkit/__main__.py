"""``python -m ffnkit`` = the ``ffnkit`` command (handy where the package is not installed: PYTHONPATH=src)."""

from ffnkit.cli.main import main

main()

"""``python -m approxrun``: the same as the ``approxrun`` command."""

from approxrun.cli import main

main()

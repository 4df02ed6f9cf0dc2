"""``python -m zevents``: the command line."""

from .cli import main

main()

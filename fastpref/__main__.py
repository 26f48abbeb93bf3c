"""``python -m fastpref bench ...``: the same as the ``fastpref`` command."""
import sys

from fastpref.cli import main

if __name__ == "__main__":
    sys.exit(main())

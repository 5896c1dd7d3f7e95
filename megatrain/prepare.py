"""``python -m megatrain.prepare``: the same command as ``megatrain-prepare`` (``megatrain.cli.prepare``)."""

import sys

from megatrain.cli.prepare import main

if __name__ == "__main__":
    sys.exit(main())

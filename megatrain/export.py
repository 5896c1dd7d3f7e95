"""``python -m megatrain.export``: the same command as ``megatrain-export`` (``megatrain.cli.export``)."""

import sys

from megatrain.cli.export import main

if __name__ == "__main__":
    sys.exit(main())

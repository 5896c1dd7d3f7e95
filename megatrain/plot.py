"""``python -m megatrain.plot``: the same command as ``megatrain-plot`` (``megatrain.cli.plot``)."""

import sys

from megatrain.cli.plot import main

if __name__ == "__main__":
    sys.exit(main())

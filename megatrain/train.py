"""``python -m megatrain.train``: the same command as ``megatrain-train`` (``megatrain.cli.train``)."""

import sys

from megatrain.cli.train import main

if __name__ == "__main__":
    sys.exit(main())

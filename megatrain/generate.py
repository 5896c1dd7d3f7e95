"""``python -m megatrain.generate``: the same command as ``megatrain-generate`` (``megatrain.cli.generate``)."""

import sys

from megatrain.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())

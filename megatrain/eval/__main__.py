"""``python -m megatrain.eval``: the same command as ``megatrain-eval`` (``megatrain.cli.eval``)."""

import sys

from megatrain.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())

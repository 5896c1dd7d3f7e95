"""``python -m megatrain.plan``: the same command as ``megatrain-plan`` (``megatrain.cli.plan``)."""

import sys

from megatrain.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())

"""python -m lbe_ops.bench: the same as the lbe-bench command."""

import sys

from lbe_ops.bench.cli import main

sys.exit(main())

"""python -m lbe_ops.bench: the same as the lbe-bench command."""

import sys

from lbe_ops_cli import bench_main

sys.exit(bench_main())

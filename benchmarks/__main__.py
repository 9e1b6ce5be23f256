"""`python -m benchmarks`: the benchmark suite (benchmarks/bench.py)."""
import sys

from .bench import main

sys.exit(main())

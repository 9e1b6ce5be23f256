"""bnfused's benchmark suite, run as `python -m benchmarks [--quick | --full] ...` (`make bench`) from the repository
root, so that bnfused is this checkout's. bench.py runs the parts (one module each) and writes every table they
return into the results file."""

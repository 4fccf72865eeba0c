"""Kernel benchmark (issue 3): ``python bench/kernel_ops.py [--quick | --smoke] [--json PATH]``.

The benchmark lives in ``fastadapters.bench.kernels`` (``fastadapters bench`` prints its quick table
too); this script is its command line, appending to bench/results/kernels.json by default.
"""
import os
import sys

from fastadapters.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main(default_json=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels.json")))

"""fastddpm's benchmark suite: ``pytest bench/ --benchmark-only`` (pytest-benchmark) or
``python -m bench.run`` (no pytest-benchmark); ``python -m bench.report RESULTS.json``;
``bash bench/gpu.sh`` on a GPU. See bench/common.py."""

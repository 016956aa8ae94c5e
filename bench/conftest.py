"""Bench session setup: the repository on sys.path, TRITON_INTERPRET on a CPU-only machine (both
done by importing bench.common before any fastddpm.kernels import), and the dynamo limits."""
from bench import common

common.configure()

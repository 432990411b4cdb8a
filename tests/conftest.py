"""Test setup: 8 fake CPU devices (set before JAX initializes its backend) and float64 on demand.

`--xla_backend_optimization_level=0` and `--xla_llvm_disable_expensive_passes` skip LLVM's
optimization passes in XLA:CPU: the suite's time is mostly compilation of tiny programs, and this
halves it (the numerics are the same IEEE operations; no test here measures speed).
"""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

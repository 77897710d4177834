"""Tests run in float64, so tolerances can follow from the methods' orders.

Dtype promotion stays "standard": flax's normalization layers promote against float32 internally
(`jnp.promote_types(dtype, float32)`), which "strict" promotion rejects for float64 inputs. Test
models are built with `param_dtype=jnp.float64` instead.

The suite compiles hundreds of small programs and runs each a few times, so LLVM's optimisation of
XLA's CPU code costs more than it saves: `--xla_backend_optimization_level=0` makes the suite about
1.5x faster. It keeps the algorithms (XLA's CPU fast-math is off at every level, so no reassociation
is licensed) and the buffer assignment (memory statistics come from XLA's HLO passes, before LLVM);
results can still differ in the last digits, where LLVM would have fused a multiply-add, which is far
below every tolerance of the suite. `--xla_cpu_use_fusion_emitters=false` compiles XLA's CPU
fusions with its elemental emitters instead of the MLIR fusion pipeline: the same HLO, the same
arithmetic, and 30 % less time for a compile-bound module (tests/test_adjoints.py alone: 88 s ->
59 s). Subprocesses inherit both.
"""
import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
     "--xla_cpu_use_fusion_emitters=false"]).strip()

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)

jax.config.update("jax_enable_x64", True)

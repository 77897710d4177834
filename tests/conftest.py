"""Tests run in float64, so tolerances can follow from the methods' orders.

Dtype promotion stays "standard": flax's normalization layers promote against float32 internally
(`jnp.promote_types(dtype, float32)`), which "strict" promotion rejects for float64 inputs. Test
models are built with `param_dtype=jnp.float64` instead.
"""
import jax

jax.config.update("jax_enable_x64", True)

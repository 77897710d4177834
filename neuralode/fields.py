"""Vector fields f(t, y) as flax.nnx modules: the only place a network lives.

Every field is called as `field(t, y, args=None)` and returns dy/dt with the shape of `y`, so a field
is a `diffrax.ODETerm` vector field as it is (`args` is accepted and unused). `odeint` splits a
field into its graph and parameters itself. Depth-varying parameters (one theta_k per residual
block) are a `DepthStack`: the parameters carry a leading depth axis and step k of a fixed-step
solve uses slice k for all of its stages, so an L-step Euler solve of a `DepthStack` of L fields is
an L-block ResNet.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

M = TypeVar("M", bound=nnx.Module)


def _with_time(t, y):
    """Append t as one extra feature (or channel) to y: the "concat" time conditioning of
    Chen et al. 2018, torchdiffeq's ConcatConv2d."""
    t_feature = jnp.broadcast_to(jnp.asarray(t, y.dtype), y.shape[:-1] + (1,))
    return jnp.concatenate([y, t_feature], axis=-1)


def im2col_conv(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None,
                preferred_element_type=None, **unused_sharding):
    """A stride-1, channels-last convolution as one matrix product of the stacked shifted windows
    (im2col), with the signature of `lax.conv_general_dilated` that `nnx.Conv` calls.

    The same numbers as XLA's convolution. Inside loops (`lax.scan`, diffrax's while loop) XLA:CPU
    runs the gradient of a convolution ~20x slower than this (measured on an 8-block ConvField
    ResNet, batch 64, 8x8x32), while slices and matrix products keep their speed.
    """
    del dimension_numbers, unused_sharding  # nnx.Conv passes channels-last numbers
    if (any(s != 1 for s in window_strides) or feature_group_count != 1
            or any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))):
        raise ValueError("im2col_conv supports stride 1, no dilation and one group, got strides "
                         f"{window_strides}, groups {feature_group_count}")
    kernel = rhs.shape[:-2]
    if isinstance(padding, str):
        if padding != "SAME":
            raise ValueError(f"im2col_conv supports SAME padding, got {padding!r}")
        padding = [((k - 1) // 2, k // 2) for k in kernel]
    padded = jnp.pad(lhs, [(0, 0), *padding, (0, 0)])
    out = [n + lo + hi - k + 1 for n, (lo, hi), k in zip(lhs.shape[1:-1], padding, kernel)]
    windows = [padded[(slice(None), *(slice(o, o + n) for o, n in zip(offset, out)))]
               for offset in itertools.product(*(range(k) for k in kernel))]
    return jnp.dot(jnp.concatenate(windows, axis=-1), rhs.reshape(-1, rhs.shape[-1]),
                   precision=precision, preferred_element_type=preferred_element_type)


def field_conv(lhs, rhs, window_strides, padding, **options):
    """The convolution of `ConvField`: `im2col_conv` on the CPU backend, XLA's elsewhere."""
    if jax.default_backend() == "cpu":
        return im2col_conv(lhs, rhs, window_strides, padding, **options)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)


class MLPField(nnx.Module):
    """f(t, y) = W_n s(... s(W_1 [y, t] + b_1) ...) + b_n on the last axis of y (any batch axes).

    `time_dependent` appends t to the input of every layer; `activation` s is applied between layers.
    """

    def __init__(self, features: int, hidden: int = 64, layers: int = 2, *,
                 time_dependent: bool = False, activation: Callable = jnp.tanh,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        extra = 1 if time_dependent else 0
        sizes = [features] + [hidden] * (layers - 1) + [features]
        self.layers = nnx.List([nnx.Linear(sizes[i] + extra, sizes[i + 1], param_dtype=param_dtype,
                                            rngs=rngs) for i in range(layers)])
        self.time_dependent = time_dependent
        self.activation = activation

    def __call__(self, t, y, args=None):
        h = y
        for i, layer in enumerate(self.layers):
            if i > 0:
                h = self.activation(h)
            h = layer(_with_time(t, h) if self.time_dependent else h)
        return h


class ConvField(nnx.Module):
    """f(t, y) = conv_2(s(norm_2(conv_1(s(norm_1(y)))))) with "same" padding, channels last
    (NWC for `spatial_dims=1`, NHWC for 2): the pre-activation residual branch of He et al. 2016
    and the ODE function of Chen et al. 2018. Convolutions run through `field_conv`.
    `time_dependent` feeds t as an extra input channel to both convolutions; `norm` adds GroupNorm (gcd(32, channels) groups, so any width works)
    before each activation.
    """

    def __init__(self, channels: int, hidden: int | None = None, *, kernel_size: int = 3,
                 spatial_dims: int = 2, time_dependent: bool = False, norm: bool = False,
                 activation: Callable = jax.nn.relu, param_dtype=jnp.float32, rngs: nnx.Rngs):
        hidden = hidden or channels
        extra = 1 if time_dependent else 0
        kernel = (kernel_size,) * spatial_dims
        self.conv1 = nnx.Conv(channels + extra, hidden, kernel, padding="SAME",
                              param_dtype=param_dtype, conv_general_dilated=field_conv, rngs=rngs)
        self.conv2 = nnx.Conv(hidden + extra, channels, kernel, padding="SAME",
                              param_dtype=param_dtype, conv_general_dilated=field_conv, rngs=rngs)
        if norm:
            self.norm1 = nnx.GroupNorm(channels, num_groups=math.gcd(32, channels),
                                       param_dtype=param_dtype, rngs=rngs)
            self.norm2 = nnx.GroupNorm(hidden, num_groups=math.gcd(32, hidden),
                                       param_dtype=param_dtype, rngs=rngs)
        self.norm = norm
        self.time_dependent = time_dependent
        self.activation = activation

    def __call__(self, t, y, args=None):
        h = self.activation(self.norm1(y) if self.norm else y)
        h = self.conv1(_with_time(t, h) if self.time_dependent else h)
        h = self.activation(self.norm2(h) if self.norm else h)
        return self.conv2(_with_time(t, h) if self.time_dependent else h)


class DepthStack(nnx.Module):
    """`depth` copies of a field with independent parameters, stored with a leading depth axis.

    `make_field(rngs)` builds one field; each copy is initialised from its own split of `rngs`.
    Solved with a fixed-step solver over exactly `depth` steps, step k uses copy k for all of its
    stages. `layer(k)` returns copy k as an ordinary field.
    """

    def __init__(self, make_field: Callable[[nnx.Rngs], nnx.Module], depth: int, *,
                 rngs: nnx.Rngs):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return make_field(rngs)

        self.layers = create(rngs)
        self.depth = depth

    def layer(self, k: int) -> nnx.Module:
        """Copy k as an ordinary field; k in [-depth, depth), negative counting from the last. A
        traced k (inside a scan) is not checked: JAX clamps an index beyond the stack to its end."""
        if not isinstance(k, jax.core.Tracer):
            if isinstance(k, bool) or np.ndim(k) != 0 \
                    or not np.issubdtype(np.asarray(k).dtype, np.integer) \
                    or not -self.depth <= int(k) < self.depth:
                raise IndexError(f"k: expected an int in [-{self.depth}, {self.depth}) for a "
                                 f"DepthStack of depth {self.depth}, got {k!r}")
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda x: x[k], state))

    def __call__(self, t, y, args=None):
        raise TypeError("a DepthStack has one field per step: integrate it with odeint and a "
                        "fixed-step solver, or call .layer(k)(t, y)")


# XLA's lowest backend optimisation (LLVM at -O0), for programs run once: initialisers, counts,
# memory statistics. The algorithm is the same (XLA's CPU fast-math is off at every level).
LOWEST_OPTIMISATION = {"xla_backend_optimization_level": 0}


def compiled_init(make: Callable[[], M]) -> M:
    """The module `make()` builds, with its initialisers run as one compiled program.

    Eagerly, each initialiser's operations compile one by one, and a truncated normal compiles in
    0.5-1 s on a CPU core (6 s for a small ResNet before its first training step); one program
    compiled at XLA's lowest backend optimisation takes 0.6 s and runs once. The values are the
    eager ones up to the last bit (LLVM may fuse a multiply-add differently). `make` takes no
    arguments, makes its own `nnx.Rngs` from a seed and must be traceable (a constructor that
    turns arrays into numpy or Python numbers cannot be compiled; build it eagerly)."""
    if isinstance(jnp.zeros(()), jax.core.Tracer):  # under a transformation: part of its program
        return make()
    graphdef = None

    def init():
        nonlocal graphdef  # static: the structure, known once traced
        graphdef, state = nnx.split(make())
        return state

    state = jax.jit(init, compiler_options=LOWEST_OPTIMISATION)()
    return nnx.merge(graphdef, state)

"""Classifiers built from one vector field and `odeint`: ResNet, PlainNet, RK-Net, ODE-Net, ANODE.

Every model has the same layout (channels last: NWC with `spatial_dims=1`, NHWC with 2):

    stem conv -> stage 0 -> transition -> stage 1 -> ... -> ReLU, global average pool -> dense

A *transition* halves the resolution once: y = P(x) + G(x) with the projection shortcut
P = 1x1 conv of stride 2 and the branch G = conv(stride 2) . ReLU . conv . ReLU (He et al. 2016); it
is the only place where shapes change, so it is the only projection. A *stage* is the dynamics
block, and only it differs between the models, all stepping a `ConvField` f(t, y):

- `ResNet`: L residual blocks y_{k+1} = y_k + h F_k(y_k) = L Euler steps of a `DepthStack`
  (one theta_k per block; h = `step_size`, 1 for the usual ResNet).
- `PlainNet`: the same fields without the identity path, y_{k+1} = F_k(y_k) (claims B1/B2).
- `RKNet`: one weight-tied, time-conditioned field stepped by RK4 (or another explicit Runge-Kutta
  method), backprop through the steps (the RK-Net of Chen et al. 2018, Table 1).
- `ODENet`: the same field integrated adaptively (Dopri5/Tsit5) over [0, `horizon`], gradients by
  the continuous adjoint or by checkpointing (Chen et al. 2018); with `augment_channels=k`, k zero
  channels concatenated before every ODE block (ANODE: Dupont et al. 2019, "Augmented Neural ODEs").
- Optional RNODE regularisation (Finlay et al. 2020, "How to train your neural ODE"): the kinetic
  energy int ||f||^2 dt and the Jacobian Frobenius norm int ||e^T df/dy||^2 dt (Hutchinson,
  e ~ N(0, I) drawn once per solve from the model's own `nnx.Rngs`) integrated as extra state.

Options shared by all: `channels` (one width per stage), `spatial_dims`, `kernel_size`,
`stem_kernel_size`, `norm` (GroupNorm in the fields), `activation`, `param_dtype`.

`model(x)` returns logits; `model.forward(x)` returns `(logits, stats)` with the forward NFE summed
over stages, `failed_solves` and, for RNODE in training mode, the regularisation terms;
`neuralode.train.classification_loss` adds the regulariser to the loss and logs the NFE.

Failures are reported, not raised, by `forward`: every stage solves with `throw=False`, and
`failed_solves` counts the stages whose solve did not succeed (max_steps reached, a non-finite field
or a non-finite input state), so the compiled train step holds no host callback (JAX's compilation
cache keeps it, and a data-parallel step is one program); `train` raises after any step with
`failed_solves > 0`. `model(x)` raises such a failure itself (`equinox.error_if`).
"""
from __future__ import annotations

import abc
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from neuralode.adaptive import RESULTS
from neuralode.adjoints import AbstractAdjoint, BacksolveAdjoint, DiscreteAdjoint
from neuralode.fields import ConvField, DepthStack
from neuralode.integrate import solve
from neuralode.solvers import RK4, AbstractRungeKutta, AbstractSolver, Dopri5, Euler


def _check_positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Transition(nnx.Module):
    """Downsample once: y = P(x) + G(x), P a 1x1 stride-2 projection, G = conv(s(conv_s2(s(x))))."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int, spatial_dims: int,
                 activation: Callable, param_dtype, rngs: nnx.Rngs):
        kernel, stride = (kernel_size,) * spatial_dims, (2,) * spatial_dims
        self.projection = nnx.Conv(in_channels, out_channels, (1,) * spatial_dims, strides=stride,
                                   param_dtype=param_dtype, rngs=rngs)
        self.conv1 = nnx.Conv(in_channels, out_channels, kernel, strides=stride, padding="SAME",
                              param_dtype=param_dtype, rngs=rngs)
        self.conv2 = nnx.Conv(out_channels, out_channels, kernel, padding="SAME",
                              param_dtype=param_dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, x):
        s = self.activation
        return self.projection(x) + self.conv2(s(self.conv1(s(x))))


class _Classifier(nnx.Module, abc.ABC):
    """Stem, stages, transitions and head; subclasses build `self.stages` and define `_stage`."""

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int], *,
                 spatial_dims: int, kernel_size: int, stem_kernel_size: int,
                 activation: Callable, param_dtype, rngs: nnx.Rngs,
                 stage_channels: Sequence[int] | None = None):
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("kernel_size", kernel_size), ("stem_kernel_size", stem_kernel_size)):
            _check_positive_int(name, value)
        channels = tuple(channels)
        if not channels or not all(isinstance(c, int) and c >= 1 for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got "
                             f"{channels!r}")
        if spatial_dims not in (1, 2):
            raise ValueError(f"spatial_dims must be 1 (NWC sequences) or 2 (NHWC images), got "
                             f"{spatial_dims!r}")
        stage_channels = tuple(stage_channels or channels)  # wider than channels for ANODE
        self.spatial_dims, self.in_channels, self.activation = spatial_dims, in_channels, activation
        self.stem = nnx.Conv(in_channels, channels[0], (stem_kernel_size,) * spatial_dims,
                             padding="SAME", param_dtype=param_dtype, rngs=rngs)
        self.transitions = nnx.List([
            Transition(stage_channels[i], channels[i + 1], kernel_size=kernel_size,
                       spatial_dims=spatial_dims, activation=activation, param_dtype=param_dtype,
                       rngs=rngs)
            for i in range(len(channels) - 1)])
        self.head = nnx.Linear(stage_channels[-1], num_classes, param_dtype=param_dtype, rngs=rngs)

    @abc.abstractmethod
    def _stage(self, index: int, y) -> tuple[jax.Array, dict, RESULTS]:
        """Stage `index` applied to `y`: the new state, its statistics (`nfe`, ...) and the
        status of its solve (`RESULTS`)."""

    def forward(self, x) -> tuple[jax.Array, dict]:
        """Logits and statistics: `nfe` (field evaluations of the forward pass, all stages),
        `failed_solves` (stages whose solve failed: their states are not to be trusted), for
        fixed-step models `nfe_backward` (those of backprop), for RNODE models in training mode
        `kinetic`, `jacobian` and `regularisation`."""
        logits, stats, _ = self._forward(x)
        return logits, stats

    def __call__(self, x) -> jax.Array:
        """The logits; raises (when the program runs) if a stage's solve failed."""
        logits, _, result = self._forward(x)
        return result.error_if(logits, result != RESULTS.successful)

    def _forward(self, x) -> tuple[jax.Array, dict, RESULTS]:
        """Logits, statistics and the status of the first stage whose solve failed."""
        expected = self.spatial_dims + 2
        if x.ndim != expected or x.shape[-1] != self.in_channels:
            layout = "NWC" if self.spatial_dims == 1 else "NHWC"
            raise ValueError(f"x must be a {layout} batch of {expected} axes with "
                             f"{self.in_channels} channel(s) last, got shape {x.shape}")
        y, totals, result = self.stem(x), {}, RESULTS.successful
        for index in range(len(self.stages)):
            if index > 0:
                y = self.transitions[index - 1](y)
            y, stats, status = self._stage(index, y)
            failed = status != RESULTS.successful
            stats["failed_solves"] = failed.astype(jnp.int32)
            result = RESULTS.where(result == RESULTS.successful, status, result)
            for name, value in stats.items():
                totals[name] = totals.get(name, 0) + value
        pooled = jnp.mean(self.activation(y), axis=tuple(range(1, y.ndim - 1)))
        return self.head(pooled), totals, result


def _stacks(channels, blocks, kernel_size, spatial_dims, norm, activation, param_dtype, rngs):
    def make(width):
        return lambda rngs: ConvField(width, kernel_size=kernel_size, spatial_dims=spatial_dims,
                                      norm=norm, activation=activation, param_dtype=param_dtype,
                                      rngs=rngs)

    return nnx.List([DepthStack(make(c), blocks, rngs=rngs) for c in channels])


class _DepthStackNet(_Classifier):
    """Stages of `blocks` depth-varying `ConvField`s (a `DepthStack` each), one per block at
    t_k = k * step_size: the layout that ResNet and PlainNet share."""

    def __init__(self, in_channels: int, num_classes: int, *, channels: Sequence[int] = (32, 64),
                 blocks: int = 2, step_size: float = 1.0, spatial_dims: int = 2,
                 kernel_size: int = 3, stem_kernel_size: int = 3, norm: bool = False,
                 activation: Callable = jax.nn.relu, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(in_channels, num_classes, channels, spatial_dims=spatial_dims,
                         kernel_size=kernel_size, stem_kernel_size=stem_kernel_size,
                         activation=activation, param_dtype=param_dtype, rngs=rngs)
        self.blocks = _check_positive_int("blocks", blocks)
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size!r}")
        self.step_size = float(step_size)
        self.stages = _stacks(channels, blocks, kernel_size, spatial_dims, norm, activation,
                              param_dtype, rngs)


class ResNet(_DepthStackNet):
    """Stages of `blocks` residual blocks y_{k+1} = y_k + h F_k(y_k), computed as `blocks` Euler
    steps of a `DepthStack` of `ConvField`s over [0, blocks * step_size] (He et al. 2016, in the
    pre-activation form; Haber & Ruthotto 2017 and E 2017 for the ODE view)."""

    def _stage(self, index, y):
        ts = jnp.array([0.0, self.blocks * self.step_size], y.dtype)
        sol = solve(self.stages[index], y, ts, solver=Euler(), substeps=self.blocks, throw=False)
        stats = {"nfe": sol.stats["nfe"], "nfe_backward": sol.stats["nfe_backward"]}
        return sol.ys[-1], stats, sol.result


class PlainNet(_DepthStackNet):
    """The ResNet's fields and parameter layout without the identity path: y_{k+1} = F_k(y_k),
    a `lax.scan` over the `DepthStack`'s parameter slices (the plain baseline of claims B1/B2)."""

    def _stage(self, index, y):
        graphdef, stacked = nnx.split(self.stages[index].layers)

        def block(y, k_and_layer):
            k, layer = k_and_layer
            return nnx.merge(graphdef, layer)(k * self.step_size, y), None

        ks = jnp.arange(self.blocks, dtype=y.dtype)
        stats = {"nfe": self.blocks, "nfe_backward": self.blocks}  # one vjp per block
        return jax.lax.scan(block, y, (ks, stacked))[0], stats, RESULTS.successful


def _tied_fields(channels, kernel_size, spatial_dims, norm, activation, param_dtype, rngs):
    return nnx.List([ConvField(c, kernel_size=kernel_size, spatial_dims=spatial_dims,
                               time_dependent=True, norm=norm, activation=activation,
                               param_dtype=param_dtype, rngs=rngs) for c in channels])


class RKNet(_Classifier):
    """One weight-tied, time-conditioned `ConvField` per stage, `steps` RK4 steps over
    [0, horizon], trained by backprop through the steps (RK-Net of Chen et al. 2018). `solver`:
    another explicit Runge-Kutta method (`Euler()`, `Midpoint()`, `Heun()`). Its parameters are an
    `ODENet`'s, so a trained ODE-Net's field can be stepped with fixed steps by copying them
    (`nnx.update(rk_net, nnx.state(ode_net, nnx.Param))`)."""

    def __init__(self, in_channels: int, num_classes: int, *, channels: Sequence[int] = (32, 64),
                 steps: int = 2, horizon: float = 1.0, solver: AbstractSolver = RK4(),
                 spatial_dims: int = 2, kernel_size: int = 3, stem_kernel_size: int = 3,
                 norm: bool = False, activation: Callable = jax.nn.relu, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if not isinstance(solver, AbstractRungeKutta):
            raise ValueError(f"solver must be an explicit Runge-Kutta method (Euler(), Midpoint(), "
                             f"Heun() or RK4()), got {solver!r}; use ODENet for adaptive steps")
        super().__init__(in_channels, num_classes, channels, spatial_dims=spatial_dims,
                         kernel_size=kernel_size, stem_kernel_size=stem_kernel_size,
                         activation=activation, param_dtype=param_dtype, rngs=rngs)
        self.steps = _check_positive_int("steps", steps)
        self.solver = solver
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon!r}")
        self.horizon = float(horizon)
        self.stages = _tied_fields(channels, kernel_size, spatial_dims, norm, activation,
                                   param_dtype, rngs)

    def _stage(self, index, y):
        ts = jnp.array([0.0, self.horizon], y.dtype)
        sol = solve(self.stages[index], y, ts, solver=self.solver, substeps=self.steps,
                    adjoint=DiscreteAdjoint(), throw=False)
        stats = {"nfe": sol.stats["nfe"], "nfe_backward": sol.stats["nfe_backward"]}
        return sol.ys[-1], stats, sol.result


class RNODEDynamics(nnx.Module):
    """The field with the RNODE integrands as extra state (Finlay et al. 2020):

        d/dt (y, K, J) = (f(t, y), ||f(t, y)||^2, ||e^T df/dy (t, y)||^2)   per example,

    sums over all non-batch axes; `noise` e has the shape of y. E_e[J] = int ||df/dy||_F^2 dt."""

    def __init__(self, field: nnx.Module, noise: jax.Array):
        self.field = field
        self.noise = nnx.Variable(noise)

    def __call__(self, t, state, args=None):
        y = state[0]
        f, vjp = jax.vjp(lambda y: self.field(t, y), y)
        (e_jac,) = vjp(self.noise[...])
        axes = tuple(range(1, y.ndim))
        return f, jnp.sum(f**2, axis=axes), jnp.sum(e_jac**2, axis=axes)


def rnode_solve(field: nnx.Module, y0, noise, horizon: float = 1.0, **solve_options):
    """Solve dy/dt = field(t, y) over [0, horizon] together with the RNODE integrands; returns
    `(y1, kinetic, jacobian, stats, result)` with `kinetic`, `jacobian` per example (leading axis
    of y0) and the solve's status (`Solution.result`).

    The integrands are quadratures: the step-size controller bounds the error of y alone, so the
    regularised training solve takes the steps of the unregularised evaluation solve (controlling
    K and J as well doubled the training NFE of an MNIST-1D ODE-Net, 188 against 98)."""
    if noise.shape != y0.shape:
        raise ValueError(f"noise must have the shape of y0 {y0.shape}, got {noise.shape}")
    zeros = jnp.zeros(y0.shape[:1], y0.dtype)
    sol = solve(RNODEDynamics(field, noise), (y0, zeros, zeros),
                jnp.array([0.0, horizon], y0.dtype), controlled=lambda state: state[0],
                **solve_options)
    y, kinetic, jacobian = (part[-1] for part in sol.ys)
    return y, kinetic, jacobian, sol.stats, sol.result


class ODENet(_Classifier):
    """One weight-tied, time-conditioned `ConvField` per stage integrated adaptively over
    [0, horizon] (Chen et al. 2018). `adjoint`: `BacksolveAdjoint()` (continuous adjoint, memory
    independent of the number of steps) or `CheckpointAdjoint()` (backprop with recomputation).

    ANODE: with `augment_channels=k` > 0, k zero channels are concatenated to y before every ODE
    block (Dupont et al. 2019), so the flow runs in a wider space and can untangle what a
    homeomorphism of the input space cannot; the transitions and the head read the wider state.

    RNODE: with `kinetic_weight` or `jacobian_weight` > 0 the training-mode forward integrates the
    regularisers alongside y and reports `regularisation = kinetic_weight * mean K + jacobian_weight
    * mean J` in its stats; `neuralode.train.classification_loss` adds it to the loss. In eval mode
    (`model.eval()`, as `train` leaves it) only y is integrated.
    """

    def __init__(self, in_channels: int, num_classes: int, *, channels: Sequence[int] = (32, 64),
                 horizon: float = 1.0, solver: AbstractSolver = Dopri5(),
                 adjoint: AbstractAdjoint = BacksolveAdjoint(), rtol: float = 1e-3,
                 atol: float = 1e-3, max_steps: int = 1000, kinetic_weight: float = 0.0,
                 jacobian_weight: float = 0.0, augment_channels: int = 0, spatial_dims: int = 2,
                 kernel_size: int = 3, stem_kernel_size: int = 3, norm: bool = False,
                 activation: Callable = jax.nn.relu, param_dtype=jnp.float32, seed: int = 0,
                 rngs: nnx.Rngs):
        if not isinstance(solver, AbstractSolver) or not solver.adaptive:
            raise ValueError(f"solver must be an adaptive solver (Dopri5() or Tsit5()), got "
                             f"{solver!r}; use RKNet for fixed steps")
        if not isinstance(adjoint, AbstractAdjoint):
            raise TypeError(f"adjoint must be BacksolveAdjoint() or CheckpointAdjoint(), got "
                            f"{adjoint!r}")
        if not isinstance(augment_channels, int) or augment_channels < 0:
            raise ValueError(f"augment_channels must be an int >= 0, got {augment_channels!r}")
        for name, value in (("horizon", horizon), ("rtol", rtol), ("atol", atol)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        for name, value in (("kinetic_weight", kinetic_weight),
                            ("jacobian_weight", jacobian_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        widths = tuple(c + augment_channels for c in channels)
        super().__init__(in_channels, num_classes, channels, spatial_dims=spatial_dims,
                         kernel_size=kernel_size, stem_kernel_size=stem_kernel_size,
                         activation=activation, param_dtype=param_dtype, rngs=rngs,
                         stage_channels=widths)
        self.stages = _tied_fields(widths, kernel_size, spatial_dims, norm, activation,
                                   param_dtype, rngs)
        self.augment_channels = augment_channels
        self.horizon, self.solver, self.adjoint = float(horizon), solver, adjoint
        self.rtol, self.atol, self.max_steps = float(rtol), float(atol), _check_positive_int(
            "max_steps", max_steps)
        self.kinetic_weight, self.jacobian_weight = float(kinetic_weight), float(jacobian_weight)
        self.regularised = kinetic_weight > 0 or jacobian_weight > 0
        self.noise_rngs = nnx.Rngs(noise=seed)  # Hutchinson noise; its counter is checkpointed
        self.deterministic = False  # set by model.train() / model.eval()

    def _solve_options(self):
        return dict(solver=self.solver, adjoint=self.adjoint, rtol=self.rtol, atol=self.atol,
                    max_steps=self.max_steps, throw=False)

    def _stage(self, index, y):
        if self.augment_channels:
            y = jnp.concatenate([y, jnp.zeros(y.shape[:-1] + (self.augment_channels,), y.dtype)],
                                axis=-1)
        field = self.stages[index]
        if self.regularised and not self.deterministic:
            noise = jax.random.normal(self.noise_rngs.noise(), y.shape, y.dtype)
            y, kinetic, jacobian, stats, result = rnode_solve(field, y, noise, self.horizon,
                                                              **self._solve_options())
            kinetic, jacobian = jnp.mean(kinetic), jnp.mean(jacobian)
            return y, {"nfe": stats["nfe"], "kinetic": kinetic, "jacobian": jacobian,
                       "regularisation": self.kinetic_weight * kinetic
                       + self.jacobian_weight * jacobian}, result
        sol = solve(field, y, jnp.array([0.0, self.horizon], y.dtype), **self._solve_options())
        return sol.ys[-1], {"nfe": sol.stats["nfe"]}, sol.result

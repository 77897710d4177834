"""Classifiers by name: the solver and adjoint tables, `ModelSpec`, `build_model` and `rebuild`.

A `ModelSpec` is a small frozen record of names and numbers (JSON-able, so a training run can save
it and refuse to resume under another); `build_model(spec, dataset)` makes the classifier of
`neuralode.models.classifiers` it describes, for the inputs and classes of `dataset`. A model's
settings are never changed after it is built: `rebuild(model, spec, dataset)` builds the changed
spec and copies `model`'s parameters into it (another tolerance, another fixed-step solver for a trained field).

    spec = ModelSpec(model="odenet", channels=(32, 64), rtol=1e-5, kinetic_weight=1e-4)
    model = build_model(spec, dataset)
    looser = rebuild(model, dataclasses.replace(spec, rtol=1e-3, atol=1e-3), dataset)
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from neuralode.adjoints import BacksolveAdjoint, CheckpointAdjoint, DiscreteAdjoint
from neuralode.data import Dataset
from neuralode.fields import compiled_init
from neuralode.models.classifiers import ODENet, PlainNet, ResNet, RKNet
from neuralode.solvers import (RK4, AbstractRungeKutta, Dopri5, Euler, Heun, Leapfrog, Midpoint,
                               Tsit5)

# Every solver and adjoint by the one name a flag or a saved setting uses.
SOLVERS = {cls.__name__: cls for cls in (Euler, Midpoint, Heun, RK4, Leapfrog, Dopri5, Tsit5)}
ADJOINTS = {"discrete": DiscreteAdjoint, "checkpoint": CheckpointAdjoint,
            "backsolve": BacksolveAdjoint}
RUNGE_KUTTA = tuple(n for n, c in SOLVERS.items() if issubclass(c, AbstractRungeKutta))  # RKNet's
ADAPTIVE = tuple(n for n, c in SOLVERS.items() if c.adaptive)  # ODENet's

MODELS = {"resnet": ResNet, "plainnet": PlainNet, "rknet": RKNet, "odenet": ODENet}


def _help(default, text: str, **extra):
    return dataclasses.field(default=default, metadata={"help": text, **extra})


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A classifier of `neuralode.models` by name and numbers; the help texts say which model each
    setting applies to (the others ignore it)."""

    model: str = _help("resnet", "resnet (Euler steps of depth-varying blocks), plainnet (the "
                       "same without the identity), rknet (fixed steps of a weight-tied field) "
                       "or odenet (that field integrated adaptively; ANODE with "
                       "augment_channels > 0)", choices=tuple(MODELS))
    channels: tuple[int, ...] = _help((32, 64), "width of each stage (one transition between "
                                      "consecutive stages halves the resolution)")
    blocks: int = _help(3, "residual blocks per stage (resnet, plainnet)")
    steps: int = _help(1, "solver steps per stage (rknet)")
    solver: str = _help("", "Euler, Midpoint, Heun or RK4 (rknet; default RK4), Dopri5 or Tsit5 "
                        "(odenet; default Dopri5); resnet and plainnet take none",
                        choices=RUNGE_KUTTA + ADAPTIVE)
    adjoint: str = _help("backsolve", "gradient of the adaptive solve: backsolve (continuous "
                         "adjoint, memory constant in the number of steps), checkpoint (backprop with "
                         "recomputation) or discrete (backprop storing every step) (odenet)",
                         choices=tuple(ADJOINTS))
    rtol: float = _help(1e-3, "relative tolerance of the step-size controller (odenet)")
    atol: float = _help(1e-3, "absolute tolerance of the step-size controller (odenet)")
    kinetic_weight: float = _help(0.0, "RNODE weight of the kinetic energy int ||f||^2 dt, "
                                  "summed over all activations (odenet)")
    jacobian_weight: float = _help(0.0, "RNODE weight of the Jacobian norm int ||df/dy||_F^2 dt "
                                   "(Hutchinson estimate), summed over all activations (odenet)")
    augment_channels: int = _help(0, "zero channels added before every ODE block: ANODE when "
                                  "> 0 (odenet)")
    stem_kernel_size: int = _help(3, "kernel size of the first convolution")
    norm: bool = _help(True, "GroupNorm in the fields")
    seed: int = _help(0, "seed of the initial parameters (and of RNODE's Hutchinson noise)")

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))  # as read back from JSON
        if self.model not in MODELS:
            raise ValueError(f"model: unknown {self.model!r}, expected one of {tuple(MODELS)}")
        if self.adjoint not in ADJOINTS:
            raise ValueError(f"adjoint: unknown {self.adjoint!r}, expected one of "
                             f"{tuple(ADJOINTS)}")
        allowed = {"rknet": RUNGE_KUTTA, "odenet": ADAPTIVE}.get(self.model, ())
        if self.solver and self.solver not in allowed:
            expected = f"one of {allowed}" if allowed else "none (it steps as it is defined)"
            raise ValueError(f"solver: {self.model} takes {expected}, got {self.solver!r}")


def build_model(spec: ModelSpec, dataset: Dataset) -> nnx.Module:
    """The classifier `spec` describes, for the inputs of `dataset` (1-D convolutions for NWC
    sequences, 2-D for NHWC images; channels last) and its number of classes."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec: expected a ModelSpec, got {type(spec).__name__}")
    cls = MODELS[spec.model]
    options = dict(channels=spec.channels, spatial_dims=dataset.x_train.ndim - 2,
                   stem_kernel_size=spec.stem_kernel_size, norm=spec.norm)
    if cls in (ResNet, PlainNet):
        options.update(blocks=spec.blocks)
    elif cls is RKNet:
        options.update(steps=spec.steps, solver=SOLVERS[spec.solver or "RK4"]())
    else:
        options.update(solver=SOLVERS[spec.solver or "Dopri5"](),
                       adjoint=ADJOINTS[spec.adjoint](), rtol=spec.rtol, atol=spec.atol,
                       kinetic_weight=spec.kinetic_weight, jacobian_weight=spec.jacobian_weight,
                       augment_channels=spec.augment_channels, seed=spec.seed)
    return compiled_init(lambda: cls(dataset.x_train.shape[-1], dataset.num_classes, **options,
                                     rngs=nnx.Rngs(spec.seed)))


def rebuild(model: nnx.Module, spec: ModelSpec, dataset: Dataset) -> nnx.Module:
    """`build_model(spec, dataset)` holding the variables of `model`: its parameters (which must
    match the new model's, path by path and shape by shape) and whatever other state the new
    model has (the ODE-Net's noise counter). How a trained model is evaluated at another
    tolerance, or its field stepped by a fixed-step solver (an RK-Net holding an ODE-Net's
    parameters). Built abstractly, so no initialiser runs; `model` is not changed."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(spec, dataset)))
    source = dict(nnx.to_flat_state(nnx.state(nnx.clone(model))))
    target = list(nnx.to_flat_state(abstract))

    def fits(path, variable):
        found = source.get(path)
        return (type(found) is type(variable) and jnp.shape(found[...]) == variable.shape
                and jnp.result_type(found[...]) == variable.dtype)

    params = {path for path, v in target if isinstance(v, nnx.Param)}
    unfit = sorted({path for path, v in target if not fits(path, v)}
                   | {path for path, v in source.items() if isinstance(v, nnx.Param)} ^ params,
                   key=str)
    if unfit:
        shown = ", ".join("/".join(map(str, path)) for path in unfit[:4])
        raise ValueError(f"model: its parameters do not fit {spec} ({len(unfit)} variable(s) "
                         f"missing, extra or of another shape: {shown})")
    state = nnx.from_flat_state([(path, source[path]) for path, _ in target])
    return nnx.merge(graphdef, state)

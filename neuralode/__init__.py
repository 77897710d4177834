"""neuralode: residual networks as ODE solvers, with one dynamics core.

A residual block y_{k+1} = y_k + h f(t_k, y_k; theta_k) is one explicit Euler step of the vector field
f. `odeint` integrates a field with an adaptive solver (the default, Dopri5: a continuous-depth neural
ODE, through diffrax; any diffrax solver passes through) or a fixed-step one asked for by name (a
discrete-depth network: Euler = ResNet, RK4 = RK-Net, Leapfrog = Hamiltonian net), and
differentiates the integration with the chosen adjoint.

Training: `train.train(model, dataset, train.TrainConfig(...), workdir)` runs a resumable loop;
`make_train_state`, `make_train_step` and `classification_loss` are its pure step, for loops of
your own.
"""

from neuralode import analysis, data, fields, models, multigrid, train
from neuralode.adaptive import RESULTS
from neuralode.adjoints import (BacksolveAdjoint, CheckpointAdjoint, DiscreteAdjoint,
                                ReconstructionWarning)
from neuralode.fields import ConvField, DepthStack, MLPField, compiled_init
from neuralode.integrate import Solution, backsolve_reconstruction_error, odeint, solve
from neuralode.solvers import RK4, Dopri5, Euler, Heun, Leapfrog, Midpoint, Tsit5
from neuralode.train_step import classification_loss, make_train_state, make_train_step

__all__ = [
    "BacksolveAdjoint", "CheckpointAdjoint", "ConvField", "DepthStack", "DiscreteAdjoint",
    "Dopri5", "Euler", "Heun", "Leapfrog", "MLPField", "Midpoint", "RESULTS", "RK4",
    "ReconstructionWarning", "Solution", "Tsit5",
    "analysis", "backsolve_reconstruction_error", "classification_loss", "compiled_init", "data",
    "fields",
    "make_train_state", "make_train_step", "models", "multigrid", "odeint", "solve", "train",
]

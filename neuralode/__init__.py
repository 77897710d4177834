"""neuralode: residual networks as ODE solvers, with one dynamics core.

A residual block y_{k+1} = y_k + h f(t_k, y_k; theta_k) is one explicit Euler step of the vector field
f. `odeint` integrates a field with a fixed-step solver (a discrete-depth network: Euler = ResNet,
RK4 = RK-Net, Leapfrog = Hamiltonian net) or an adaptive one (a continuous-depth neural ODE, through
diffrax), and differentiates the integration with the chosen adjoint.
"""

from neuralode import analysis, data, fields, models, multigrid, train
from neuralode.adjoints import BacksolveAdjoint, CheckpointAdjoint, DiscreteAdjoint
from neuralode.fields import ConvField, DepthStack, MLPField
from neuralode.integrate import Solution, backsolve_reconstruction_error, odeint, solve
from neuralode.solvers import RK4, Dopri5, Euler, Heun, Leapfrog, Midpoint, Tsit5

__all__ = [
    "BacksolveAdjoint", "CheckpointAdjoint", "ConvField", "DepthStack", "DiscreteAdjoint",
    "Dopri5", "Euler", "Heun", "Leapfrog", "MLPField", "Midpoint", "RK4", "Solution", "Tsit5",
    "analysis", "backsolve_reconstruction_error", "data", "fields", "models", "multigrid",
    "odeint", "solve", "train",
]

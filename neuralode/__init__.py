"""neuralode: residual networks as ODE solvers, with one dynamics core.

A residual block y_{k+1} = y_k + h f(t_k, y_k; theta_k) is one explicit Euler step of the vector field
f. `odeint` integrates a field with a fixed-step solver (a discrete-depth network: Euler = ResNet,
RK4 = RK-Net, Leapfrog = Hamiltonian net) or an adaptive one (a continuous-depth neural ODE, through
diffrax), and differentiates the integration with the chosen adjoint.
"""

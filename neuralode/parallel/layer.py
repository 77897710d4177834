"""Layer-parallel depth: a ResNet's forward and backward passes solved by MGRIT over devices.

A ResNet of N blocks is N forward-Euler steps u_{n+1} = Phi_n(u_n) = u_n + h f_n(t_n, u_n) of a
`DepthStack` field; every m-th state is a coarse point U_j = u_{jm}. `neuralode.parallel.mgrit`
solves U_{j+1} = Phi_{jm+m-1} o ... o Phi_{jm}(U_j) (fine propagator: the network's own m steps)
with the coarse propagator Psi_j(U) = U + m h f_{jm}(t_{jm}, U), one Euler step of size m h with
the field of the coarse point's layer (Guenther, Ruthotto, Schroder, Cyr & Gauger 2020,
"Layer-parallel training of deep residual neural networks", SIAM J. Math. Data Sci. 2(1);
torchbraid's training defaults are 2 forward and 1 backward iteration, far from the N/m that make
it exact). The coarse step must be stable: m h times the field's Lipschitz constant grows as a
network trains, and with it the convergence factor (the statistics and the fallback watch it).

The gradient: the discrete adjoint a_n = a_{n+1} dPhi_n/du_n + g_n, a_N = g_N (g_n the cotangent of
u_n) runs backwards in depth and is again a sequence of steps, solved by the same MGRIT with the
vector-Jacobian products of the network's steps around the forward states as fine propagator and
those of Psi_j as coarse one; its last F-relaxation gives dL/dtheta_n = a_{n+1} dPhi_n/dtheta_n.
`jax.grad` through `layer_parallel_solve` runs it (a `jax.custom_vjp`); `layer_parallel_vjp` runs
it and returns its statistics.

The parameters' depth axis is sharded over the mesh axis `depth` (`jax.shard_map`): each of P
devices holds N/P consecutive layers, N/(mP) coarse intervals, and the states of its layers.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as Spec

from neuralode.fields import DepthStack
from neuralode.parallel.mgrit import MGRIT, Ring
from neuralode.parallel.mgrit import solve as solve_mgrit
from neuralode.solvers import Euler

DEPTH = "depth"


def depth_mesh(devices: int | None = None) -> Mesh:
    """A one-axis mesh named `depth` over the first `devices` of `jax.devices()` (None: all)."""
    available = jax.devices()
    count = len(available) if devices is None else devices
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= len(available):
        raise ValueError(f"devices must be an int in [1, {len(available)}] (the devices JAX sees) "
                         f"or None, got {devices!r}")
    return Mesh(np.array(available[:count]), (DEPTH,))


def shard_layers(module: nnx.Module, mesh: Mesh) -> None:
    """Place the arrays of `module` on `mesh`, in place: those of every `DepthStack` in it split by
    layer over the axis `depth` (each device keeps the layers it steps), all others replicated.

    For training, call it on the model and build the optimiser inside `jax.set_mesh(mesh)`, so that
    its state is created on the mesh as well: the train step then compiles once, with the
    parameters where `layer_parallel_solve` uses them."""
    _check_mesh(mesh)
    devices = mesh.shape[DEPTH]
    stacks = [sub for _, sub in nnx.iter_modules(module) if isinstance(sub, DepthStack)]
    for stack in stacks:
        if stack.depth % devices:
            raise ValueError(f"a DepthStack of depth {stack.depth} cannot be split over the "
                             f"{devices} devices of the mesh axis {DEPTH!r}")
    nnx.update(module, jax.device_put(nnx.state(module), NamedSharding(mesh, Spec())))
    for stack in stacks:
        nnx.update(stack, jax.device_put(nnx.state(stack), NamedSharding(mesh, Spec(DEPTH))))


class LayerParallelSolution(NamedTuple):
    """`states`: u_0 .. u_{N-1}, the state entering every layer (leading axis N, sharded by depth
    where the solve left them); `y1`: the output u_N. `ys` joins them (leading axis N + 1, ys[0] =
    y0); take `y1` for the output alone: joining reshards every state between the devices.
    `stats` (forward solve): `iterations` done; `residuals` (K + 1,), the residual norm of the
    initial coarse guess and after each iteration (nan after the last); `rho` (K,), their ratios;
    `diverged` (a residual grew); `unconverged` (tol given and missed); `fallback` (the serial
    solve replaced the result)."""

    states: object
    y1: object
    stats: dict

    @property
    def ys(self):
        return jax.tree.map(lambda s, y: jnp.concatenate([s, y[None]]), self.states, self.y1)


# ---------------------------------------------------------------------------------------------
# The network's steps, split over the devices.

class _Problem(NamedTuple):
    """What does not change during a solve: the layer graph, the state layout, the grid."""

    graphdef: object
    unravel: Callable
    depth: int
    settings: MGRIT
    mesh: Mesh

    @property
    def devices(self) -> int:
        return self.mesh.shape[DEPTH]

    @property
    def intervals(self) -> int:
        """Coarse intervals per device."""
        return self.depth // (self.settings.coarsening * self.devices)

    def step(self, n, layer, u, t0, h, size):
        """Euler step n (global index) of size `size` with one layer's parameters, on flat u."""
        params, rest = layer
        field = nnx.merge(self.graphdef, params, rest).layers  # the DepthStack's field, one slice
        y = Euler().step(lambda t, y, args: field(t, y), t0 + n.astype(h.dtype) * h,
                         self.unravel(u), size, None)
        return ravel_pytree(y)[0]

    def local(self, tree):
        """This device's layers as (intervals, m, ...), with the index of its first interval."""
        m = self.settings.coarsening
        shaped = jax.tree.map(lambda x: x.reshape((self.intervals, m) + x.shape[1:]), tree)
        return shaped, lax.axis_index(DEPTH) * self.intervals

    def propagators(self, layers, t0, h):
        """MGRIT's propagators of the forward solve on this device (inside `shard_map`):
        fine(i, v) -> (end, states), the m steps of local interval i from v, keeping each step's
        start; coarse(i, v), Psi: one step of size m h with the interval's first layer."""
        m = self.settings.coarsening
        layers, first = self.local(layers)

        def fine(i, v):
            def body(u, s):
                layer = jax.tree.map(lambda x: x[i, s], layers)
                return self.step((first + i) * m + s, layer, u, t0, h, h), u
            return lax.scan(body, v, jnp.arange(m))

        def coarse(i, v):
            layer = jax.tree.map(lambda x: x[i, 0], layers)
            return self.step((first + i) * m, layer, v, t0, h, m * h)
        return fine, coarse

    def adjoint_propagators(self, layers, states, cotangents, t0, h):
        """Those of the adjoint solve, from the last interval (i counts the intervals backwards):
        fine(i, a) -> (end, parameter gradients) by the vector-Jacobian products of the m steps
        around the forward `states` (u_n of this device's layers), adding the `cotangents` of the
        states; coarse(i, a) by Psi's."""
        m, n = self.settings.coarsening, self.intervals
        layers, first = self.local(layers)
        states, cotangents = (x.reshape((n, m) + x.shape[1:]) for x in (states, cotangents))

        def fine(i, a):
            k = n - 1 - i

            def body(a, s):  # the steps go from the interval's last to its first
                params, rest = jax.tree.map(lambda x: x[k, s], layers)
                step = lambda u, params: self.step(  # noqa: E731
                    (first + k) * m + s, (params, rest), u, t0, h, h)
                a_u, a_params = jax.vjp(step, states[k, s], params)[1](a)
                return a_u + cotangents[k, s], a_params
            return lax.scan(body, a, jnp.arange(m), reverse=True)

        def coarse(i, a):
            k = n - 1 - i
            layer = jax.tree.map(lambda x: x[k, 0], layers)
            step = lambda u: self.step((first + k) * m, layer, u, t0, h, m * h)  # noqa: E731
            return jax.vjp(step, states[k, 0])[1](a)[0] + cotangents[k, 0]
        return fine, coarse

    def shard_map(self, fn, in_specs, out_specs):
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                             axis_names={DEPTH})


def _from_device(index, x):
    """The value of x on device `index`, on every device."""
    return lax.psum(jnp.where(lax.axis_index(DEPTH) == index, x, jnp.zeros_like(x)), DEPTH)


def _forward(problem: _Problem, layers, y0, t0, t1):
    """The states u_0 .. u_{N-1} (sharded over depth), u_N and the statistics."""
    m, n = problem.settings.coarsening, problem.intervals

    def on_device(layers, y0, t0, t1):
        fine, coarse = problem.propagators(layers, t0, (t1 - t0) / problem.depth)
        ring = Ring(DEPTH, problem.devices, reverse=False)
        ends, states, stats = solve_mgrit(ring, fine, coarse, y0, n, problem.settings)
        last = _from_device(problem.devices - 1, ends[-1])
        return states.reshape((n * m,) + y0.shape), last, stats

    spec = Spec(DEPTH)
    return problem.shard_map(on_device, (spec, Spec(), Spec(), Spec()),
                             (spec, Spec(), Spec()))(layers, y0, t0, t1)


def _backward(problem: _Problem, layers, states, t0, t1, cotangents, last_cotangent):
    """The adjoint by MGRIT from the last layer to the first: (parameter gradients, dL/dy0,
    statistics). `states` are u_0 .. u_{N-1}, `cotangents` those of u_0 .. u_{N-1}."""
    m, n = problem.settings.coarsening, problem.intervals

    def on_device(layers, states, t0, t1, cotangents, last_cotangent):
        fine, coarse = problem.adjoint_propagators(layers, states, cotangents, t0,
                                                   (t1 - t0) / problem.depth)
        ring = Ring(DEPTH, problem.devices, reverse=True)
        ends, grads, stats = solve_mgrit(ring, fine, coarse, last_cotangent, n,
                                         problem.settings.backward())
        grads = jax.tree.map(lambda g: g[::-1].reshape((n * m,) + g.shape[2:]), grads)
        return grads, _from_device(0, ends[-1]), stats

    spec = Spec(DEPTH)
    return problem.shard_map(on_device, (spec, spec, Spec(), Spec(), spec, Spec()),
                             (spec, Spec(), Spec()))(layers, states, t0, t1, cotangents,
                                                     last_cotangent)


def _zero_cotangents(tree):
    return jax.tree.map(lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.inexact)
                        else np.zeros(x.shape, jax.dtypes.float0), tree)


_solve = jax.custom_vjp(_forward, nondiff_argnums=(0,))


def _solve_fwd(problem, layers, y0, t0, t1):
    states, last, stats = _forward(problem, layers, y0, t0, t1)
    return (states, last, stats), (layers, states, t0, t1)


def _solve_bwd(problem, saved, cotangents):
    layers, states, t0, t1 = saved
    states_cotangent, last_cotangent, _ = cotangents
    grads, y0_grad, _ = _backward(problem, layers, states, t0, t1, states_cotangent,
                                  last_cotangent)
    return (grads, _zero_cotangents(layers[1])), y0_grad, jnp.zeros_like(t0), jnp.zeros_like(t1)


_solve.defvjp(_solve_fwd, _solve_bwd)


# ---------------------------------------------------------------------------------------------
# The public functions.

def _check_mesh(mesh):
    if not isinstance(mesh, Mesh) or DEPTH not in mesh.axis_names:
        raise ValueError(f"mesh must be a jax.sharding.Mesh with an axis named {DEPTH!r} "
                         f"(neuralode.parallel.depth_mesh()), got {mesh!r}")


def _setup(field, y0, t0, t1, solver, mgrit, mesh):
    if not isinstance(field, DepthStack):
        raise TypeError(f"field must be a DepthStack (one field per layer: a ResNet), got "
                        f"{type(field).__name__}")
    if not isinstance(solver, Euler):
        raise ValueError(f"solver must be Euler(): the coarse propagator is one Euler step of size "
                         f"m h, which is defined for a ResNet's Euler steps only; got {solver!r}")
    if not isinstance(mgrit, MGRIT):
        raise TypeError(f"mgrit must be an MGRIT(...) settings object, got {mgrit!r}")
    _check_mesh(mesh)
    leaves = jax.tree.leaves(y0)
    if not leaves or not all(jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves):
        raise TypeError(f"y0 must be a pytree of floating-point arrays, got {y0!r}")
    devices, m = mesh.shape[DEPTH], mgrit.coarsening
    if field.depth % (m * devices):
        raise ValueError(f"the field's depth N = {field.depth} must be divisible by coarsening m = "
                         f"{m} times the {devices} devices of the mesh axis {DEPTH!r} (each device "
                         f"holds N / (m P) whole coarse intervals)")
    flat_y0, unravel = ravel_pytree(y0)
    t0, t1 = (jnp.asarray(t, flat_y0.dtype) for t in (t0, t1))
    if not isinstance(t0, jax.core.Tracer) and not isinstance(t1, jax.core.Tracer) \
            and not float(t1) > float(t0):
        raise ValueError(f"t1 must be greater than t0, got t0 = {float(t0)}, t1 = {float(t1)}")
    out = jax.eval_shape(lambda: field.layer(0)(t0, y0))
    if jax.tree.structure(out) != jax.tree.structure(y0) or any(
            a.shape != jnp.shape(b) for a, b in zip(jax.tree.leaves(out), leaves)):
        raise ValueError(f"the field must return dy/dt with the structure and shapes of y0, got "
                         f"{jax.tree.map(lambda x: x.shape, out)}")
    graphdef, params, rest = nnx.split(field, nnx.Param, ...)
    problem = _Problem(graphdef, unravel, field.depth, mgrit, mesh)
    return problem, (params, rest), flat_y0, t0, t1


def layer_parallel_solve(field: DepthStack, y0, t0, t1, *, solver: Euler, mgrit: MGRIT = MGRIT(),
                         mesh: Mesh) -> LayerParallelSolution:
    """The N = field.depth Euler steps of a `DepthStack` from y0 at t0 to t1 (h = (t1 - t0) / N),
    solved by MGRIT with the depth sharded over the mesh axis `depth`.

    Its `y1` is `odeint(field, y0, [t0, t1], solver=Euler(), substeps=N)[-1]` and its `ys` the state
    at every layer, to rounding, once MGRIT has converged (N / m iterations at most); fewer
    iterations give an approximation whose residual is in the statistics. `jax.grad` through it
    solves the adjoint by MGRIT too (`mgrit.backward_*`). N must be divisible by
    `mgrit.coarsening` times the number of devices on the `depth` axis. Call it under `jax.jit`.
    """
    problem, layers, flat_y0, t0, t1 = _setup(field, y0, t0, t1, solver, mgrit, mesh)
    states, last, stats = _solve(problem, layers, flat_y0, t0, t1)
    return LayerParallelSolution(jax.vmap(problem.unravel)(states), problem.unravel(last), stats)


def layer_parallel_vjp(field: DepthStack, y0, t0, t1, cotangent, *, solver: Euler,
                       mgrit: MGRIT = MGRIT(), mesh: Mesh):
    """`layer_parallel_solve` and the backward solve for the cotangent of its output y(t1), with
    the statistics of both: returns `(solution, (field_grads, y0_grad), backward_stats)`, where
    `field_grads` is an `nnx.State` of the field's parameters (as `nnx.grad` gives them) and
    `backward_stats` has the keys of `LayerParallelSolution.stats` for the adjoint solve."""
    problem, layers, flat_y0, t0, t1 = _setup(field, y0, t0, t1, solver, mgrit, mesh)
    states, last, stats = _forward(problem, layers, flat_y0, t0, t1)
    flat_cotangent = ravel_pytree(cotangent)[0]
    if flat_cotangent.shape != flat_y0.shape:
        raise ValueError(f"cotangent must have the structure and shapes of y0, got "
                         f"{jax.tree.map(jnp.shape, cotangent)}")
    grads, y0_grad, backward_stats = _backward(problem, layers, states, t0, t1,
                                               jnp.zeros_like(states), flat_cotangent)
    return (LayerParallelSolution(jax.vmap(problem.unravel)(states), problem.unravel(last), stats),
            (grads, problem.unravel(y0_grad)), backward_stats)

"""Graph operators and graph networks for `experiments.graphs` (C4).

A_hat = D^(-1/2) (A + I) D^(-1/2) as a sparse operator (messages summed with `segment_sum`), the
Dirichlet energy, the heat-equation fields whose Euler steps are the residual-diffusion and
initial-residual layers (integrated by `neuralode.odeint`), the plain GCN, and the classifier with
its full-batch AdamW training loop.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import threadpoolctl
from flax import nnx

import neuralode

F64 = jnp.float64
MODELS = ("plain_gcn", "residual_diffusion", "initial_residual")


class Graph(NamedTuple):
    """A_hat as a sparse operator: messages senders -> receivers with weights 1/sqrt(d_i d_j) over
    both directions of every edge and the self-loops; `edges` the undirected edges (no loops)."""

    senders: jax.Array
    receivers: jax.Array
    weights: jax.Array
    edges: jax.Array
    degrees: jax.Array

    @property
    def num_nodes(self) -> int:
        return self.degrees.shape[0]


def make_graph(num_nodes: int, edges) -> Graph:
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if np.any(edges[:, 0] == edges[:, 1]) or edges.min() < 0 or edges.max() >= num_nodes:
        raise ValueError("edges must join two different nodes in [0, num_nodes)")
    loops = np.arange(num_nodes)
    senders = np.concatenate([edges[:, 0], edges[:, 1], loops])
    receivers = np.concatenate([edges[:, 1], edges[:, 0], loops])
    order = np.argsort(receivers, kind="stable")  # sorted segments sum about 4x faster
    senders, receivers = senders[order], receivers[order]
    degrees = np.bincount(receivers, minlength=num_nodes).astype(np.float64)
    weights = 1 / np.sqrt(degrees[senders] * degrees[receivers])
    return Graph(jnp.asarray(senders), jnp.asarray(receivers), jnp.asarray(weights),
                 jnp.asarray(edges), jnp.asarray(degrees))


def propagate(graph: Graph, x):
    """A_hat x."""
    messages = graph.weights[:, None] * x[graph.senders]
    return jax.ops.segment_sum(messages, graph.receivers, graph.num_nodes, indices_are_sorted=True)


def dirichlet_energy(graph: Graph, x):
    """trace(x^T (I - A_hat) x), summed over edges so that the D^(1/2) 1 component cancels exactly."""
    y = x / jnp.sqrt(graph.degrees)[:, None]
    return jnp.sum((y[graph.edges[:, 0]] - y[graph.edges[:, 1]]) ** 2)


def rayleigh_quotient(graph: Graph, x):
    """E(x) / ||x||^2, in [0, mu_max]: 0 when every node holds the same (degree-scaled) vector."""
    return dirichlet_energy(graph, x) / jnp.sum(x**2)


def spectrum(graph: Graph) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues mu (ascending) and eigenvectors of I - A_hat, densely."""
    a_hat = np.zeros((graph.num_nodes, graph.num_nodes))
    np.add.at(a_hat, (np.asarray(graph.receivers), np.asarray(graph.senders)), np.asarray(graph.weights))
    with threadpoolctl.threadpool_limits(1):  # threaded OpenBLAS runs 10x slower on busy cores
        return np.linalg.eigh(np.eye(graph.num_nodes) - a_hat)


def without_stationary(graph: Graph, x):
    """x minus its projection on D^(1/2) 1, the null vector of I - A_hat."""
    s = jnp.sqrt(graph.degrees)
    s = s / jnp.linalg.norm(s)
    return x - jnp.outer(s, s @ x)


def diffusion_field(graph: Graph):
    """dX/dt = (A_hat - I) X: an Euler step of size h is the residual layer X + h (A_hat - I) X."""
    return lambda t, x, args: propagate(graph, x) - x


def initial_residual_field(graph: Graph, step: float, alpha: float):
    """dX/dt = (A_hat - I) X + (alpha / h)(X_0 - X), with X_0 = args: an Euler step of size h is
    X + h (A_hat - I) X + alpha (X_0 - X)."""
    return lambda t, x, x0: propagate(graph, x) - x + (alpha / step) * (x0 - x)


def euler_states(field, x0, depth: int, step: float, args=None):
    """X_0 .. X_depth of `depth` Euler steps of size `step` through `neuralode.odeint`."""
    ts = step * jnp.arange(depth + 1, dtype=F64)
    return neuralode.odeint(field, x0, ts, args, solver=neuralode.Euler(), max_steps=depth)


def glorot_kernels(seed, depth: int, width: int):
    """`depth` Glorot-normal width x width matrices, N(0, 2 / (width + width)). Drawn with numpy:
    jax.random compiles a sampler for every new shape, seconds each on a busy machine."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal((depth, width, width)) / np.sqrt(width))


def plain_gcn_states(graph: Graph, x0, kernels):
    def layer(x, kernel):
        x = jax.nn.relu(propagate(graph, x) @ kernel)
        return x, x

    return jnp.concatenate([x0[None], jax.lax.scan(layer, x0, kernels)[1]])


@functools.partial(jax.jit, static_argnames=("kind", "depth"))
def diffusion_propagation(kind: str, depth: int, graph: Graph, x, step: float, alpha: float):
    """The weight-free propagation of the diffusion classifiers, X_0 .. X_depth: Euler steps of
    size `step` of the heat equation, with the source term for the initial residual."""
    if kind == "residual_diffusion":
        return euler_states(diffusion_field(graph), x, depth, step)
    if kind == "initial_residual":
        return euler_states(initial_residual_field(graph, step, alpha), x, depth, step, x)
    raise ValueError(f"kind must be residual_diffusion or initial_residual, got {kind!r}")


def with_ones(x):
    """[x, 1]: the column of ones carries the encoder's bias through the propagation."""
    return jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)


class GraphNet(nnx.Module):
    """Linear encoder, `depth` propagation layers, linear read-out.

    plain_gcn: x <- relu(A_hat x W_l), called on the node features. residual_diffusion and
    initial_residual: Euler steps of the heat equation (with the source (alpha/h)(x_0 - x)), which
    have no weights and are linear, so they commute with the linear encoder: P(with_ones(X) W) =
    P(with_ones(X)) W. The network is called on P(with_ones(X)), computed once by
    `diffusion_propagation` (`tests/test_graphs.py` checks the two orders agree).
    """

    def __init__(self, kind: str, depth: int, in_features: int, width: int, classes: int, *,
                 rngs: nnx.Rngs):
        if kind not in MODELS:
            raise ValueError(f"kind must be one of {MODELS}, got {kind!r}")
        self.kind = kind  # not the depth: the diffusion models share one compiled training loop
        plain = kind == "plain_gcn"
        self.encoder = nnx.Linear(in_features + (not plain), width, use_bias=plain, param_dtype=F64,
                                  rngs=rngs)
        self.decoder = nnx.Linear(width, classes, param_dtype=F64, rngs=rngs)
        if plain:
            self.kernels = nnx.Param(glorot_kernels(np.asarray(jax.random.key_data(rngs.params())), depth, width))

    def hidden(self, graph: Graph, x):
        if self.kind == "plain_gcn":
            return plain_gcn_states(graph, self.encoder(x), self.kernels[...])[-1]
        return self.encoder(x)

    def __call__(self, graph: Graph, x):
        return self.decoder(self.hidden(graph, x))


def _kernel_gradient_norms(grads):
    """||dLoss/dW_l|| for every layer of a plain GCN (no layers: an empty array)."""
    if "kernels" not in grads:
        return jnp.zeros(0)
    kernels = grads["kernels"][...]
    return jnp.linalg.norm(kernels.reshape(kernels.shape[0], -1), axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "learning_rate", "weight_decay"))
def fit(graphdef, params, rest, graph: Graph, inputs, labels, train_mask, *, steps: int,
        learning_rate: float, weight_decay: float):
    """`steps` full-batch AdamW steps on the mean cross-entropy of the labelled nodes; returns the
    trained parameters, the loss and the per-layer gradient norms of every step."""
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(graph, inputs)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(jnp.where(train_mask, losses, 0.0)) / jnp.sum(train_mask)

    def update(carry, _):
        params, opt_state = carry
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (value, _kernel_gradient_norms(grads))

    def evaluate(params):
        net = nnx.merge(graphdef, params, rest)
        hidden = net.hidden(graph, inputs)
        return jnp.argmax(net.decoder(hidden), axis=1) == labels, rayleigh_quotient(graph, hidden)

    (trained, _), (losses, gradient_norms) = jax.lax.scan(update, (params, tx.init(params)), None, steps)
    correct, quotient = evaluate(trained)
    return {"correct": correct, "losses": losses, "gradient_norms": gradient_norms,
            "hidden_rayleigh_quotient": quotient, "initial_hidden_rayleigh_quotient": evaluate(params)[1]}

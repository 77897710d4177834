"""Beyond one device, on JAX's own SPMD engine (`jax.sharding.Mesh`, `jax.shard_map`).

Layer parallelism: a ResNet's depth sharded over the mesh axis `depth` and solved by multigrid in
time (MGRIT; parareal with F-relaxation), forward and backward.
"""

from neuralode.parallel.layer import (LayerParallelSolution, depth_mesh, layer_parallel_solve,
                                      layer_parallel_vjp, shard_layers)
from neuralode.parallel.mgrit import MGRIT

__all__ = ["LayerParallelSolution", "MGRIT", "depth_mesh", "layer_parallel_solve",
           "layer_parallel_vjp", "shard_layers"]

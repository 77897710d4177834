"""Beyond one device, on JAX's own SPMD engine (`jax.sharding.Mesh`, `jax.shard_map`).

Layer parallelism: a ResNet's depth sharded over the mesh axis `depth` and solved by multigrid in
time (MGRIT; parareal with F-relaxation), forward and backward.

Data parallelism: the batch sharded over the mesh axis `data`, each device its own solve
(`data`), on one process or several (`distributed`).
"""

from neuralode.parallel.data import (data_mesh, data_parallel_eval_step, data_parallel_train_step,
                                     replicate, shard_batch)
from neuralode.parallel.distributed import host_devices, initialize
from neuralode.parallel.layer import (LayerParallelSolution, depth_mesh, layer_parallel_solve,
                                      layer_parallel_vjp, shard_layers)
from neuralode.parallel.mgrit import MGRIT

__all__ = ["LayerParallelSolution", "MGRIT", "data_mesh", "data_parallel_eval_step",
           "data_parallel_train_step", "depth_mesh", "host_devices", "initialize",
           "layer_parallel_solve", "layer_parallel_vjp", "replicate", "shard_batch", "shard_layers"]

"""What determines a training run besides the model and the data: `TrainConfig`, and the optax
optimiser and learning-rate schedule it describes (`make_optimizer`, `learning_rate_schedule`)."""

from __future__ import annotations

import dataclasses
import math

import optax

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "sgd")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run, besides the model and the data.

    `schedule` is "constant" or "cosine" (decay to 0 over the run), after `warmup_steps` of linear
    warm-up from 0. `optimizer` is "adamw" (decoupled `weight_decay`) or "sgd" (Nesterov momentum
    0.9, `weight_decay` added to the gradient). `grad_clip_norm` clips the global gradient norm.
    `augment_shift` > 0 translates every training example by a random offset of up to that many
    pixels (samples) per spatial axis, drawn from the `batch`-th child of the epoch's seed sequence
    `SeedSequence([seed, epoch])` (whose root draws the order), so a resumed run sees the same batches.
    """

    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    grad_clip_norm: float | None = None
    augment_shift: int = 0
    seed: int = 0
    eval_batch_size: int = 1000
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    progress: bool = True

    def __post_init__(self):
        positive_ints = ("epochs", "batch_size", "eval_batch_size", "checkpoint_every", "keep_checkpoints")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainConfig.{name}: expected a positive integer, found {value!r}")
        for name in ("warmup_steps", "augment_shift", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainConfig.{name}: expected an integer >= 0, found {value!r}")
        for name, bound in (("learning_rate", "> 0"), ("weight_decay", ">= 0"), ("grad_clip_norm", "> 0")):
            value, optional = getattr(self, name), "None or " if name == "grad_clip_norm" else ""
            if optional and value is None:
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not (number and (value > 0 if bound == "> 0" else value >= 0)):
                raise ValueError(f"TrainConfig.{name}: expected {optional}a finite number {bound}, found {value!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule: unknown {self.schedule!r}, expected one of {SCHEDULES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer: unknown {self.optimizer!r}, expected one of {OPTIMIZERS}")


def learning_rate_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up over `config.warmup_steps`, then constant or cosine decay to 0 at the end.
    A warm-up longer than the run is refused (the run would never reach the schedule it asks for)."""
    peak, warmup = config.learning_rate, config.warmup_steps
    if warmup > total_steps:
        raise ValueError(f"TrainConfig.warmup_steps: {warmup} is more than the run's {total_steps} "
                         "steps, so its learning rate would never reach its peak")
    if config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """The optax transformation `config` describes, over a run of `total_steps` steps."""
    schedule = learning_rate_schedule(config, total_steps)
    if config.optimizer == "adamw":
        tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    else:
        tx = optax.chain(
            optax.add_decayed_weights(config.weight_decay),
            optax.sgd(schedule, momentum=0.9, nesterov=True),
        )
    if config.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx

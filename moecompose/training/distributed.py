"""Training on several processes with PyTorch's own machinery: ``torch.distributed``
(launched by ``torchrun``), FSDP2 (``fully_shard``) and Distributed Checkpoint.

One process is the same code with a world of size 1: the model is not sharded, and
checkpoints are Distributed Checkpoint folders too, so a run saved on any number of
processes resumes on any other (DCP reshards on load).

Data parallelism keeps the arithmetic of one process: the global step is the recipe's
``grad_accumulation`` micro-batches, drawn by every rank from the same seeded stream, and
rank ``r`` runs micro-batches ``r, r + W, ...``. Each micro-batch's loss (aux loss
included, which depends on the whole micro-batch) is what one process computes; its
gradient is scaled by ``W / grad_accumulation`` and FSDP averages over the ``W`` ranks, so
the update is the mean over micro-batches, as on one process.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from moecompose.errors import BuildError, MoeComposeError

if TYPE_CHECKING:
    from moecompose.model import MoECausalLM

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, device: torch.device) -> World:
        """The world ``torchrun`` describes (``WORLD_SIZE``, ``RANK``), its process group
        made (gloo on CPU, nccl on CUDA); a world of one without it."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return cls(dist.get_rank(), dist.get_world_size())

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks."""
        if not self.sharded:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def on_main(self, work: Callable[[], T]) -> T | None:
        """Run ``work`` on rank 0 only; a user error there is raised on every rank (so no
        rank waits for one that stopped). Returns ``work``'s result on rank 0."""
        result: T | None = None
        error: MoeComposeError | None = None
        if self.main:
            try:
                result = work()
            except MoeComposeError as exc:
                if not self.sharded:
                    raise
                error = exc
        if self.sharded:
            message = [None if error is None else (error.message, error.hint)]
            dist.broadcast_object_list(message, src=0)
            if error is not None:
                raise error
            if message[0] is not None:
                text, hint = message[0]
                raise BuildError(text, hint=hint)
        return result


def shard(model: MoECausalLM, precision: str) -> None:
    """FSDP2: every decoder layer, then the root (embeddings, final norm, head), sharded
    over the ranks; with ``bf16`` the gathered parameters are bf16 and gradients are
    reduced in fp32 (the sharded master weights stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16" else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def sync_gradients(model: torch.nn.Module, sync: bool) -> None:
    """Reduce gradients on this backward (the step's last micro-batch) or keep them local."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(sync)


def local_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank holds of parameters, gradients (those not freed) and optimizer
    state: its shards when sharded."""

    def size(t: torch.Tensor) -> int:
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    total = 0
    for p in model.parameters():
        total += size(p)
        if p.grad is not None:
            total += size(p.grad)
    for state in optimizer.state.values():
        total += sum(size(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim())
    return total


def _options(full: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=True)


def save_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The trainable parameters and the optimizer state, as a Distributed Checkpoint in
    ``folder`` (every rank writes its shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`save_state` wrote, resharded to this world."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=_options())


def full_trainable(model: torch.nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The trainable parameters whole, in fp32 on the CPU, on rank 0 (a collective: every
    rank calls it; the others get an empty dict)."""
    if not world.sharded:
        return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters()
                if p.requires_grad}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=_options(full=True))
    if not world.main:
        return {}
    return {n: t.float().contiguous() for n, t in state.items() if n in trainable}

"""`--fsdp`: the decoder's transformer layers sharded across torchrun's ranks with PyTorch's FSDP2.

Each decoder layer is its own `fully_shard` unit: a rank holds 1/world of every layer's weights,
gradients and optimiser state, and a layer is all-gathered only for its own forward and backward.
The embeddings, final norm and head stay whole on every rank (they are read outside the decoder's
forward, by the prefix builders, and are small next to the layers); their gradients are averaged
like DDP's. FSDP's reduce-scatter averages the layers' gradients, so a step is the same step one
process takes on the whole global batch.

Generation does not run on the sharded decoder: a step's rollouts are texts of different lengths
on each rank, and every forward of a sharded layer is a collective that all ranks must join. The
rollouts decode with a whole copy that takes the gathered weights after every optimiser step (the
pattern of a colocated rollout engine); checkpoints are saved from that copy, in the usual format.
Resumable state is written with torch.distributed.checkpoint (one shard file per rank; resuming
needs the same number of ranks).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def decoder_layers(decoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a Hugging Face causal LM (`model.layers` in Qwen/Llama)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        mod = decoder
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, torch.nn.ModuleList) and len(mod):
            return list(mod)
    raise SystemExit(f"--fsdp: cannot find the transformer layers of {type(decoder).__name__} "
                     "(looked for model.layers, transformer.h, gpt_neox.layers)")


def shard_decoder(decoder: torch.nn.Module, precision: str = "fp32") -> int:
    """fully_shard every decoder layer in place (with precision "bf16": bf16 compute, fp32 gradient
    reduction); returns the number of layers sharded. Must run before the optimiser is built."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    layers = decoder_layers(decoder)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    return len(layers)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights on every rank (a collective: every rank calls it), on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))  # every rank gets it
    return {k: v.detach().cpu() for k, v in full.items()}


def is_sharded(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """clip_grad_norm_ over a mix of sharded (DTensor) and whole parameters: the squared norms of
    the shards are summed over ranks, the whole ones counted once."""
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")  # NCCL reduces on the GPU
    local = torch.zeros((), dtype=torch.float64, device=device)
    whole = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        if isinstance(g, DTensor):
            local += g.to_local().double().pow(2).sum()
        else:
            whole += g.double().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(local)
    norm = float((local + whole).sqrt())
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(scale)
    return norm


class ShardedState:
    """The resumable state of an FSDP run: the trained modules and the optimiser, sharded as they
    are, with torch.distributed.checkpoint (every rank writes and reads its own part)."""

    def __init__(self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, directory: Path):
        self.container = torch.nn.ModuleDict(modules)
        self.opt = optimizer
        self.dir = Path(directory)

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.container, self.opt)
        return {"model": model, "optim": optim}

    def save(self) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(self.dir))

    def load(self) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(self.dir))
        set_state_dict(self.container, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

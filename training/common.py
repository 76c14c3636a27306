"""Small pieces every training entry point uses: batching, schedules, resumable state, logs."""
from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

from ladi_core.generation import pad_embeds


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class Placement:
    """Where a run's weights and batches live, and what its forward passes compute in. Weights and
    optimiser state stay float32 whatever the precision; "bf16" runs the forward passes under
    torch.autocast (mixed precision: what a GPU run of a real model uses)."""

    device: torch.device
    precision: Precision = "fp32"

    @classmethod
    def resolve(cls, device: str, precision: Precision = "fp32") -> Placement:
        """device "auto": this process's GPU when CUDA is there (torchrun's LOCAL_RANK picks which),
        else the CPU; "cuda" without one is refused, naming what torch sees."""
        if precision not in get_args(Precision):
            raise SystemExit(f"--precision {precision}: use fp32 or bf16")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit(f"--device {device}: this torch sees no CUDA device (torch {torch.__version__}, "
                                 f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
            if dev.index is None:
                dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        return cls(dev, precision)

    def autocast(self):
        """The context every forward pass of a training step runs in."""
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def __str__(self) -> str:
        return f"{self.device} {self.precision}"


CPU = Placement(torch.device("cpu"))


def step_rng(seed: int, stage: str, step: int) -> tuple[random.Random, torch.Generator]:
    """Data and noise for a step depend only on (seed, stage, step): resuming replays them exactly."""
    key = f"{seed}:{stage}:{step}"
    return random.Random(key), torch.Generator().manual_seed(hash_int(key))


def hash_int(key: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "little")


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def pad_batch(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists; returns (ids [B, T], mask [B, T] bool)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


def teacher_forcing(prefixes: list[torch.Tensor], targets: list[list[int]], embed: torch.nn.Module,
                    target_embeds: list[torch.Tensor] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one teacher-forcing layout (SFT, the prior's rollout stage, Coconut's curriculum, the text
    policies' log-probs, evaluation): per row `[prefix; target]`, right-padded with zeros. Returns
    (inputs_embeds [B, T, H], attention mask [B, T] bool, labels [B, T]: the target ids, -100 over
    the prefix and the padding). target_embeds: what the decoder reads for a target instead of its
    own embeddings (the writer's chain-of-thought dropout)."""
    if target_embeds is None:
        device = prefixes[0].device
        target_embeds = [embed(torch.tensor(t, dtype=torch.long, device=device)) for t in targets]
    rows = [torch.cat([p, e.to(p.dtype)]) for p, e in zip(prefixes, target_embeds, strict=True)]
    x, mask = pad_embeds(rows)
    labels, _ = pad_batch([[-100] * p.shape[0] + list(t) for p, t in zip(prefixes, targets, strict=True)], -100)
    return x, mask, labels.to(x.device)


class MetricsLog:
    """Append-only JSONL: one object per logged step, with wall-clock time.

    resume_at: the step a resumed RL run starts from. Rows of that step and later (written after the
    last save, and about to be redone) and a final evaluation's row are dropped, so each step
    appears once, and `time` goes on from the last kept row instead of restarting at 0."""

    def __init__(self, path: Path, resume_at: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        if resume_at is not None and self.path.is_file():
            rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            kept = [r for r in rows if r.get("step", -1) < resume_at and r.get("stage") != "final"]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            if kept:
                self.t0 -= kept[-1].get("time", 0.0)

    def write(self, **row) -> None:
        row = {"time": round(time.time() - self.t0, 2), **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def save_state(path: Path, **state) -> None:
    """Training state for --resume (tensors, numbers, dicts): torch.save, read back weights-only."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.is_file() else None

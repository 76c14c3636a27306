"""Weight averaging of an RL result with the checkpoint it started from (WiSE-FT, arXiv 2504.10478):

    python -m training.average --checkpoint checkpoints/demo-ladi-rl --start checkpoints/demo-ladir-s2 \
        --weight 0.7 --out /tmp/ladi-rl-a0.7

theta = weight * checkpoint + (1 - weight) * start, tensor by tensor, for the decoder and (latent
checkpoints) the codec and the plan policy. The cheapest way back from RL's sharpening towards the
start's diversity; the result records both parents and the weight in its provenance.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ladi_core.checkpoint import (
    CheckpointError,
    command_line,
    exit_on_user_error,
    load_checkpoint,
    make_provenance,
    save_checkpoint,
)
from ladi_core.decoder import load_decoder


def average_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], weight: float,
                  what: str) -> dict[str, torch.Tensor]:
    """weight * a + (1 - weight) * b for floating tensors; integer buffers must agree and are kept."""
    if set(a) != set(b):
        raise CheckpointError(f"{what}: the two checkpoints hold different tensors "
                              f"({sorted(set(a) ^ set(b))[:3]} ...)")
    out = {}
    for k, x in a.items():
        y = b[k]
        if x.shape != y.shape:
            raise CheckpointError(f"{what}: {k} has shape {tuple(x.shape)} in one checkpoint and "
                                  f"{tuple(y.shape)} in the other")
        if x.is_floating_point():
            out[k] = (weight * x.float() + (1 - weight) * y.float()).to(x.dtype)
        elif torch.equal(x, y):
            out[k] = x
        else:
            raise CheckpointError(f"{what}: the integer tensor {k} differs between the checkpoints")
    return out


def average(checkpoint: str | Path, start: str | Path, weight: float, out: str | Path, command: str) -> Path:
    if not 0.0 <= weight <= 1.0:
        raise CheckpointError(f"--weight is {weight}: it must lie in [0, 1] (1 = the checkpoint, 0 = the start)")
    ck, st = load_checkpoint(checkpoint), load_checkpoint(start)
    if ck.config.kind != st.config.kind or (ck.is_latent and ck.policy.kind != st.policy.kind):
        raise CheckpointError(f"{checkpoint} and {start} are different kinds of checkpoint: nothing to average")
    decoder, tok = load_decoder(ck.decoder_dir)
    start_decoder, _ = load_decoder(st.decoder_dir)
    decoder.load_state_dict(average_state(decoder.state_dict(), start_decoder.state_dict(), weight, "decoder"))
    parts = {}
    if ck.is_latent:
        for name in ("codec", "policy"):
            mine, theirs = getattr(ck, name), getattr(st, name)
            mine.load_state_dict(average_state(mine.state_dict(), theirs.state_dict(), weight, name))
            parts[name] = mine
    prov = make_provenance(command, ck.config.provenance.seed,
                           {"checkpoint": str(checkpoint), "start": str(start), "weight": weight},
                           {"averaged_from": {"checkpoint": str(checkpoint), "start": str(start), "weight": weight}})
    return save_checkpoint(out, decoder, tok, prov, task=ck.config.task, **parts)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m training.average", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the trained checkpoint (e.g. an RL result)")
    p.add_argument("--start", required=True, help="the checkpoint it started from")
    p.add_argument("--weight", type=float, required=True, help="the trained checkpoint's share, in [0, 1]")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    path = average(args.checkpoint, args.start, args.weight, args.out, command_line("training.average", argv))
    print(f"wrote {path}: {args.weight} x {args.checkpoint} + {1 - args.weight:g} x {args.start}")
    return path


if __name__ == "__main__":
    exit_on_user_error(main)

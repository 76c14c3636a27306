"""The checkpoint format, written and read in one place.

    DIR/
      ladi.json            LadiConfig: format version, kind, architecture, provenance
      decoder/             a plain Hugging Face model + tokenizer (transformers and vLLM load it as is)
      codec.safetensors    latent checkpoints only: encoder, adapter, begin/end-of-thought, latent stats
      policy.safetensors   latent checkpoints only: the plan policy (`policy_kind`: the diffusion
                           denoiser, DLR's assistant, or the recurrent thinker's value head; the
                           recurrent one's codec is frame-only, bot and eot)

A token-level checkpoint is the same directory without the latent parts. Loading validates the
version, the files and every tensor's shape, reports all problems in one message, and never
unpickles anything (safetensors and JSON only).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors.torch import load_file, save_file

from .codec import CodecConfig, LatentCodec
from .policies import POLICY_KINDS, LatentPolicy, make_policy

FORMAT_VERSION = 1
CONFIG_FILE = "ladi.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used, with every reason found."""


class Provenance(BaseModel):
    model_config = ConfigDict(extra="allow")
    command: str
    seed: int | None = None
    commit: str | None = None
    created: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)


class LadiConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int
    kind: Literal["latent", "token"]
    policy_kind: str | None = None  # latent only, a POLICY_KINDS key; None in a file = "diffusion"
    task: str | None = None
    codec: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None
    sampler: dict[str, Any] | None = None
    provenance: Provenance

    @field_validator("policy_kind")
    @classmethod
    def _known_kind(cls, v: str | None) -> str | None:
        if v is not None and v not in POLICY_KINDS:
            raise ValueError(f"unknown policy kind {v!r}: this LaDi knows {', '.join(POLICY_KINDS)}")
        return v


def exit_on_user_error(main: Callable[[], Any]) -> Any:
    """Run a command-line entry point. A checkpoint the user pointed at that cannot be used is the
    user's error, not a bug: one line on stderr (every reason found, joined) and exit status 2.
    Anything else keeps its traceback."""
    try:
        return main()
    except CheckpointError as err:
        reasons = [line.strip().removeprefix("- ") for line in str(err).splitlines() if line.strip()]
        print("error: " + " ".join(reasons), file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        # checkpoints/ and results/ are what runs write, not code: rewriting a committed demo
        # checkpoint must not mark the run that rewrites it as made from modified code
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)checkpoints", ":(exclude)results"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def command_line(module: str, argv: list[str] | None = None) -> str:
    """`python -m module args...` for an entry point called from the shell or from Python."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", "-m", module, *(shlex.quote(a) for a in args)])


def make_provenance(command: str, seed: int | None, config: dict | None = None, metrics: dict | None = None,
                    commit: str | None = None) -> Provenance:
    """How a checkpoint was made: the command line, seed, commit, config and metrics.
    Long runs pass the commit read at their start: the tree may move on while they train."""
    return Provenance(command=command, seed=seed, commit=commit or git_commit(),
                      created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                      metrics=metrics or {}, config=config or {})


@dataclass
class Checkpoint:
    """A loaded checkpoint. The decoder model itself is loaded by a backend from `decoder_dir`."""

    path: Path
    config: LadiConfig
    tokenizer: Any
    codec: LatentCodec | None = None
    policy: LatentPolicy | None = None

    @property
    def decoder_dir(self) -> Path:
        return self.path / "decoder"

    @property
    def is_latent(self) -> bool:
        return self.config.kind == "latent"


def save_checkpoint(path: str | Path, decoder, tokenizer, provenance: Provenance, *, task: str | None = None,
                    codec: LatentCodec | None = None, policy: LatentPolicy | None = None) -> Path:
    """Write atomically: a half-written checkpoint never sits at `path`."""
    path = Path(path)
    if (codec is None) != (policy is None):
        raise ValueError("a latent checkpoint needs both a codec and a policy")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    decoder.save_pretrained(tmp / "decoder", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "decoder")
    cfg = LadiConfig(format_version=FORMAT_VERSION, kind="token" if codec is None else "latent", task=task,
                     provenance=provenance)
    if codec is not None:
        save_file({k: v.contiguous() for k, v in codec.state_dict().items()}, tmp / "codec.safetensors")
        save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, tmp / "policy.safetensors")
        cfg.codec, cfg.policy, cfg.sampler = asdict(codec.cfg), asdict(policy.cfg), asdict(policy.sampler)
        cfg.policy_kind = policy.kind
    (tmp / CONFIG_FILE).write_text(cfg.model_dump_json(indent=2) + "\n")
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _check_state(module: torch.nn.Module, file: Path, problems: list[str]) -> dict | None:
    try:
        state = load_file(file)
    except Exception as err:  # safetensors raises its own error types for damaged files
        problems.append(f"{file.name}: unreadable ({err})")
        return None
    expected = module.state_dict()
    for k in sorted(set(expected) - set(state)):
        problems.append(f"{file.name}: missing tensor {k}")
    for k in sorted(set(state) - set(expected)):
        problems.append(f"{file.name}: unexpected tensor {k}")
    for k in sorted(set(state) & set(expected)):
        if tuple(state[k].shape) != tuple(expected[k].shape):
            problems.append(f"{file.name}: {k} has shape {tuple(state[k].shape)}, "
                            f"ladi.json implies {tuple(expected[k].shape)}")
    return state


def _check_decoder(dec: Path, problems: list[str]) -> None:
    """The decoder's safetensors against the model its config.json describes: every tensor there,
    none unexpected, every shape right. Only headers are read; the model is built on the meta
    device (no memory), so this costs the same for a tiny decoder and a 7B one."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(dec)))
    state = model.state_dict()
    found: dict[str, tuple[int, ...]] = {}
    for f in sorted(dec.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    found[k] = tuple(h.get_slice(k).get_shape())
        except Exception as err:  # a damaged header: safetensors raises its own error types
            problems.append(f"decoder/{f.name}: unreadable ({err})")
            return
    # tied weights (lm_head = embed_tokens) are saved once: the source's presence covers the target
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for k in sorted(set(state) - set(found)):
        if not (k in tied and tied[k] in found):
            problems.append(f"decoder weights: missing tensor {k}")
    for k in sorted(set(found) - set(state)):
        problems.append(f"decoder weights: unexpected tensor {k}")
    for k in sorted(set(found) & set(state)):
        if found[k] != tuple(state[k].shape):
            problems.append(f"decoder weights: {k} has shape {found[k]}, config.json implies {tuple(state[k].shape)}")


def read_config(path: str | Path) -> LadiConfig:
    path = Path(path)
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory")
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path}: no {CONFIG_FILE} (is this a LaDi checkpoint directory?)")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} is not valid JSON ({err})") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format_version {version!r}, this LaDi reads {FORMAT_VERSION}")
    try:
        return LadiConfig.model_validate(raw)
    except ValidationError as err:
        raise CheckpointError(f"checkpoint {path}: {CONFIG_FILE} is malformed:\n{err}") from None


def load_checkpoint(path: str | Path, device: str = "cpu") -> Checkpoint:
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    cfg = read_config(path)
    problems: list[str] = []
    dec = path / "decoder"
    hidden = None
    if not (dec / "config.json").is_file():
        problems.append("decoder/config.json is missing")
    else:
        try:
            hidden = AutoConfig.from_pretrained(str(dec)).hidden_size
        except Exception as err:  # transformers raises several types for bad configs
            problems.append(f"decoder/config.json unreadable ({err})")
        if not list(dec.glob("*.safetensors")):
            problems.append("decoder/ has no .safetensors weights (pickled weights are not loaded)")
        elif hidden is not None:
            _check_decoder(dec, problems)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(dec))
        tokenizer.padding_side = "left"
    except Exception as err:
        problems.append(f"decoder/ tokenizer unreadable ({err})")
    codec = policy = None
    if cfg.kind == "latent":
        try:
            codec = LatentCodec(CodecConfig(**(cfg.codec or {})))
            policy = make_policy(cfg.policy_kind or "diffusion", cfg.policy or {}, cfg.sampler or {})
        except TypeError as err:
            raise CheckpointError(f"checkpoint {path}: codec/policy config does not match this LaDi ({err})") from None
        if hidden is not None and codec.cfg.hidden_size != hidden:
            problems.append(f"codec hidden_size {codec.cfg.hidden_size} != decoder hidden_size {hidden}")
        if hidden is not None and policy.cfg.hidden_size != hidden:
            problems.append(f"policy hidden_size {policy.cfg.hidden_size} != decoder hidden_size {hidden}")
        if (codec.cfg.latent_tokens, codec.cfg.latent_dim) != policy.latent_shape:
            problems.append("codec and policy disagree on the latent shape")
        states = {}
        for name, module in (("codec", codec), ("policy", policy)):
            file = path / f"{name}.safetensors"
            if not file.is_file():
                problems.append(f"{file.name} is missing")
            else:
                states[name] = _check_state(module, file, problems)
    if problems:
        raise CheckpointError(f"checkpoint {path} cannot be loaded:\n  - " + "\n  - ".join(problems))
    if codec is not None:
        codec.load_state_dict(states["codec"])
        policy.load_state_dict(states["policy"])
        codec.to(device).eval()
        policy.to(device).eval()
    return Checkpoint(path, cfg, tokenizer, codec, policy)


def set_sampler_default(path: str | Path, evidence: dict[str, Any], **fields) -> None:
    """Change a latent checkpoint's sampler defaults (e.g. serving steps), keeping what justified
    the change in its provenance (`metrics.sampler_changes`) beside the command that made it."""
    cfg = read_config(path)
    if cfg.sampler is None:
        raise CheckpointError(f"{path}: a token-level checkpoint has no sampler")
    # the kind's own sampler fields: a field newer than the file is known too
    known = set(cfg.sampler) | set(POLICY_KINDS[cfg.policy_kind or "diffusion"][2].__dataclass_fields__)
    unknown = set(fields) - known
    if unknown:
        raise CheckpointError(f"{path}: unknown sampler settings {sorted(unknown)}")
    change = {"from": {k: cfg.sampler.get(k) for k in fields}, "to": fields, "evidence": evidence,
              "commit": git_commit(), "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    cfg.sampler.update(fields)
    cfg.provenance.metrics.setdefault("sampler_changes", []).append(change)
    (Path(path) / CONFIG_FILE).write_text(cfg.model_dump_json(indent=2) + "\n")


def update_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Merge evaluation results into a saved checkpoint's provenance."""
    cfg = read_config(path)
    cfg.provenance.metrics.update(metrics)
    (Path(path) / CONFIG_FILE).write_text(cfg.model_dump_json(indent=2) + "\n")

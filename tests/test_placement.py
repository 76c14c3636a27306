"""Where training runs (`--device`, `--precision`) and the noise that must not depend on it."""
from __future__ import annotations

import pytest
import torch

from ladi_core import seeding
from training.common import CPU, Placement


def test_auto_is_the_cpu_here_and_a_missing_gpu_is_refused_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert Placement.resolve("auto") == CPU
    with pytest.raises(SystemExit, match=r"--device cuda: this torch sees no CUDA device .* use --device cpu"):
        Placement.resolve("cuda")
    with pytest.raises(SystemExit, match="--precision fp16: use fp32 or bf16"):
        Placement.resolve("cpu", "fp16")


def test_bf16_computes_in_bf16_and_keeps_float32_weights():
    layer = torch.nn.Linear(4, 4)
    with Placement(torch.device("cpu"), "bf16").autocast():
        y = layer(torch.ones(2, 4))
    with CPU.autocast():
        z = layer(torch.ones(2, 4))
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32 and layer.weight.dtype == torch.float32
    assert torch.allclose(y.float(), z, atol=0.05)


def test_noise_is_drawn_on_the_generators_device_so_a_seed_means_the_same_numbers_everywhere():
    """What a CUDA run draws from a seeded CPU generator equals what the CPU run draws (the draw
    happens on the generator's device, then moves); without a generator it is drawn in place."""
    a = seeding.randn((3, 5), torch.Generator().manual_seed(7), device="cpu")
    b = torch.randn((3, 5), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    u = seeding.rand(6, torch.Generator().manual_seed(3), device=torch.device("cpu"))
    assert torch.equal(u, torch.rand(6, generator=torch.Generator().manual_seed(3)))
    assert seeding.randn((2,), None, device="cpu", dtype=torch.float64).dtype == torch.float64


def test_every_stage_has_the_real_model_preset_and_it_builds():
    from training import prior_rollout, writer
    from training.config import PRESETS as SFT
    from training.rl_config import PRESETS as RL
    from training.rl_config import build_config

    name = "qwen2.5-1.5b"
    assert SFT[name].precision == "bf16" and SFT[name].max_new_tokens == 256
    assert writer.PRESETS[name].precision == "bf16" and prior_rollout.PRESETS[name].precision == "bf16"
    ladi = build_config("ladi", RL[name], {"text_policy_coef": 1.0})
    grpo = build_config("grpo", RL[name], {"lr": 1e-6})
    assert ladi.precision == grpo.precision == "bf16" and ladi.method.text_lr == 1e-6 and grpo.lr == 1e-6

"""RL: objectives on hand-made numbers, the on-policy first step, a real policy step on the smoke
checkpoint, the trainer end to end for both algorithms, --resume, and a 2-process DDP run."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ladi_core.checkpoint import load_checkpoint, read_config
from ladi_core.generation import pad_embeds
from ladi_core.policies import DiffusionPolicy, DiffusionPolicyConfig, SamplerConfig
from training import rl
from training.algos.common import clipped_surrogate, group_advantages, pass_at_k_advantages
from training.algos.grpo import GRPOConfig, grpo_loss
from training.algos.ladi import LadiConfig, ladi_loss, plan_advantages, text_advantages
from training.rl_config import RLConfig

from .live import free_port


def test_group_advantages_on_hand_made_numbers():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]]))
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))  # no preference inside a uniform group
    assert group_advantages(torch.tensor([[0.0, 0.0, 0.0, 10.0]]), clip=1.0).max() == 1.0


def test_text_advantages_by_question_and_by_plan():
    # one question, 2 plans x 2 texts: plan 0 wrote two correct texts, plan 1 one of two
    r = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    def cfg(**method):  # LaDi-RL's text policy settings, nested in its own config
        return RLConfig(algo="ladi", adv_clip=None, method=LadiConfig(**method))

    by_question = text_advantages(r, r, 2, cfg(text_advantages="question"))
    assert torch.allclose(by_question, group_advantages(r))  # over all four texts
    assert by_question[0, 0] > 0 and by_question[0, 3] < 0
    by_plan = text_advantages(r, r, 2, cfg(text_advantages="plan"))
    assert torch.equal(by_plan[0, :2], torch.zeros(2))  # plan 0's texts agree: no preference
    assert torch.allclose(by_plan[0, 2:], torch.tensor([1.0, -1.0]), atol=1e-5)
    # W-REINFORCE reads the verifier's correctness, not the (format-weighted) reward
    w = text_advantages(r + 0.1, r, 2, cfg(advantage="w_reinforce", positive_weight=0.25))
    assert torch.equal(w, torch.tensor([[0.25, 0.25, 0.25, -1.0]]))
    with pytest.raises(ValueError, match="question"):
        cfg(text_advantages="text")


def test_plan_advantages_by_utility_and_by_pass_at_k():
    # one question, 4 plans x 2 texts: plans 0 and 1 each solved it once, plans 2 and 3 never
    correct = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    utility = correct.view(1, 4, 2).mean(-1)

    def cfg(**method):
        return RLConfig(algo="ladi", plans=4, samples_per_plan=2, adv_clip=None, method=LadiConfig(**method))

    assert torch.allclose(plan_advantages(utility, correct, 2, cfg()), group_advantages(utility))
    by_pass = plan_advantages(utility, correct, 2, cfg(plan_advantage="pass_at_k", plan_pass_k=2))
    assert torch.allclose(by_pass, pass_at_k_advantages(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), 2))
    assert by_pass[0, 0] > 0 and by_pass[0, 2] < 0 and by_pass[0, 0] == by_pass[0, 1]
    # 3 of 4 plans solved it: every pair of plans holds a solver, so no plan is pushed anywhere
    three = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    assert torch.equal(plan_advantages(three.view(1, 4, 2).mean(-1), three, 2,
                                       cfg(plan_advantage="pass_at_k", plan_pass_k=2)), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="plan_pass_k"):
        cfg(plan_advantage="pass_at_k", plan_pass_k=5)


def _pass_at_k_by_enumeration(correct: list[int], k: int) -> tuple[float, list[float]]:
    """pass@k of a group and each text's advantage, computed from the subsets themselves: the mean
    over all k-subsets containing a text of (max correct in the subset), minus the group's pass@k,
    is the text's credit (arXiv 2508.10751, eq. 9-10), then divided by the std of the group reward."""
    from itertools import combinations

    n = len(correct)
    subsets = list(combinations(range(n), k))
    hit = {s: float(any(correct[i] for i in s)) for s in subsets}
    rho = sum(hit.values()) / len(subsets)
    sigma = math.sqrt(rho * (1 - rho))
    adv = []
    for i in range(n):
        mine = [hit[s] for s in subsets if i in s]
        adv.append((sum(mine) / len(mine) - rho) / sigma if sigma > 0 else 0.0)
    return rho, adv


@pytest.mark.parametrize("correct,k", [([1, 0, 0, 0, 0, 0], 2), ([1, 1, 0, 0, 0, 0, 0, 0], 3),
                                       ([0, 1, 0, 1, 1, 0, 0], 4), ([1, 0, 0, 0], 1), ([1, 1, 1, 1], 2),
                                       ([0, 0, 0, 0, 0], 3), ([0, 1, 1, 1, 1, 1], 2)])
def test_pass_at_k_advantages_match_an_enumeration_of_the_subsets(correct, k):
    _, want = _pass_at_k_by_enumeration(correct, k)
    got = pass_at_k_advantages(torch.tensor([correct], dtype=torch.float32), k)[0]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    if k == 1 and 0 < sum(correct) < len(correct):  # at k = 1 it is GRPO's advantage
        assert torch.allclose(got, group_advantages(torch.tensor([correct], dtype=torch.float32))[0], atol=1e-4)


def test_pass_at_k_leaves_wrong_texts_alone_once_the_group_solves_it_at_k():
    # 6 of 8 correct at k = 4: every draw of 4 holds a correct text, so nothing is pushed anywhere
    assert torch.equal(pass_at_k_advantages(torch.tensor([[1.0] * 6 + [0.0] * 2]), 4), torch.zeros(1, 8))
    with pytest.raises(ValueError, match="group size"):
        pass_at_k_advantages(torch.ones(1, 4), 5)
    with pytest.raises(ValueError, match="pass_k"):
        RLConfig(algo="grpo", plans=4, samples_per_plan=2, method=GRPOConfig(advantage="pass_at_k", pass_k=64))


def test_clipped_surrogate_on_hand_made_numbers():
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    loss, stats = clipped_surrogate(ratio.log(), torch.zeros(5), adv, clip=0.2)
    assert torch.allclose(loss, torch.tensor([-1.2, -0.5, 0.8, 1.5, -1.1]))
    assert stats["clip_frac"] == pytest.approx(0.8)


def test_grpo_normalisations():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv = torch.tensor([1.0, -2.0])
    l_grpo, _ = grpo_loss(logp, logp, adv, mask, 0.2, "grpo")
    l_dr, _ = grpo_loss(logp, logp, adv, mask, 0.2, "dr_grpo", max_new_tokens=4)
    assert l_grpo.item() == pytest.approx((-1.0 + 2.0) / 2)  # per-sequence means, then the mean
    assert l_dr.item() == pytest.approx((-3.0 + 2.0) / (2 * 4))  # token sum over a constant
    with pytest.raises(ValueError):
        grpo_loss(logp, logp, adv, mask, 0.2, "nope")


def test_teacher_forcing_lays_out_prefix_then_target_with_labels_on_the_target_only():
    from training.common import teacher_forcing

    embed = torch.nn.Embedding(10, 3)
    prefixes = [torch.ones(2, 3), torch.full((1, 3), 5.0)]
    x, mask, labels = teacher_forcing(prefixes, [[4, 5, 6], [7]], embed)
    assert x.shape == (2, 5, 3)
    assert torch.equal(x[0, :2], prefixes[0]) and torch.equal(x[0, 2:], embed(torch.tensor([4, 5, 6])))
    assert torch.equal(x[1, :1], prefixes[1]) and torch.equal(x[1, 1], embed(torch.tensor(7)))
    assert not x[1, 2:].any()  # zero padding, masked out
    assert mask.tolist() == [[True] * 5, [True, True, False, False, False]]
    assert labels.tolist() == [[-100, -100, 4, 5, 6], [-100, 7, -100, -100, -100]]
    reads = [torch.zeros(3, 3), torch.zeros(1, 3)]  # what the decoder reads instead of the targets
    x2, _, labels2 = teacher_forcing(prefixes, [[4, 5, 6], [7]], embed, target_embeds=reads)
    assert not x2[0, 2:].any() and torch.equal(labels2, labels)


def test_grpo_first_step_gradient_is_the_policy_gradient():
    w = torch.randn(4, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([0.5, -1.0, 2.0, -1.5])
    logp = torch.log_softmax(w, -1) * mask
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask, 0.2, "grpo")
    (g,) = torch.autograd.grad(loss, w)
    logp2 = torch.log_softmax(w, -1) * mask
    pg = -((adv[:, None] * logp2).sum(-1) / mask.sum(-1)).mean()
    (g2,) = torch.autograd.grad(pg, w)
    assert torch.allclose(g, g2, atol=1e-6)


@pytest.fixture
def tiny_policy():
    torch.manual_seed(0)
    p = DiffusionPolicy(DiffusionPolicyConfig(latent_tokens=2, latent_dim=4, hidden_size=8, d_model=16, layers=1,
                                              heads=2), SamplerConfig(steps=5))
    torch.nn.init.normal_(p.denoiser.out.weight, std=0.2)
    return p.train()


def test_first_inner_step_ratio_is_exactly_one_and_gradient_is_the_plain_policy_gradient(tiny_policy):
    p = tiny_policy
    cond, mask = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    with torch.no_grad():
        plans = p.sample(cond, mask, 4, generator=torch.Generator().manual_seed(0), sde=True, diversity=0.3)
    logp = p.rescore(plans, cond, mask, guidance=1.0, diversity=0.3, noise_level=0.7).log_probs
    assert torch.equal(logp.detach(), plans.log_probs)  # ratio exactly 1
    adv = group_advantages(torch.randn(3, 4)).flatten()
    loss, stats = ladi_loss(logp, plans.log_probs, adv, clip=1e-4)
    assert stats["clip_frac"] == 0.0
    grads = torch.autograd.grad(loss, list(p.parameters()), allow_unused=True)
    logp2 = p.rescore(plans, cond, mask, guidance=1.0, diversity=0.3, noise_level=0.7).log_probs
    pg = -(adv[:, None] * logp2).mean()
    grads2 = torch.autograd.grad(pg, list(p.parameters()), allow_unused=True)
    for a, b in zip(grads, grads2):
        if a is not None:
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_sampling_and_rescoring_share_one_step_function_with_guidance_and_diversity(tiny_policy, monkeypatch):
    """`DiffusionPolicy.step` is the one denoising step: the sampler and LaDi-RL's re-scoring both
    call it, so a plan drawn at guidance 2.5 and diversity 0.3 re-scores to its own log-probs, from
    the settings the plan records."""
    p = tiny_policy
    cond, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    calls = []
    real = type(p).step

    def counted(self, *a, **kw):
        calls.append(kw.get("x_next") is not None)
        return real(self, *a, **kw)

    monkeypatch.setattr(type(p), "step", counted)
    with torch.no_grad():
        plans = p.sample(cond, mask, 3, generator=torch.Generator().manual_seed(0), sde=True, guidance=2.5,
                         diversity=0.3, noise_level=0.5)
    assert (plans.settings.guidance, plans.settings.diversity, plans.settings.noise_level) == (2.5, 0.3, 0.5)
    logp = p.rescore(plans, cond, mask).log_probs
    assert calls == [False] * 5 + [True] * 5  # 5 sampling steps, then 5 re-scored transitions
    # to float precision, not bit for bit: re-scoring runs each step at another batch layout (with
    # x_next given), and some CPUs' kernels round differently per batch shape (~3e-6 relative)
    torch.testing.assert_close(logp.detach(), plans.log_probs, rtol=1e-5, atol=1e-5)
    # the settings matter: another guidance, other log-probs
    other = p.rescore(plans, cond, mask, guidance=1.0).log_probs
    assert not torch.allclose(other.detach(), plans.log_probs)


@pytest.mark.slow
def test_a_policy_step_raises_the_log_probability_of_a_rewarded_plan(latent_ckpt):
    ck = load_checkpoint(latent_ckpt)
    from ladi_core.backends import TransformersBackend
    from ladi_core.decoder import load_decoder
    from ladi_core.generation import Reasoner

    model, tok = load_decoder(ck.decoder_dir)
    r = Reasoner(ck, TransformersBackend(model, tok))
    policy = ck.policy.train()
    embeds = r.prompt_embeds(r.prompt_ids(["Use 3 4 5 2 to make 23."]))
    cond, mask = pad_embeds(embeds)
    with torch.no_grad():
        plans = policy.sample(cond, mask, 4, generator=torch.Generator().manual_seed(1), sde=True, steps=4)
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5])  # plan 0 was rewarded
    # a small plain-gradient step: the first-order effect is what the objective promises (the late
    # denoising steps have tiny variances, so log-densities are steep and Adam's unit steps overshoot)
    opt = torch.optim.SGD(policy.parameters(), lr=1e-7)
    logp = policy.rescore(plans, cond, mask, guidance=1.0, diversity=0.0, noise_level=0.7).log_probs
    loss, _ = ladi_loss(logp, plans.log_probs, adv, clip=0.2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = policy.rescore(plans, cond, mask, guidance=1.0, diversity=0.0, noise_level=0.7).log_probs
    gain = (after - plans.log_probs).sum(-1)
    assert gain[0] > 0 and gain[0] > gain[1:].max()


def metrics_lines(out):
    path = out.with_name(out.name + ".work") / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if '"step"' in x and '"stage"' not in x]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ladi", "grpo"])
def test_trainer_smoke_run(algo, latent_ckpt, token_ckpt, tmp_path):
    init = latent_ckpt if algo == "ladi" else token_ckpt
    out = tmp_path / f"rl-{algo}"
    final = rl.main(["--algo", algo, "--init", str(init), "--out", str(out), "--preset", "smoke"])
    assert "pass@1" in final and "pass@2" in final
    cfg = read_config(out)
    assert cfg.kind == ("latent" if algo == "ladi" else "token")
    assert cfg.provenance.metrics["algo"] == algo and "final_eval" in cfg.provenance.metrics
    assert "training.rl" in cfg.provenance.command
    lines = metrics_lines(out)
    assert [x["step"] for x in lines] == [0, 1, 2, 3]
    for key in ("reward_mean", "reward_std", "zero_std_groups", "clip_frac", "approx_kl", "policy_loss",
                "plan_diversity", "token_entropy", "distinct_answers", "samples_per_s", "step_s"):
        assert key in lines[0], key
    assert lines[0]["clip_frac"] == 0.0  # one epoch per rollout: exactly on-policy


@pytest.mark.slow
def test_wrong_checkpoint_kind_is_refused(latent_ckpt, token_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="latent checkpoint"):
        rl.main(["--algo", "ladi", "--init", str(token_ckpt), "--out", str(tmp_path / "x"), "--preset", "smoke"])
    with pytest.raises(SystemExit, match="token-level"):
        rl.main(["--algo", "grpo", "--init", str(latent_ckpt), "--out", str(tmp_path / "y"), "--preset", "smoke"])


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(latent_ckpt, tmp_path, monkeypatch):
    args = ["--algo", "ladi", "--init", str(latent_ckpt), "--preset", "smoke", "--eval-questions", "2"]
    rl.main(args + ["--out", str(tmp_path / "a")])
    straight = metrics_lines(tmp_path / "a")

    real_step = rl.Trainer.step

    def crash_at_2(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(rl.Trainer, "step", crash_at_2)
    with pytest.raises(KeyboardInterrupt):
        rl.main(args + ["--out", str(tmp_path / "b")])
    monkeypatch.setattr(rl.Trainer, "step", real_step)
    rl.main(args + ["--out", str(tmp_path / "b"), "--resume"])
    resumed = metrics_lines(tmp_path / "b")
    assert [x["step"] for x in resumed] == [0, 1, 2, 3]
    drop = ("samples_per_s", "step_s", "rollout_s", "time")
    for a, b in zip(straight, resumed):
        assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


@pytest.mark.slow
def test_two_process_ddp_smoke_run(latent_ckpt, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "training.rl", "--algo", "ladi", "--init", str(latent_ckpt), "--out", str(out), "--preset", "smoke",
           "--steps", "2", "--eval-questions", "2", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ranks in sync" in r.stdout
    assert read_config(out).provenance.metrics["final_eval"]["questions"] == 2
    assert [x["step"] for x in metrics_lines(out)] == [0, 1]


def _jsonl_task(tmp_path, verifier: str):
    """A user's dataset: a few math questions, or HumanEval-format code problems."""
    rows = []
    for i in range(12):
        if verifier == "math":
            rows.append({"question": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)})
        else:
            rows.append({"question": f"Write add_{i}(x) returning x + {i}.",
                         "answer": {"prompt": f"def add_{i}(x):\n", "entry_point": f"add_{i}",
                                    "test": f"def check(candidate):\n    assert candidate(1) == {1 + i}\n"}})
    for r in rows[:3]:
        r["split"] = "test"
    for r in rows[3:]:
        r["split"] = "train"
    path = tmp_path / f"{verifier}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("algo,verifier", [("ladi", "math"), ("grpo", "code")])
def test_a_users_jsonl_task_trains_without_code_changes(algo, verifier, latent_ckpt, token_ckpt, tmp_path):
    data = _jsonl_task(tmp_path, verifier)
    init = latent_ckpt if algo == "ladi" else token_ckpt
    out = tmp_path / f"rl-{verifier}"
    final = rl.main(["--algo", algo, "--init", str(init), "--out", str(out), "--preset", "smoke", "--task",
                     str(data), "--verifier", verifier, "--steps", "2", "--eval-questions", "3"])
    assert final["questions"] == 3 and 0.0 <= final["pass@1"] <= 1.0
    assert [x["step"] for x in metrics_lines(out)] == [0, 1]
    assert read_config(out).provenance.config["task"] == str(data)
    assert read_config(out).provenance.config["verifier"] == verifier


@pytest.mark.slow
def test_latent_rl_with_vllm_rollouts(latent_ckpt, tmp_path):
    """LaDi-RL with the texts decoded by a vLLM engine (the decoder is frozen, the plans come from
    the live policy): the run completes, the policy moves, and the first step is exactly on-policy."""
    from ladi_core.checkpoint import load_checkpoint

    out = tmp_path / "rl-vllm"
    final = rl.main(["--algo", "ladi", "--init", str(latent_ckpt), "--out", str(out), "--preset", "smoke",
                     "--steps", "2", "--eval-questions", "2", "--lr", "1e-3", "--format-weight", "1.0",
                     "--rollout-backend", "vllm",
                     "--vllm-cpu-kvcache-space-gib", "1"])
    assert final["questions"] == 2
    lines = metrics_lines(out)
    assert [x["step"] for x in lines] == [0, 1] and lines[0]["clip_frac"] == 0.0
    assert read_config(out).provenance.config["rollout_backend"] == "vllm"
    before = load_checkpoint(latent_ckpt).policy.state_dict()
    after = load_checkpoint(out).policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_vllm_rollouts_under_torchrun_reach_every_ranks_engine(token_ckpt, tmp_path):
    """One vLLM engine per rank (two ranks, gloo): token GRPO trains the decoder, each rank's engine
    takes the new weights after the step (on vLLM's CPU build by restarting on them), and at the
    end every engine's greedy texts equal the trained decoder's own, on texts the update changed."""
    from ladi_core.backends import SamplingParams
    from ladi_core.generation import Reasoner
    from ladi_core.tasks import get_task

    out = tmp_path / "rl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "training.rl", "--algo", "grpo", "--init", str(token_ckpt), "--preset", "smoke", "--steps", "1",
           "--eval-questions", "2", "--threads", "1", "--lr", "3e-3", "--format-weight", "0.5",
           "--rollout-backend", "vllm", "--vllm-cpu-kvcache-space-gib", "1", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "restarts on the new weights after every step" in r.stdout
    assert "every engine has the trained weights" in r.stdout
    assert read_config(out).provenance.metrics["rollout_engine_greedy_match"] == [1.0, 1.0]
    # the check could fail: the update changed what the decoder writes greedily
    qs = [q.prompt for q in get_task("countdown").questions("test", 8, seed=1)]
    greedy = SamplingParams(0.0, 1.0, 48, seed=0)
    before, after = ([g.completions[0].text for g in Reasoner.from_checkpoint(c).generate(qs, 1, 1, greedy)]
                     for c in (token_ckpt, out))
    assert before != after


@pytest.mark.slow
def test_ddp_ends_with_the_weights_of_one_process_on_the_same_global_batch(token_ckpt, tmp_path):
    """Not the trainer's own "ranks in sync": two ranks, each half the questions, must end where one
    process with all of them ends (token GRPO: every text's stream is seeded by its question)."""
    from safetensors.torch import load_file

    common = ["-m", "training.rl", "--algo", "grpo", "--init", str(token_ckpt), "--preset", "smoke", "--steps", "2",
              "--eval-questions", "2", "--threads", "1", "--lr", "1e-4", "--format-weight", "0.5"]
    runs = {"ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(free_port()), *common], "one": [sys.executable, *common]}
    for name, cmd in runs.items():
        r = subprocess.run(cmd + ["--out", str(tmp_path / name)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    init = load_file(token_ckpt / "decoder" / "model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "decoder" / "model.safetensors")
    one = load_file(tmp_path / "one" / "decoder" / "model.safetensors")
    assert any(not torch.equal(init[k], one[k]) for k in init)  # the run moved the weights
    for k in one:
        assert torch.allclose(ddp[k], one[k], atol=1e-5, rtol=0), (k, (ddp[k] - one[k]).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("algo,flags", [
    ("grpo", ["--kl-beta", "0.1"]),
    ("ladi", ["--kl-beta", "0.1"]),
    ("ladi", ["--diversity", "0.5"]),
    ("ladi", ["--diversity", "0.5", "--repulsion", "rbf"]),
    ("grpo", ["--ppo-epochs", "2"]),
    ("grpo", ["--loss-norm", "dr_grpo"]),
    ("ladi", ["--text-policy-coef", "1", "--text-lr", "1e-4"]),
], ids=["grpo-kl", "ladi-kl", "ladi-diversity", "ladi-rbf-repulsion", "grpo-ppo2", "grpo-dr", "ladi-text-policy"])
def test_each_rl_flag_runs_end_to_end_with_figures_in_range(algo, flags, latent_ckpt, token_ckpt, tmp_path):
    init = latent_ckpt if algo == "ladi" else token_ckpt
    out = tmp_path / "run"
    # a format reward beside correctness: the smoke models' groups are rarely all equal, so every
    # step has advantages to move the weights with
    rl.main(["--algo", algo, "--init", str(init), "--out", str(out), "--preset", "smoke", "--steps", "2",
             "--eval-questions", "2", "--lr", "1e-3", "--format-weight", "0.5", *flags])
    lines = metrics_lines(out)
    assert [x["step"] for x in lines] == [0, 1]
    for x in lines:
        assert 0.0 <= x["reward_mean"] <= 1.5 and 0.0 <= x["zero_std_groups"] <= 1.0  # correct + 0.5 format
        assert 0.0 <= x["clip_frac"] <= 1.0 and x["approx_kl"] >= 0.0 and math.isfinite(x["policy_loss"])
    if "--kl-beta" in flags:
        assert all(x["kl_ref"] >= 0.0 for x in lines)
        assert lines[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # the first step starts at the reference
    if "--ppo-epochs" in flags:
        assert lines[0]["approx_kl"] > 0.0  # the second epoch's ratio has moved off 1
    if "--diversity" in flags:
        assert all(x["plan_diversity"] > 0 for x in lines)
    if "--text-policy-coef" in flags:
        before = load_file_decoder(init)
        after = load_file_decoder(out)
        assert any(not torch.equal(before[k], after[k]) for k in before)  # the text policy trained the decoder
    saved = read_config(out).provenance.config
    for flag, value in zip(flags[::2], flags[1::2]):
        key = flag[2:].replace("-", "_")
        got = saved[key] if key in saved else saved["method"][key]  # shared, or the method's own
        assert str(got) == value or got == float(value), (key, got)


def load_file_decoder(ckpt):
    from safetensors.torch import load_file

    return load_file(ckpt / "decoder" / "model.safetensors")


def _anchor_ce(ckpt) -> float:
    """The plan-conditioned likelihood a LaDi-RL run should keep: the writer's CE of reference
    solutions given their own posterior plans, on one fixed batch of training examples."""
    from ladi_core.decoder import load_decoder
    from ladi_core.tasks import get_task
    from training.algos.ladi import plan_anchor_loss
    from training.stage import Examples

    ck = load_checkpoint(ckpt)
    decoder, tok = load_decoder(ck.decoder_dir)
    with torch.no_grad():
        return plan_anchor_loss(decoder.eval(), ck.codec.eval(), Examples(get_task("countdown"), tok), 64, seed=99,
                                step=0, pad=tok.pad_token_id)[1]


@pytest.mark.slow
def test_the_anchor_keeps_the_plan_conditioned_likelihood_that_plain_rl_lowers(latent_ckpt, tmp_path):
    flags = ["--algo", "ladi", "--init", str(latent_ckpt), "--preset", "smoke", "--steps", "3", "--eval-questions",
             "2", "--format-weight", "0.5", "--text-policy-coef", "1", "--text-lr", "1e-4"]
    rl.main([*flags, "--out", str(tmp_path / "plain")])
    rl.main([*flags, "--out", str(tmp_path / "anchored"), "--anchor-coef", "10", "--anchor-batch", "32"])
    start, plain, anchored = (_anchor_ce(p) for p in (latent_ckpt, tmp_path / "plain", tmp_path / "anchored"))
    assert plain > start  # the text policy alone moves the decoder off its plans
    assert anchored < plain and anchored <= start + 0.25 * (plain - start)
    lines = metrics_lines(tmp_path / "anchored")
    assert all(math.isfinite(x["anchor_ce"]) for x in lines)


@pytest.mark.slow
@pytest.mark.parametrize("algo,ckpt", [("grpo", "token_ckpt"), ("coconut-grpo", "recurrent_ckpt")])
def test_a_text_policy_step_raises_the_log_probability_of_the_rewarded_text(algo, ckpt, request):
    """GRPO and Coconut GRPO: one optimiser step on a real rollout whose advantages reward one text
    (the others share the penalty) raises that text's log-probability, by more than the others' on
    average, and raises the advantage-weighted log-likelihood (texts that share a prefix with the
    rewarded one may rise with it)."""
    from ladi_core.backends import SamplingParams
    from ladi_core.codec import build_inputs_embeds
    from ladi_core.generation import Reasoner
    from ladi_core.tasks import get_task
    from training.algos import ALGORITHMS
    from training.algos.grpo import token_log_probs
    from training.rewards import default_rewards
    from training.rl_config import PRESETS, build_config
    from training.rollout import completion_ids

    reasoner = Reasoner.from_checkpoint(request.getfixturevalue(ckpt))
    cfg = build_config(algo, PRESETS["smoke"], {})
    decoder = reasoner.backend.trainable_decoder()
    method = ALGORITHMS[algo](cfg, reasoner, decoder, get_task("countdown").verifier, default_rewards(0.1))
    qs = get_task("countdown").questions("train", 1, seed=1)
    ro = method.rollout(reasoner, qs, [0], torch.Generator().manual_seed(0), SamplingParams(1.0, 1.0, 24))
    comps = [completion_ids(d, reasoner.tokenizer.eos_token_id) for row in ro.scored.decoded for d in row]
    g = len(comps)
    r = next(i for i, c in enumerate(comps) if comps.count(c) == 1)  # a text no other text repeats
    ro.advantages = torch.full((1, g), -1.0 / (g - 1))
    ro.advantages[0, r] = 1.0

    def text_log_probs() -> torch.Tensor:
        with torch.no_grad():
            embeds = build_inputs_embeds(decoder.get_input_embeddings(), ro.prompt_ids)
            prefixes = embeds if ro.thoughts is None else reasoner.prefixes(embeds, ro.thoughts)
            logp, _ = token_log_probs(decoder, [p for p in prefixes for _ in range(g)], comps, cfg.temperature)
        return logp.sum(-1)

    before = text_log_probs()
    opt = torch.optim.SGD(decoder.parameters(), lr=1e-2)
    loss, stats = method.loss(ro, {})
    assert stats["clip_frac"] == 0.0  # the first epoch is exactly on-policy
    opt.zero_grad()
    loss.backward()
    opt.step()
    gain = text_log_probs() - before
    others = torch.cat([gain[:r], gain[r + 1:]])
    assert gain[r] > 0 and gain[r] > others.mean() + 0.1, (r, gain)
    assert (ro.advantages[0] * gain).sum() > 0, (r, gain)


@pytest.mark.slow
@pytest.mark.parametrize("algo,init", [("grpo", "demo-token"), ("coconut-grpo", "demo-coconut")])
def test_a_short_run_on_a_tiny_task_raises_the_reward(algo, init, tmp_path):
    """40 steps on four Countdown questions from the shipped SFT checkpoint (so the start does not
    depend on how a smoke model trained): the reward of the last ten steps is well above the first
    five's (measured: grpo 0.47 -> 0.96, coconut-grpo 0.45 -> 0.74)."""
    from ladi_core.tasks import get_task

    task = get_task("countdown")
    rows = [(q, "train") for q in task.questions("train", 4, seed=3)] + [(task.questions("test", 1, seed=3)[0], "test")]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"question": q.prompt, "answer": q.reference, "split": split}) + "\n"
                            for q, split in rows))
    out = tmp_path / algo
    root = Path(__file__).resolve().parent.parent
    threads = torch.get_num_threads()
    try:  # one thread: a tiny model gains nothing from two, and a busy machine would oversubscribe them
        rl.main(["--algo", algo, "--init", str(root / "checkpoints" / init), "--out", str(out), "--preset", "smoke",
                 "--task", str(data), "--verifier", "countdown", "--steps", "40", "--eval-questions", "1",
                 "--lr", "3e-4", "--plans", "4", "--samples-per-plan", "2", "--seed", "0", "--threads", "1"])
    finally:  # later tests in this process (the resume tests compare against runs made with the default)
        torch.set_num_threads(threads)
    rewards = [x["reward_mean"] for x in metrics_lines(out)]
    assert len(rewards) == 40
    first, last = sum(rewards[:5]) / 5, sum(rewards[-10:]) / 10
    assert last > first + 0.15, rewards

"""The flow sampler: exact SDE log-densities, reproducible seeds, guidance and repulsion."""
import math

import pytest
import torch

from ladi_core import flow
from ladi_core.policies import DiffusionPolicy, DiffusionPolicyConfig, SamplerConfig


def test_sde_log_prob_matches_an_independent_gaussian_density():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 8, generator=g)
    v = torch.randn(5, 4, 8, generator=g)
    for sigma, nxt in [(1.0, 0.9), (0.6, 0.45), (0.1, 0.0)]:
        x_next, lp, _, _ = flow.sde_step(x, v, sigma, nxt, 0.7, g)
        # independent computation, straight from the Flow-GRPO formulas
        s = nxt if sigma == 1.0 else sigma
        std_t = 0.7 * math.sqrt(s / (1 - s))
        dt = nxt - sigma
        mean = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
        ref = torch.distributions.Normal(mean.double(), std_t * math.sqrt(-dt)).log_prob(x_next.double())
        assert torch.allclose(lp.double(), ref.flatten(1).sum(-1), rtol=1e-5, atol=1e-3)


def test_rescoring_a_stored_transition_gives_the_same_log_prob():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    x_next, lp, _, _ = flow.sde_step(x, v, 0.5, 0.4, 0.7, g)
    _, lp2, _, _ = flow.sde_step(x, v, 0.5, 0.4, 0.7, x_next=x_next)
    assert torch.equal(lp, lp2)
    _, lp3, _, _ = flow.sde_step(x, v + 0.1, 0.5, 0.4, 0.7, x_next=x_next)
    assert not torch.allclose(lp, lp3)


def test_sigma_schedule_runs_from_noise_to_data():
    s = flow.sigma_schedule(10)
    assert len(s) == 11 and s[0] == 1.0 and s[-1] == 0.0 and bool((s[1:] < s[:-1]).all())
    with pytest.raises(ValueError):
        flow.sigma_schedule(0)


def test_repulsion_ascends_the_diversity_objective():
    """g is the gradient of sum_j d_ij^2 exp(-d_ij^2 / s^2): close plans are pushed apart, plans far
    beyond the median scale s are drawn in, so the objective (not every distance) grows."""
    torch.manual_seed(0)
    x = torch.randn(2 * 4, 3, 5) * 0.1  # two questions, four plans each
    x[1] = x[0] + 1e-3  # a near-duplicate plan

    def objective(z, s2):
        d2 = torch.cdist(z.flatten(1)[None], z.flatten(1)[None])[0] ** 2
        return (d2 * torch.exp(-d2 / s2)).sum()

    g = flow.repulsion(x, 4)
    for q in range(2):
        z, gz = x[q * 4:(q + 1) * 4], g[q * 4:(q + 1) * 4]
        s2 = torch.pdist(z.flatten(1)).median() ** 2
        assert objective(z + 1e-3 * gz, s2) > objective(z, s2)
    assert (x[0] + 0.1 * g[0] - x[1] - 0.1 * g[1]).norm() > (x[0] - x[1]).norm()
    assert torch.equal(flow.repulsion(x, 1), torch.zeros_like(x))


def test_the_rbf_kernel_only_widens_where_ladirs_can_draw_the_plans_in():
    """With every weight positive, g = c L x for a graph Laplacian L (PSD): the plans' total spread
    (sum of squared pairwise distances) can only grow, on any configuration. LaDiR's kernel has
    negative weights beyond the median scale: on evenly spaced plans it draws the far pairs in more
    than it pushes the near ones apart, and the spread shrinks."""
    def spread(z):
        return (torch.pdist(z.flatten(1)) ** 2).sum()

    torch.manual_seed(1)
    for _ in range(20):
        x = torch.randn(5, 2, 3) * torch.rand(5, 1, 1) * 4
        assert spread(x + 1e-3 * flow.repulsion(x, 5, "rbf")) > spread(x)
    direction = torch.randn(2, 3)
    x = torch.arange(5.0)[:, None, None] * direction / direction.norm()  # five plans a step apart on a line
    assert spread(x + 1e-3 * flow.repulsion(x, 5, "ladir")) < spread(x)
    assert spread(x + 1e-3 * flow.repulsion(x, 5, "rbf")) > spread(x)
    # by hand: plan 0's push is mean_j 2 exp(-d_0j^2 / s^2) (x_0 - x_j), s = the median distance
    flat = x.flatten(1)
    s2 = torch.pdist(flat).median() ** 2
    want = sum(2 * torch.exp(-((flat[0] - flat[j]) ** 2).sum() / s2) * (flat[0] - flat[j]) for j in range(1, 5)) / 4
    assert torch.allclose(flow.repulsion(x, 5, "rbf")[0].flatten(), want, atol=1e-5)
    with pytest.raises(ValueError, match="rbf"):
        flow.repulsion(x, 5, "gauss")


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    p = DiffusionPolicy(DiffusionPolicyConfig(latent_tokens=3, latent_dim=8, hidden_size=16, d_model=32, layers=1,
                                              heads=2), SamplerConfig(steps=6))
    torch.nn.init.normal_(p.denoiser.out.weight, std=0.1)  # non-trivial velocities
    return p.eval()


def cond():
    c = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(5))
    m = torch.ones(2, 7, dtype=torch.bool)
    m[1, 5:] = False
    return c, m


@pytest.mark.parametrize("sde", [False, True])
def test_seeded_sampling_reproduces(policy, sde):
    c, m = cond()
    a = policy.sample(c, m, 3, generator=torch.Generator().manual_seed(7), sde=sde, diversity=0.3, guidance=1.5)
    b = policy.sample(c, m, 3, generator=torch.Generator().manual_seed(7), sde=sde, diversity=0.3, guidance=1.5)
    d = policy.sample(c, m, 3, generator=torch.Generator().manual_seed(8), sde=sde, diversity=0.3, guidance=1.5)
    assert a.latents.shape == (6, 3, 8)
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, d.latents)
    if sde:
        assert a.log_probs.shape == (6, 6) and a.trajectory.shape == (7, 6, 3, 8)
        assert torch.equal(a.log_probs, b.log_probs)


def test_sde_trajectory_log_probs_rescore_under_the_same_policy(policy):
    """What RL does: recompute each step's log-prob from the stored trajectory."""
    c, m = cond()
    s = policy.sample(c, m, 2, generator=torch.Generator().manual_seed(3), sde=True)
    cc, mm = c.repeat_interleave(2, 0), m.repeat_interleave(2, 0)
    for i in range(len(s.sigmas) - 1):
        sig, nxt = float(s.sigmas[i]), float(s.sigmas[i + 1])
        v = policy.velocity(s.trajectory[i], sig, policy.context(cc, mm), policy.sampler.guidance)
        _, lp, _, _ = flow.sde_step(s.trajectory[i], v, sig, nxt, policy.sampler.noise_level,
                                    x_next=s.trajectory[i + 1])
        assert torch.allclose(lp, s.log_probs[:, i], atol=1e-4)


def test_guidance_one_is_the_conditional_model(policy):
    c, m = cond()
    x = torch.randn(2, 3, 8)
    ctx = policy.context(c, m)
    v1 = policy.velocity(x, 0.5, ctx, 1.0)
    s = torch.full((2,), 0.5)
    assert torch.allclose(v1, policy.denoiser(x, s, ctx))
    v_u = policy.denoiser(x, s, ctx, torch.ones(2, dtype=torch.bool))
    v3 = policy.velocity(x, 0.5, ctx, 3.0)
    assert torch.allclose(v3, v_u + 3.0 * (v1 - v_u), atol=1e-5)


def test_question_context_masks_padding_and_hides_the_question(policy):
    c, m = cond()
    x = torch.randn(2, 3, 8)
    s = torch.full((2,), 0.4)
    v = policy.denoiser(x, s, policy.context(c, m))
    # row 1's padded tokens carry no information
    c2 = c.clone()
    c2[1, 5:] = 100.0
    assert torch.allclose(policy.denoiser(x, s, policy.context(c2, m)), v, atol=1e-5)
    # the question matters, unless it is hidden (then only the null token is seen)
    other = torch.randn(2, 7, 16)
    assert not torch.allclose(policy.denoiser(x, s, policy.context(other, m)), v, atol=1e-3)
    hide = torch.ones(2, dtype=torch.bool)
    assert torch.allclose(policy.denoiser(x, s, policy.context(other, m), hide),
                          policy.denoiser(x, s, policy.context(c, m), hide), atol=1e-5)
    # a context encoded once and repeated per plan equals encoding every plan's copy
    reps = torch.tensor([2, 3])
    once = policy.context(c, m).repeat(reps)
    each = policy.context(c.repeat_interleave(reps, 0), m.repeat_interleave(reps, 0))
    x5 = torch.randn(5, 3, 8)
    s5 = torch.full((5,), 0.7)
    assert torch.allclose(policy.denoiser(x5, s5, once), policy.denoiser(x5, s5, each), atol=1e-5)


def test_traced_denoiser_samples_the_same_plans_and_follows_the_weights():
    """What the server runs (`trace_denoiser`): the same plans as eager, any batch and question
    length, the same state dict, gradients still through the eager module, and weight updates seen."""
    torch.manual_seed(0)
    p = DiffusionPolicy(DiffusionPolicyConfig(latent_tokens=3, latent_dim=8, hidden_size=16, d_model=32, layers=1,
                                              heads=2), SamplerConfig(steps=4)).eval()
    torch.nn.init.normal_(p.denoiser.out.weight, std=0.1)
    c, m = cond()
    keys = sorted(p.state_dict())

    def plans():
        with torch.inference_mode():
            return p.sample(c, m, [3, 2], generator=torch.Generator().manual_seed(0), guidance=1.5,
                            diversity=0.3).latents

    eager = plans()
    p.trace_denoiser()
    assert torch.allclose(plans(), eager, atol=1e-5)
    assert sorted(p.state_dict()) == keys
    ctx = p.context(c, m).repeat(torch.tensor([3, 2]))
    x, s = torch.randn(5, 3, 8), torch.full((5,), 0.5)
    p.velocity(x, 0.5, ctx, 1.0).sum().backward()
    assert p.denoiser.out.weight.grad is not None
    with torch.no_grad():
        p.denoiser.out.bias.add_(0.5)
        assert torch.allclose(p.velocity(x, 0.5, ctx, 1.0), p.denoiser(x, s, ctx), atol=1e-5)
    assert not torch.allclose(plans(), eager, atol=1e-3)


def test_diversity_guidance_spreads_the_plans(policy):
    c, m = cond()
    plain = policy.sample(c, m, 6, generator=torch.Generator().manual_seed(0), diversity=0.0)
    spread = policy.sample(c, m, 6, generator=torch.Generator().manual_seed(0), diversity=2.0)
    d = lambda z: torch.pdist(z[:6].flatten(1)).mean()  # noqa: E731
    assert d(spread.latents) > d(plain.latents)


def test_flow_matching_loss_trains_towards_the_data():
    torch.manual_seed(0)
    p = DiffusionPolicy(DiffusionPolicyConfig(latent_tokens=2, latent_dim=4, hidden_size=8, d_model=32, layers=1,
                                              heads=2, cond_dropout=0.0))
    c, m = torch.randn(64, 3, 8), torch.ones(64, 3, dtype=torch.bool)
    z0 = torch.full((64, 2, 4), 2.0)
    opt = torch.optim.Adam(p.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = p.flow_matching_loss(z0, c, m)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    out = p.eval().sample(c[:4], m[:4], 2, generator=torch.Generator().manual_seed(0), steps=20).latents
    assert (out.mean() - 2.0).abs() < 0.5

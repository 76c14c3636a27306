"""training.eval writes the pass@k table, JSON and plot for several checkpoints."""
import json
import math

import pytest

from training import eval as ev

pytestmark = pytest.mark.slow


def test_eval_cli_writes_table_json_and_plot(latent_ckpt, token_ckpt, tmp_path):
    out = tmp_path / "res"
    results = ev.main(["--checkpoint", str(token_ckpt), "--checkpoint", str(latent_ckpt), "--task", "countdown",
                       "--problems", "6", "--k", "1,2,4", "--out", str(out), "--max-tokens", "48"])
    assert set(results) == {token_ckpt.name, latent_ckpt.name}
    data = json.loads((out / "results.json").read_text())
    for s in data["results"].values():
        assert s["questions"] == 6 and s["samples"] == 4
        assert 0 <= s["pass@1"] <= s["pass@2"] <= s["pass@4"] <= 1
    assert data["results"][latent_ckpt.name]["plan_distance"] > 0
    assert data["results"][token_ckpt.name]["plan_distance"] is None
    table = (out / "table.md").read_text()
    assert "pass@4" in table and latent_ckpt.name in table
    assert (out / "passk.png").stat().st_size > 1000
    rows = [json.loads(x) for x in (out / "per_question.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    # every figure recomputed from the per-question file, independently of training.eval's summary
    for name, s in data["results"].items():
        mine = [r for r in rows if r["checkpoint"] == name]
        for k in (1, 2, 4):
            est = [1 - math.comb(r["n"] - r["c"], k) / math.comb(r["n"], k) for r in mine]
            assert s[f"pass@{k}"] == pytest.approx(sum(est) / len(est))
        maj = []
        for r in mine:  # the most votes wins, ties to the answer seen first (votes are in first-seen order)
            best = max((v[1] for v in r["votes"]), default=0)
            maj.append(next((v[2] for v in r["votes"] if v[1] == best), False))
        assert s["maj@4"] == pytest.approx(sum(maj) / len(maj))
        assert s["distinct_correct"] == pytest.approx(sum(sum(v[2] for v in r["votes"]) for r in mine) / len(mine))
        assert all(sum(v[1] for v in r["votes"]) <= r["n"] and sum(v[1] for v in r["votes"] if v[2]) == r["c"]
                   for r in mine)


def test_eval_rejects_bad_k(latent_ckpt, tmp_path):
    with pytest.raises(SystemExit):
        ev.main(["--checkpoint", str(latent_ckpt), "--k", "0,1", "--out", str(tmp_path), "--problems", "2"])


def test_plan_diagnostics_decode_from_posterior_prior_and_noise(latent_reasoner):
    """ceiling@1 / prior@1 / noise@1 on the smoke checkpoint: each decodes from its own kind of plan
    (the reference's posterior mean, the prior's samples, N(0, I) noise) and scores what it decoded."""
    import torch

    from ladi_core.backends import SamplingParams
    from ladi_core.tasks import get_task

    task = get_task("countdown")
    qs = task.questions("test", 6, seed=0)
    seen, real_decode = [], latent_reasoner.decode

    def spy(prompts, plans, n, params, observer=None):
        out = real_decode(prompts, plans, n, params, observer)
        seen.append((plans.clone(), out))
        return out

    latent_reasoner.decode = spy
    try:
        d = ev.plan_diagnostics(latent_reasoner, qs, task.verifier, SamplingParams(1.0, 1.0, 48, seed=3), samples=2)
    finally:
        del latent_reasoner.decode
    _, _, post = ev.reference_posteriors(latent_reasoner, qs)
    assert d["diagnostic_questions"] == 6 and len(seen) == 3
    assert torch.equal(seen[0][0], post)  # the ceiling decodes from the references' own posteriors
    assert not torch.allclose(seen[1][0], post) and not torch.allclose(seen[2][0], post)
    for (_, outs), name in zip(seen, ("ceiling", "prior", "noise")):
        correct = [task.verifier.score(t.text, q.reference).correct >= 1.0 for q, ts in zip(qs, outs) for t in ts]
        assert d[f"{name}@1"] == sum(correct) / len(correct)
    assert abs(float(seen[2][0].std()) - 1.0) < 0.25  # the floor is unit noise in the policy's space


def test_the_smoke_codec_reconstructs_better_than_chance(latent_reasoner):
    """A reference reasoning is far likelier given its own latent than given another question's:
    the smoke checkpoint's plans carry the reasoning (exact-match reconstruction needs a longer run)."""
    from ladi_core.tasks import get_task

    qs = get_task("countdown").questions("test", 32, seed=0)
    info = ev.latent_information(latent_reasoner, qs)
    assert info["ce_own_z"] < 0.8 * info["ce_shuffled_z"], info
    follow = ev.plan_following(latent_reasoner, qs[:8], max_tokens=48)
    assert follow["plan_texts"] > 4, follow  # different plans, different texts: the decoder reads z


def test_an_interrupted_comparison_reuses_finished_checkpoints(latent_ckpt, token_ckpt, tmp_path, capsys):
    """make demo's comparison resumes: a checkpoint evaluated before with the same flags is read
    back from <out>/parts/, not evaluated again; other flags evaluate afresh."""
    out = tmp_path / "res"
    flags = ["--task", "countdown", "--problems", "3", "--k", "1,2", "--out", str(out), "--max-tokens", "24",
             "--diagnostic-questions", "2", "--probe-questions", "2"]
    first = ev.main(["--checkpoint", str(token_ckpt), *flags])
    capsys.readouterr()
    both = ev.main(["--checkpoint", str(token_ckpt), "--checkpoint", str(latent_ckpt), *flags])
    said = capsys.readouterr().out
    assert f"{token_ckpt.name}: evaluated before" in said and f"{latent_ckpt.name}: evaluated before" not in said
    assert both[token_ckpt.name] == first[token_ckpt.name]
    ev.main(["--checkpoint", str(token_ckpt), *flags, "--seed", "5"])
    assert "evaluated before" not in capsys.readouterr().out


def test_an_intermediate_row_on_fewer_questions_is_that_rows_figures_on_the_first_n(latent_ckpt, token_ckpt,
                                                                                     tmp_path):
    """--problems-for NAME=N: the row is the same evaluation on the first N questions of the list (the
    records match a run with --problems N); the other rows keep all of them; bad specs are refused."""
    flags = ["--task", "countdown", "--k", "1,2", "--max-tokens", "24", "--diagnostic-questions", "2",
             "--probe-questions", "2"]
    both = ev.main(["--checkpoint", str(token_ckpt), "--checkpoint", str(latent_ckpt), "--name", "tok",
                    "--name", "lat", "--problems", "4", "--problems-for", "lat=2", "--out", str(tmp_path / "a"),
                    *flags])
    alone = ev.main(["--checkpoint", str(latent_ckpt), "--name", "lat", "--problems", "2",
                     "--out", str(tmp_path / "b"), *flags])
    assert both["tok"]["questions"] == 4 and both["lat"]["questions"] == 2
    assert both["lat"]["pass@2"] == alone["lat"]["pass@2"] and both["lat"]["pass@1"] == alone["lat"]["pass@1"]
    rows = [json.loads(x) for x in (tmp_path / "a" / "per_question.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in rows].count("lat") == 2
    assert "| lat | 2 |" in (tmp_path / "a" / "table.md").read_text()
    for bad in ("lat", "lat=0", "nobody=1", "lat=9"):
        with pytest.raises(SystemExit):
            ev.main(["--checkpoint", str(latent_ckpt), "--name", "lat", "--problems", "4", "--problems-for", bad,
                     "--out", str(tmp_path / "c"), *flags])


def test_zero_probe_and_diagnostic_questions_skip_them(latent_ckpt, tmp_path):
    res = ev.main(["--checkpoint", str(latent_ckpt), "--task", "countdown", "--problems", "2", "--k", "1,2",
                   "--out", str(tmp_path / "res"), "--max-tokens", "24", "--probe-questions", "0",
                   "--diagnostic-questions", "0"])[latent_ckpt.name]
    assert "pass@2" in res and "plan_texts" not in res and "ceiling@1" not in res


def test_every_row_of_the_pass_at_k_plot_has_its_own_colour_and_style_and_families_share_a_marker():
    from training.eval import family, line_styles

    names = ["token-sft", "token-grpo", "ladir-codec", "ladir-writer", "ladir-sft", "ladi-rl", "dlr-sft", "dlr",
             "coconut-sft", "coconut-grpo", "latent-rl"]
    styles = line_styles(names)
    assert len({s[0] for s in styles.values()}) == len(names)  # no colour used twice
    assert len({(s[0], s[1]) for s in styles.values()}) == len(names)
    assert family("ladir-sft") == family("ladi-rl") and family("latent-rl") == family("coconut-sft")
    for a in names:
        for b in names:
            same = family(a) == family(b)
            assert (styles[a][2] == styles[b][2]) == same, (a, b)  # one marker per family

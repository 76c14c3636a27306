"""training.eval writes the pass@k table, JSON and plot for several checkpoints."""
import json

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
    assert len((out / "per_question.jsonl").read_text().splitlines()) == 12


def test_eval_rejects_bad_k(latent_ckpt, tmp_path):
    with pytest.raises(SystemExit):
        ev.main(["--checkpoint", str(latent_ckpt), "--k", "0,1", "--out", str(tmp_path), "--problems", "2"])

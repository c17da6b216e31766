"""Prediction trace on every family: sub-updates sum to the FFN output, the lens reproduces the model."""

from __future__ import annotations

import pytest
import torch

from ffnkit.core.errors import InvalidArgumentError, LayerIndexError
from ffnkit.inspect.lens import Lens
from ffnkit.inspect.tracing import trace
from tests.tiny_models import FAMILIES, tiny_inputs, tiny_model

REFUSED = {"bert", "roberta", "t5", "t5-gated"}  # no unembedding / two residual streams
TRACED = [f for f in FAMILIES if f not in REFUSED]
TARGET = 5


@pytest.fixture(scope="module", params=TRACED)
def traced(request):
    model = tiny_model(request.param)
    ids = tiny_inputs(model)["input_ids"][0]
    return request.param, model, trace(model, None, ids, target=TARGET, top_k=3, top_neurons=4)


def test_sub_updates_sum_to_ffn_output(traced):
    """All sub-updates m_i v_i (MoE: routing weights folded in) plus b_out = the FFN's output, exactly."""
    family, _, t = traced
    for lt in t.layers:
        recon = lt.contributions().sum(0)
        if lt.b_out is not None:
            recon = recon + lt.b_out
        assert (recon - lt.out).abs().max().item() < 1e-5, (family, lt.layer)


def test_lens_of_last_residual_is_the_models_prediction(traced):
    """The logit lens of the last block's output equals the model's own logits (final norm + E found right)."""
    family, model, t = traced
    lens_logits = Lens.of(model).logits(t.layers[-1].resid_after)
    assert torch.allclose(lens_logits, t.logits, atol=1e-4), family
    assert t.prediction[0]["id"] == int(t.logits.argmax())


def test_direct_effects_add_up(traced):
    """Σ neuron effects + b_out = the FFN's total direct effect = E_t·(g ⊙ c(after − before)) / s."""
    family, model, t = traced
    lens = Lens.of(model)
    for lt in t.layers:
        added = (lt.resid_after - lt.resid_before)[:, None]  # [d, 1] what the FFN wrote
        expected = float(lens.E[TARGET].float() @ lens.direction(added)[:, 0]) / t.final_scale
        assert abs(lt.target["ffn_total"] - expected) < 1e-3 + 1e-3 * abs(expected), (family, lt.layer)
        # and the neurons shown are the largest by |effect|
        effects = [abs(n["effect"]) for n in lt.target["top_neurons"]]
        assert effects == sorted(effects, reverse=True)


def test_sub_updates_ranked_by_score(traced):
    _, _, t = traced
    for lt in t.layers:
        scores = [s["score"] for s in lt.sub_updates]
        assert scores == sorted(scores, reverse=True) and len(scores) == 4
        for s in lt.sub_updates:
            assert abs(s["score"] - abs(s["m"]) * s["norm_v"]) < 1e-3


def test_residual_before_plus_ffn_is_after():
    """Llama: before the FFN = block input + attention output, captured independently here."""
    model = tiny_model("llama")
    ids = tiny_inputs(model)["input_ids"][0]
    t = trace(model, None, ids, layers=[1], top_k=3)
    seen = {}
    block = model.model.layers[1]
    h1 = block.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.update(x=a[0][0, -1]))
    with torch.no_grad():
        model(input_ids=ids[None])
    h1.remove()
    assert torch.allclose(t.layers[0].resid_before, seen["x"], atol=1e-5)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_refused_families_say_why(family):
    model = tiny_model(family)
    with pytest.raises(InvalidArgumentError):
        trace(model, None, tiny_inputs(model)["input_ids"][0])


def test_bad_layer_and_position():
    model = tiny_model("llama")
    ids = tiny_inputs(model)["input_ids"][0]
    with pytest.raises(LayerIndexError):
        trace(model, None, ids, layers=[7])
    with pytest.raises(InvalidArgumentError):
        trace(model, None, ids, position=50)


# ----- the command line, end to end on a saved tiny model ---------------------------------------------
def test_cli_inspect_and_steer(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.tiny_models import tiny_tokenizer

    root = Path(__file__).resolve().parents[2]
    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    env = {
        **os.environ,
        "PYTHONPATH": str(root / "src"),
        "FFNKIT_CACHE": str(tmp_path / "c"),
        "HF_HUB_OFFLINE": "1",
    }

    def ffnkit(*args):
        cmd = [sys.executable, "-m", "ffnkit", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    # one process runs the three commands through typer's runner (each subprocess start costs seconds)
    script = (
        "import json, sys; from typer.testing import CliRunner; from ffnkit.cli.main import app; r = CliRunner();"
        f"m = {str(model_dir)!r}; out = {{}};"
        "out['neurons'] = r.invoke(app, ['inspect', 'neurons', m, '--layer', '1', '--neurons', '2,3', '--top-k', '3', '--json']).stdout;"
        "out['search'] = r.invoke(app, ['inspect', 'search', m, '--words', 'fox,dog', '--top', '2', '--json']).stdout;"
        "out['trace'] = r.invoke(app, ['inspect', 'trace', m, '--prompt', 'the quick brown', '--target', 'fox', '--json']).stdout;"
        "out['steer'] = r.invoke(app, ['steer', 'neurons', m, '--prompt', 'the quick', '--layer', '0', '--neurons', '1,2', '--scale', '40', '--max-new-tokens', '4', '--json']).stdout;"
        "sys.stdout.write(json.dumps(out))"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    out = {k: json.loads(v) for k, v in json.loads(run.stdout).items()}
    assert [n["neuron"] for n in out["neurons"]["neurons"]] == [2, 3]
    assert len(out["neurons"]["neurons"][0]["promoted"]) == 3
    assert len(out["search"]["hits"]) == 2 and out["search"]["words"] == ["fox", "dog"]
    assert out["trace"]["target"]["token"].strip() == "fox" and len(out["trace"]["layers"]) == 2
    assert out["steer"]["edits"][0]["op"] == "scale" and "plain" in out["steer"] and "steered" in out["steer"]
    # a bad layer: one line on stderr, exit status 2
    bad = ffnkit("inspect", "neurons", str(model_dir), "--layer", "9", "--json")
    assert bad.returncode == 2 and "out of range" in bad.stderr and bad.stdout == ""

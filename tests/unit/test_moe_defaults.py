"""MoEfyConfig's defaults: experts and shared expert sized from each FFN's d_ff (auto_sizes), explicit
values win, bad ones are one-line errors, and a saved model reloads with the sizes it was made with."""

from __future__ import annotations

import json

import pytest
import torch

import ffnkit.moe.convert as convert
from ffnkit import find_ffns, load, save
from ffnkit.core.errors import InvalidArgumentError
from ffnkit.moe.convert import MoEfyConfig, auto_sizes, moefy_
from tests.tiny_models import F, tiny_inputs, tiny_model, tiny_tokenizer

CALIB = torch.randint(3, 90, (4, 24), generator=torch.Generator().manual_seed(5))


# expected sizes worked out by hand from the rule: shared0 = d_ff // 6, routed R = d_ff - shared0,
# width w = ceil(R / 80), experts E = R // w, shared = d_ff - E * w
@pytest.mark.parametrize(
    ("d_ff", "experts", "width", "shared"),
    [
        (1536, 80, 16, 256),  # SmolLM2-135M: 256 | R 1280, w 16, E 80: the measured best
        (48, 40, 1, 8),  # the tiny test models: 8 | R 40, w 1
        (32, 27, 1, 5),  # 5 | R 27, w 1
        (96, 80, 1, 16),  # 16 | R 80, w 1
        (128, 53, 2, 22),  # 21 | R 107, w 2, E 53 (106), 1 left over joins the shared expert
        (2560, 79, 27, 427),  # 426 | R 2134, w 27, E 79 (2133), 1 left over
        (14336, 79, 150, 2486),  # 2389 | R 11947, w 150, E 79 (11850), 97 left over
        (5, 5, 1, 0),  # 0 | R 5: no shared expert below d_ff 6
    ],
)
def test_auto_sizes_follow_the_rule(d_ff, experts, width, shared):
    assert auto_sizes(d_ff) == (experts, shared)
    assert experts * width + shared == d_ff
    assert MoEfyConfig().sizes_for(d_ff) == (experts, shared)


def test_auto_sizes_keep_their_bounds_for_every_width():
    for d_ff in range(1, 3000):
        e, s = auto_sizes(d_ff)
        width, rest = divmod(d_ff - s, e)
        assert 1 <= e <= 80 and rest == 0 and width >= 1
        assert d_ff // 6 <= s < d_ff // 6 + width  # about d_ff/6, plus less than one expert


@pytest.mark.parametrize(
    ("d_ff", "shared", "experts"),
    [(1536, 0, 64), (1536, 256, 80), (1536, 512, 64), (48, 8, 40), (48, 0, 48), (48, 12, 36)],
)
def test_auto_experts_for_a_given_shared_expert_divide_the_rest(d_ff, shared, experts):
    # the largest divisor of d_ff - shared that is at most 80 (1024 = 64 x 16, 48 = 48 x 1, 36 = 36 x 1)
    assert auto_sizes(d_ff, shared) == (experts, shared)
    assert MoEfyConfig(shared=shared).sizes_for(d_ff) == (experts, shared)


def test_no_experts_fit_a_prime_routed_width_above_80():
    with pytest.raises(InvalidArgumentError, match="give experts= or another shared") as err:
        auto_sizes(1536, shared=1536 - 97)  # 97 routed neurons: prime, so only 1 or 97 experts divide them
    assert "\n" not in str(err.value)


def test_the_defaults_are_the_measured_best_and_explicit_values_win():
    c = MoEfyConfig()
    assert (c.split, c.router, c.router_target, c.refit, c.refit_ridge, c.refit_tokens) == (
        "coact",
        "mlp",
        "norm",
        True,
        0.3,
        16384,
    )
    assert c.samples * c.seq_len == 16384 and c.router_hidden == 256 and c.active == 0.5
    assert c.experts is None and c.shared is None and c.needs_data
    assert MoEfyConfig(experts=4).sizes_for(F) == (4, 0)  # experts given: no shared expert, as before
    assert MoEfyConfig(experts=4, shared=8).sizes_for(F) == (4, 8)
    assert not MoEfyConfig(experts=4, split="random", router="centroid").needs_data


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"experts": 0}, "positive integer"),
        ({"experts": -2}, "positive integer"),
        ({"shared": -1}, "shared must be"),
        ({"experts": 5}, "do not divide"),
        ({"experts": 4, "shared": 6}, "do not divide"),
        ({"shared": F}, "no neuron of d_ff"),
        ({"active": 0.1}, r"give shared=0"),  # the auto shared expert (8 of 48) is above 10%
        ({"top_k": 41}, "top_k"),  # the auto sizes give 40 experts
    ],
)
def test_bad_explicit_values_are_one_line_errors_and_change_nothing(fields, match):
    model = tiny_model("llama")
    before = [f.W_in.clone() for f in find_ffns(model)]
    with pytest.raises(InvalidArgumentError, match=match) as err:
        moefy_(model, MoEfyConfig(**fields), calibration=CALIB)
    assert "\n" not in str(err.value)
    assert all(
        f.kind == "gated" and torch.equal(f.W_in, b) for f, b in zip(find_ffns(model), before, strict=True)
    )


def test_auto_defaults_convert_save_and_reload_exactly_whatever_the_rule_becomes(tmp_path, monkeypatch):
    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    report = moefy_(model, MoEfyConfig(router_steps=20, router_hidden=8), calibration=CALIB)
    # by hand for d_ff 48: 40 experts of 1 + 8 shared; active 0.5 -> (24 - 8) / 1 = 16 experts per token
    assert report.sizes == {"experts": 40, "expert_size": 1, "shared": 8, "top_k": 16}
    assert report.active_fraction == pytest.approx(0.5)
    ffns = find_ffns(model)
    assert all(f.kind == "moe" and f.num_experts == 40 and f.shared.d_ff == 8 for f in ffns)
    with torch.no_grad():
        want = model(**inputs).logits
    save(model, tiny_tokenizer(), tmp_path / "moe")
    blocks = json.loads((tmp_path / "moe" / "config.json").read_text())["ffnkit"]["changes"][-1]["blocks"]
    assert [(b["num_experts"], b["d_expert"], b["shared"], b["top_k"]) for b in blocks] == [
        (40, 1, 8, 16)
    ] * 2

    def changed_rule(*args, **kwargs):
        raise AssertionError("the reload must not size experts again")

    monkeypatch.setattr(convert, "auto_sizes", changed_rule)  # a later rule cannot change a saved model
    again, _ = load(tmp_path / "moe")
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, want)


def test_a_plan_made_for_other_sizes_is_refused():
    from ffnkit.moe.convert import plan_moefy

    model = tiny_model("llama")
    plan = plan_moefy(model, MoEfyConfig(experts=4, split="random", router="centroid"), calibration=CALIB)
    with pytest.raises(InvalidArgumentError, match="another number of experts"):
        moefy_(model, MoEfyConfig(split="random", router="centroid"), plan=plan)


def test_the_cli_help_states_the_config_defaults():
    """`ffnkit moe convert` passes only the options given, so its help's "(default X)" must be the config's."""
    import re

    import typer

    from ffnkit.cli.moe import moe_app

    convert_cmd = typer.main.get_command(moe_app).commands["convert"]
    helps = {p.name: p.help or "" for p in convert_cmd.params}
    config = MoEfyConfig()
    stated = {name: re.search(r"\(default ([^)]+)\)|Default (\S+?)\.$", h) for name, h in helps.items()}
    checked = {name: m.group(1) or m.group(2) for name, m in stated.items() if m}
    assert {"router_steps", "router_batch", "router_hidden", "refit_ridge", "refit_tokens", "samples"} <= set(
        checked
    )
    for name, value in checked.items():
        if name != "active":
            assert value == str(getattr(config, name)), name
    assert "coact" in helps["split"] and config.split == "coact"

"""The v5 MoE-block contract on converted models: find_ffns, capture, pruning, quantisation, steering
work unchanged; MoE++ experts and the gating residual compute what they should."""

from __future__ import annotations

import pytest
import torch

from ffnkit import ExpertEdit, NeuronEdit, capture, find_ffns, load, save, steer
from ffnkit.compress.prune import PruneConfig, prune_
from ffnkit.compress.quantize import QuantizeConfig, quantize_
from ffnkit.modules.moe import MoEBlock, link_routing_state
from ffnkit.moe.convert import MoEfyConfig, moefy_
from ffnkit.moe.pluspp import routing_shares
from tests.tiny_models import H, tiny_inputs, tiny_model, tiny_tokenizer

CALIB = torch.randint(3, 90, (4, 24), generator=torch.Generator().manual_seed(5))


def _converted(family: str = "llama", **fields):
    model = tiny_model(family)
    cfg = {"experts": 4, "split": "kmeans", "router": "centroid", "active": 0.5, "shared": 8, **fields}
    moefy_(model, MoEfyConfig(**cfg), calibration=CALIB)
    return model


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_capture_sites_of_a_converted_block(family):
    model = _converted(family)
    ffn = find_ffns(model)[0]
    with torch.no_grad(), capture(model, sites=["in", "router", "out"], layers=[0]) as cap:
        model(**tiny_inputs(model))
    x, logits, y = cap["in", 0], cap["router", 0], cap["out", 0]
    assert logits.shape == (x.shape[0], 4)
    torch.testing.assert_close(ffn(x), y, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ffn.router.logits(x), logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pruning_a_converted_model_then_save_and_reload(family, tmp_path):
    model = _converted(family)
    inputs = tiny_inputs(model)
    prune_(model, PruneConfig("magnitude", 0.5), calibration=CALIB)
    ffns = find_ffns(model)
    assert all(f.kind == "moe" and f.d_ff < 10 for f in ffns)
    x = torch.randn(5, H)
    with torch.no_grad():  # the handle (with the pruned bias slices) still recomputes the block
        torch.testing.assert_close(ffns[0](x), model.get_submodule(ffns[0].name)(x), atol=1e-5, rtol=1e-4)
    want = _logits(model, inputs)
    assert want.isfinite().all()
    save(model, tiny_tokenizer(), tmp_path / "m")
    again, _ = load(tmp_path / "m")
    assert torch.equal(_logits(again, inputs), want)


def test_quantising_a_converted_model_then_save_and_reload(tmp_path):
    model = _converted()
    inputs = tiny_inputs(model)
    before = _logits(model, inputs)
    quantize_(model, QuantizeConfig(bits=8, group_size=None))
    after = _logits(model, inputs)
    assert (after - before).abs().max() < 0.05 and not torch.equal(after, before)
    save(model, tiny_tokenizer(), tmp_path / "q")
    again, _ = load(tmp_path / "q")
    assert torch.equal(_logits(again, inputs), after)


def test_steering_experts_and_shared_neurons():
    model = _converted()
    inputs = tiny_inputs(model)
    base = _logits(model, inputs)
    with steer(model, [ExpertEdit(layer=0, on=[], off=[])]):
        torch.testing.assert_close(_logits(model, inputs), base)  # forcing no expert changes nothing
    with (
        capture(model, sites=["router"], layers=[0]) as cap,
        steer(model, [ExpertEdit(layer=0, on=[3], off=[0])]),
    ):
        with torch.no_grad():
            steered = model(**inputs).logits
    assert not torch.allclose(steered, base)
    block = model.get_submodule(find_ffns(model)[0].name)
    _, _, idx = block.gate.select(cap["router", 0])[0], None, block.gate.select(cap["router", 0])[1]
    assert (idx == 3).any(-1).all() and not (idx == 0).any()
    with steer(model, [NeuronEdit(layer=1, neurons=[0, 1], op="zero", expert="shared")]):
        assert not torch.allclose(_logits(model, inputs), base)
    torch.testing.assert_close(_logits(model, inputs), base)


def test_zero_experts_absorb_slots_and_are_reported():
    model = _converted(zero_experts=2, zero_threshold=2.0)  # a slot below half the mass share is skipped
    shares = routing_shares(model, CALIB)
    assert 0 < shares["zero_share"] <= 1 and shares["compute_saved"] == pytest.approx(shares["zero_share"])
    assert shares["slots"] == 2 * CALIB.numel() * 2  # two layers, top-2
    assert len(shares["layers"]) == 2
    loose = routing_shares(_converted(zero_experts=2, zero_threshold=1e-6), CALIB)
    assert loose["zero_share"] == 0.0


def test_copy_and_constant_experts_and_the_gating_residual():
    torch.manual_seed(0)
    block = MoEBlock(H, 6, 3, 2, router={"n_zero": 1, "n_copy": 1, "n_constant": 1})
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(7, H)
    logits, w, idx = block.gate(x)
    assert logits.shape == (7, 6)
    # oracle: every slot by hand
    want = torch.zeros(7, H)
    gu, down = block.experts.gate_up_proj, block.experts.down_proj
    with torch.no_grad():
        for t in range(7):
            for j in range(2):
                e, wt = int(idx[t, j]), w[t, j]
                if e < 3:
                    h = gu[e] @ x[t]
                    want[t] += wt * (down[e] @ (torch.nn.functional.silu(h[:6]) * h[6:]))
                elif e == 4:
                    want[t] += wt * x[t]
                elif e == 5:
                    a = torch.softmax(block.constant_mix[0] @ x[t], -1)
                    want[t] += wt * (a[0] * x[t] + a[1] * block.constant_value[0])
        torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-4)
    # gating residual: block 2's logits add W_g · block 1's logits
    b1 = MoEBlock(H, 6, 3, 1, layer=0)
    b2 = MoEBlock(H, 6, 3, 1, layer=1, router={"residual": True})
    with torch.no_grad():
        for p in [*b1.parameters(), *b2.parameters()]:
            p.normal_(std=0.3)
    link_routing_state([b1, b2])
    with torch.no_grad(), capture_router(b2) as seen:
        b2(b1(x))
    previous = b1.gate.router_logits(x)
    torch.testing.assert_close(seen[0], b2.gate.router_logits(b1(x), previous), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(seen[0], b2.gate.router_logits(b1(x)))


class capture_router:  # noqa: N801
    """Collect a block's router logits (the hook_router HookPoint)."""

    def __init__(self, block):
        self.block, self.seen = block, []

    def __enter__(self):
        self.h = self.block.hook_router.register_forward_hook(lambda m, a, o: self.seen.append(o))
        return self.seen

    def __exit__(self, *exc):
        self.h.remove()


def test_generate_runs_on_a_converted_model():
    model = _converted(router="mlp", router_steps=10)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)

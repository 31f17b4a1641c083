"""Turns cut by the generation limit: counted per agent, reported, and warned about before a
run whose `max_new_tokens` is shorter than the turns its adapter was trained on."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from stepflow.config import LLMConfig, load_params
from stepflow.data.trajectory import EpisodeStats
from stepflow.evaluate.metrics import agent_metrics
from stepflow.evaluate.report import markdown_table
from stepflow.llm.served_adapters import warn_short_generation, with_adapter
from stepflow.provenance import GENERATION_MARGIN, generation_shortfall
from stepflow.train.examples import build_examples
from tests.sample_trajectories import sample_set
from tests.test_trajectory_io import make_trajectory

REPO = Path(__file__).resolve().parent.parent


def _episode(variation: int, truncated: int, fitted: int = 0):
    stats = EpisodeStats(parse_failures=truncated, truncated=truncated, fitted_prompts=fitted)
    return make_trajectory(variation, steps=4).model_copy(update={"stats": stats})


def test_truncated_turns_are_summed_per_agent_and_reported(params_file) -> None:
    episodes = [_episode(0, 0), _episode(1, 3, fitted=2), _episode(2, 1)]
    metrics = agent_metrics("step", "test", episodes, samples=100)
    overall = metrics.overall
    assert (overall.truncated_turns, overall.steps, overall.fitted_prompts) == (4, 12, 2)
    assert overall.truncation_rate == pytest.approx(4 / 12)
    flat = metrics.flat()
    assert flat["truncated_turns"] == 4 and flat["truncation_rate"] == pytest.approx(4 / 12)
    assert flat["fitted_prompts"] == 2
    task = episodes[0].task_type
    assert flat[f"truncated_turns/{task}"] == 4
    table = markdown_table({"step": metrics}, "test", load_params(params_file))
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| agent | avg reward"))
    header, _, row = lines[start : start + 3]
    columns = [c.strip() for c in header.strip("|").split("|")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert columns.index("truncated turns") == columns.index("parse failures / step") + 1
    assert cells[columns.index("truncated turns")] == "4"


def test_metrics_written_before_the_field_existed_still_load() -> None:
    from stepflow.evaluate.metrics import AgentMetrics

    data = agent_metrics("base", "test", [_episode(0, 1)], samples=10).model_dump(mode="json")
    for group in (data["overall"], *data["per_task"].values()):
        for key in ("truncated_turns", "truncation_rate", "fitted_prompts"):
            del group[key]
    assert AgentMetrics.model_validate(data).overall.truncated_turns == 0


def test_model_card_length_and_the_warning(tmp_path, tokenizer, caplog) -> None:
    _, stats = build_examples(sample_set(), tokenizer, max_seq_len=4096)
    longest = stats.max_trained_turn_tokens
    assert 20 < longest < 200  # a reflection turn of the sample set, end-of-turn included
    adapter = tmp_path / "step"
    adapter.mkdir()
    (adapter / "stepflow.json").write_text(json.dumps({"max_trained_turn_tokens": longest}))
    assert generation_shortfall(adapter, longest + GENERATION_MARGIN) == 0
    assert generation_shortfall(adapter, longest) == GENERATION_MARGIN
    assert generation_shortfall(tmp_path / "no-card", 1) == 0  # unknown: no warning

    short = LLMConfig(generation={"max_new_tokens": longest - 10})
    with caplog.at_level(logging.WARNING, logger="stepflow.llm.served_adapters"):
        config, path = with_adapter(short, "step", adapter)  # the evaluation/synthesis path
    assert (config, path) == (short, adapter)
    assert f"{GENERATION_MARGIN + 10} tokens short" in caplog.text
    assert f"longest trained assistant turn is {longest} tokens" in caplog.text
    caplog.clear()
    enough = LLMConfig(generation={"max_new_tokens": longest + GENERATION_MARGIN})
    assert warn_short_generation(enough, "step", adapter) == 0 and not caplog.text


def test_default_generation_length_holds_the_trained_turns(tokenizer) -> None:
    params = load_params(REPO / "params.yaml")
    _, stats = build_examples(sample_set(), tokenizer, max_seq_len=params.training.max_seq_len)
    assert params.student.generation.max_new_tokens >= (
        stats.max_trained_turn_tokens + GENERATION_MARGIN
    )

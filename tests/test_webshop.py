"""WebShop adapter over real HTTP against the test stand-in server (see its docstring for
why the real site cannot run here), golden trajectories from imported demonstrations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepflow.config import ConfigError, WebShopConfig, load_params
from stepflow.data.trajectory import read_trajectories
from stepflow.envs import make_env
from stepflow.envs.base import TaskInstance
from stepflow.envs.webshop import WebShopEnv, WebShopUnavailable
from tests.conftest import run_tiny_stages
from tests.servers.webshop_standin import start_in_thread

SHOES = {"size": ["8", "9", "10"], "color": ["red", "blue"]}
CATALOGUE = {
    "products": [
        {
            "asin": "B0SHOE1",
            "name": "Red running shoes for men",
            "category": "shoes",
            "price": 30.0,
            "options": SHOES,
            "attributes": ["running", "lightweight"],
            "description": "Light shoes for road running.",
        },
        {
            "asin": "B0SHOE2",
            "name": "Leather dress shoes",
            "category": "shoes",
            "price": 120.0,
            "options": {"size": ["9", "10"]},
            "attributes": ["leather"],
        },
        {
            "asin": "B0TEA01",
            "name": "Green tea, 100 bags",
            "category": "tea",
            "price": 9.5,
            "options": {"pack": ["1", "3"]},
            "attributes": ["organic"],
        },
        {
            "asin": "B0TEA02",
            "name": "Black tea loose leaf",
            "category": "tea",
            "price": 14.0,
            "attributes": ["loose leaf"],
        },
    ],
    "goals": [
        {
            "instruction_text": "i need red running shoes in size 9, price lower than 50 dollars",
            "category": "shoes",
            "attributes": ["running"],
            "options": {"size": "9", "color": "red"},
            "price_upper": 50.0,
        },
        {
            "instruction_text": "i want organic green tea, pack of 3, price lower than 20 dollars",
            "category": "tea",
            "attributes": ["organic"],
            "options": {"pack": "3"},
            "price_upper": 20.0,
        },
        {
            "instruction_text": "i want loose leaf black tea, price lower than 20.00 dollars",
            "category": "tea",
            "attributes": ["loose leaf"],
            "price_upper": 20.0,
        },
        {
            "instruction_text": "i need leather dress shoes in size 10, under 150 dollars",
            "category": "shoes",
            "attributes": ["leather"],
            "options": {"size": "10"},
            "price_upper": 150.0,
        },
        {
            "instruction_text": "i need lightweight running shoes size 8 in blue, under 40 dollars",
            "category": "shoes",
            "attributes": ["lightweight"],
            "options": {"size": "8", "color": "blue"},
            "price_upper": 40.0,
        },
        {
            "instruction_text": "i want organic green tea, a single pack, under 10 dollars",
            "category": "tea",
            "attributes": ["organic"],
            "options": {"pack": "1"},
            "price_upper": 10.0,
        },
    ],
}
DEMOS = {
    0: ["search[red running shoes]", "click[B0SHOE1]", "click[9]", "click[red]", "click[Buy Now]"],
    1: ["search[green tea]", "click[B0TEA01]", "click[3]", "click[Buy Now]"],
    2: ["search[black tea loose leaf]", "click[B0TEA02]", "click[Buy Now]"],
    3: ["search[leather dress shoes]", "click[B0SHOE2]", "click[10]", "click[Buy Now]"],
    4: ["search[running shoes]", "click[B0SHOE1]", "click[8]", "click[blue]", "click[Buy Now]"],
    5: ["search[green tea bags]", "click[B0TEA01]", "click[1]", "click[Buy Now]"],
}


def write_demonstrations(path: Path) -> Path:
    """Human demonstrations in the conversation format (as agent-tuning projects ship them)."""
    records = []
    for goal, actions in DEMOS.items():
        conversations = [{"from": "human", "value": CATALOGUE["goals"][goal]["instruction_text"]}]
        for action in actions:
            conversations.append({"from": "gpt", "value": f"Thought: next.\nAction: {action}"})
            conversations.append({"from": "human", "value": "Observation: ..."})
        records.append({"id": f"webshop_{goal}", "conversations": conversations})
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def server_url():
    server, url = start_in_thread(CATALOGUE)
    yield url
    server.shutdown()


@pytest.fixture
def env(server_url, tmp_path):
    demos = write_demonstrations(tmp_path / "demos.json")
    config = WebShopConfig(url=server_url, demonstrations=demos, train_goals=(2, 6))
    with WebShopEnv(config) as env:
        yield env


def goal(index: int) -> TaskInstance:
    return TaskInstance("webshop", "shop", index, "test")


def test_demonstration_reaches_full_reward(env) -> None:
    instruction, page = env.reset(goal(0))
    assert instruction.startswith("i need red running shoes")
    assert page.endswith("[Search]") and env.valid_actions() == ["search[<keywords>]"]
    results = [env.step(action) for action in env.gold_actions()]
    assert "[B0SHOE1]" in results[0].observation and "Total results: 2" in results[0].observation
    assert "size [8][9][10]" in results[1].observation
    assert results[2].observation == "You have clicked 9."
    assert results[-1].done and results[-1].success and results[-1].reward == 1.0
    assert results[-1].observation == "Your score (min 0.0, max 1.0): 1"


def test_wrong_then_right_and_invalid_actions(env) -> None:
    env.reset(goal(0))
    assert not env.step("click[Buy Now]").valid  # nothing to buy on the search page
    assert not env.step("buy shoes").valid
    env.step("search[shoes]")
    assert not env.step("search[again]").valid  # no search box on a results page
    item = env.step("click[b0shoe2]")  # the wrong product (case-insensitive click)
    assert "Leather dress shoes" in item.observation and "click[Buy Now]" in env.valid_actions()
    back = env.step("click[< Prev]")
    assert "[B0SHOE1]" in back.observation
    env.step("click[B0SHOE1]")
    assert "Light shoes" in env.step("click[Description]").observation
    env.step("click[< Prev]")
    env.step("click[9]")
    partial = env.step("click[Buy Now]")  # color not chosen: part of the reward
    assert partial.done and not partial.success and 0 < partial.reward < 1


def test_restore_and_unreachable_server(env) -> None:
    actions = ["search[green tea]", "click[B0TEA01]", "click[3]"]
    env.reset(goal(1))
    [env.step(a) for a in actions]
    env.restore(goal(1), actions)
    assert env.step("click[Buy Now]").success
    assert env.variations("shop", "train") == [2, 3, 4, 5]
    dead = WebShopEnv(WebShopConfig(url="http://127.0.0.1:9", timeout_s=2))
    with dead, pytest.raises(WebShopUnavailable, match=r"env\.webshop\.url"):
        dead.reset(goal(0))


def test_params_select_webshop(params_file, server_url) -> None:
    params = load_params(params_file, ["env.name=webshop", "env.task_types=[shop]"])
    assert params.env.webshop.url == "http://127.0.0.1:3000"
    with make_env(params.env) as env:
        assert isinstance(env, WebShopEnv)
    with pytest.raises(ConfigError, match=r"env\.webshop\.url"):
        load_params(params_file, ["env.name=webshop", "env.webshop.url=localhost:3000"])


@pytest.mark.slow
def test_pipeline_stages_on_webshop(tmp_path, server_url, embedded_dir) -> None:
    demos = write_demonstrations(tmp_path / "demos.json")
    outputs = run_tiny_stages(
        tmp_path,
        {
            "env.name": "webshop",
            "env.task_types": ["shop"],
            "env.webshop": {
                "url": server_url,
                "demonstrations": str(demos),
                "train_goals": [2, 6],
                "dev_goals": [6, 6],
                "test_goals": [0, 2],
            },
            "env.step_limit": 6,
            "splits.train_per_task": 4,
        },
    )
    assert outputs["prepare"].kept == {"u1": 2, "u2": 2}
    golden = list(read_trajectories(tmp_path / "data/golden_d1.jsonl"))
    assert all(t.env == "webshop" and t.reward == 1.0 for t in golden)
    assert "WebShop" in golden[0].turns[0].content
    assert outputs["synthesis"].episodes == 2
    assert outputs["metrics"].instances == ["webshop/shop/0", "webshop/shop/1"]

"""U1/U2/test/dev splits: disjoint, deterministic for a seed, covering the task types."""

from __future__ import annotations

import pytest

from stepflow.config import load_params
from stepflow.data.splits import build_manifest, load_manifest, split_train, write_manifest
from stepflow.envs.scienceworld import ScienceWorldEnv

TASKS = ["find-non-living-thing", "lifespan-longest-lived", "find-plant"]


@pytest.fixture(scope="module")
def env():
    with ScienceWorldEnv() as environment:
        yield environment


def _params(params_file, seed=0, **splits):
    overrides = [f"seed={seed}", f"env.task_types={TASKS}"]
    overrides += [f"splits.{k}={v}" for k, v in splits.items()]
    return load_params(params_file, overrides)


def test_splits_disjoint_and_cover_tasks(env, params_file) -> None:
    params = _params(params_file, train_per_task=6, test_per_task=3, dev_per_task=2)
    manifest = build_manifest(env, params)
    keys = {s: {i.key for i in manifest.select(s)} for s in ("u1", "u2", "test", "dev")}
    for a in keys:
        for b in keys:
            if a < b:
                assert not keys[a] & keys[b], (a, b)
    counts = manifest.counts()
    assert set(counts) == set(TASKS)
    for task in TASKS:
        assert counts[task] == {"u1": 3, "u2": 3, "test": 3, "dev": 2}
    official_test = set(env.variations(TASKS[0], "test"))
    assert {i.variation for i in manifest.select("test", task_types=[TASKS[0]])} <= official_test
    official_train = set(env.variations(TASKS[0], "train"))
    picked = {i.variation for i in manifest.select("u1", "u2", task_types=[TASKS[0]])}
    assert picked <= official_train


def test_splits_deterministic_for_a_seed(env, params_file) -> None:
    a = build_manifest(env, _params(params_file, seed=7, train_per_task=6))
    b = build_manifest(env, _params(params_file, seed=7, train_per_task=6))
    c = build_manifest(env, _params(params_file, seed=8, train_per_task=6))
    assert a.instances == b.instances
    assert a.instances != c.instances


def test_a_fixed_evaluation_seed_keeps_the_test_instances_across_seeds(env, params_file) -> None:
    def keys(manifest, *splits):
        return {i.key for i in manifest.select(*splits)}

    fixed = {"train_per_task": 8, "test_per_task": 3, "dev_per_task": 2, "evaluation_seed": 0}
    a = build_manifest(env, _params(params_file, seed=1, **fixed))
    b = build_manifest(env, _params(params_file, seed=2, **fixed))
    assert keys(a, "test") == keys(b, "test") and keys(a, "dev") == keys(b, "dev")
    assert keys(a, "u1") != keys(b, "u1")  # the training split still follows the seed
    del fixed["evaluation_seed"]
    c = build_manifest(env, _params(params_file, seed=2, **fixed))
    assert keys(c, "test") != keys(b, "test")


def test_task_order_does_not_change_splits(env, params_file) -> None:
    forward = build_manifest(env, _params(params_file, train_per_task=4))
    params = load_params(
        params_file, [f"env.task_types={list(reversed(TASKS))}", "splits.train_per_task=4"]
    )
    backward = build_manifest(env, params)
    assert set(forward.instances) == set(backward.instances)


def test_fraction_controls_u1_share() -> None:
    variations = list(range(20))
    u1, u2 = split_train(variations, 0.25, 0, "t")
    assert len(u1) == 5 and len(u2) == 15
    assert sorted(u1 + u2) == variations
    u1, u2 = split_train([3, 4], 0.9, 0, "t")
    assert len(u1) == 1 and len(u2) == 1


def test_unknown_task_type_and_too_few_instances(env, params_file) -> None:
    params = load_params(params_file, ["env.task_types=[no-such-task]"])
    with pytest.raises(ValueError, match="no-such-task"):
        build_manifest(env, params)
    params = _params(params_file, train_per_task=1)
    with pytest.raises(ValueError, match="train_per_task"):
        build_manifest(env, params)


def test_manifest_round_trip(env, params_file, tmp_path) -> None:
    manifest = build_manifest(env, _params(params_file, train_per_task=4))
    write_manifest(tmp_path / "manifest.json", manifest)
    assert load_manifest(tmp_path / "manifest.json") == manifest


def test_another_engines_section_leaves_every_digest_alone(env, params_file) -> None:
    """Changing `env.alfworld` marks nothing stale in a ScienceWorld run (manifest, golden
    data, episodes, synthesis, evaluation), and every digest of an ALFWorld run changes."""
    from stepflow.data.prepare import prepare_hash
    from stepflow.evaluate.evaluation import evaluation_digest
    from stepflow.rollout.episode import EpisodeSettings
    from stepflow.teacher.synthesis import synthesis_digest

    def digests(overrides: list[str]) -> dict[str, str]:
        params = load_params(params_file, [f"env.task_types={TASKS}", *overrides])
        found = {
            "prepare": prepare_hash(params),
            "episode": EpisodeSettings.from_params(params).params_hash,
            "synthesis": synthesis_digest(params, None),
            "evaluation": evaluation_digest(params, "base"),
        }
        if params.env.name == "scienceworld":
            found["manifest"] = build_manifest(env, params).params_hash
        return found

    other_engine = "env.alfworld.golden_max_steps=7"
    assert digests([other_engine]) == digests([])

    alfworld = ["env.name=alfworld", "env.task_types=[look_at_obj_in_light]"]
    before, after = digests(alfworld), digests([*alfworld, other_engine])
    assert [key for key in before if before[key] == after[key]] == []

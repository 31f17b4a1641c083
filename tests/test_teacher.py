"""Teachers and self-reflected synthesis on real ScienceWorld with the embedded student."""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stepflow.agent.prompts import format_step
from stepflow.config import load_params
from stepflow.data.prepare import example_for, load_examples, load_prepared
from stepflow.data.trajectory import Trajectory, read_trajectories
from stepflow.envs import make_env
from stepflow.envs.base import TaskInstance
from stepflow.llm import make_backend
from stepflow.llm.base import Completion
from stepflow.rollout.engine import rollout
from stepflow.rollout.episode import EpisodeSettings
from stepflow.teacher import templates
from stepflow.teacher.base import StepFacts
from stepflow.teacher.llm import LLMTeacher, MalformedAnswer, parse_answer
from stepflow.teacher.reference import Alignment, ReferenceTeacher, gold_steps
from stepflow.teacher.reviewer import TeacherReviewer, should_rewind
from stepflow.teacher.synthesis import synthesize
from tests.test_trajectory_io import make_trajectory

# -- strict parsing of the LLM teacher's answer -------------------------------------------
GOOD_ANSWERS = [
    ('{"verdict": "correct"}', "correct", None),
    (
        '  {"verdict": "wrong", "reflection": "Wrong room.", "thought": "Go back.", '
        '"action": "go to kitchen"}  ',
        "wrong",
        "go to kitchen",
    ),
    (
        '```json\n{"verdict": "wrong", "reflection": "r", "action": "look around"}\n```',
        "wrong",
        "look around",
    ),
]
BAD_ANSWERS = [
    "The step is correct.",
    '{"verdict": "maybe"}',
    '{"verdict": "wrong", "reflection": "bad"}',
    '{"verdict": "wrong", "reflection": "", "action": "go to kitchen"}',
    '{"verdict": "wrong", "reflection": "r", "action": "go\\nlook"}',
    'Sure! {"verdict": "correct"}',
    '{"verdict": "correct"',
    "",
]


@pytest.mark.parametrize(("text", "verdict", "action"), GOOD_ANSWERS)
def test_parse_good_answers(text, verdict, action) -> None:
    answer = parse_answer(text)
    assert answer.verdict == verdict
    assert answer.action == action


@pytest.mark.parametrize("text", BAD_ANSWERS)
def test_parse_rejects_malformed_answers(text) -> None:
    with pytest.raises(MalformedAnswer):
        parse_answer(text)


# -- reference alignment and verdicts -------------------------------------------------------
def _reference(actions: list[str]) -> Trajectory:
    trajectory = make_trajectory(steps=len(actions))
    turns = list(trajectory.turns)
    assistant = [i for i, t in enumerate(turns) if t.role == "assistant"]
    for index, action in zip(assistant, actions, strict=True):
        turns[index] = turns[index].model_copy(
            update={"action": action, "content": format_step(f"why {action}", action)}
        )
    return trajectory.model_copy(update={"turns": turns})


INSTANCE = TaskInstance("scienceworld", "find-non-living-thing", 0, "u2")
GOLD = [
    "open door to kitchen",
    "go to kitchen",
    "look around",
    "focus on table",
    "move table to red box",
]


def _facts(
    action: str, history_actions: list[str], *, valid=True, score=8.0, previous=8.0, failed=False
) -> StepFacts:
    history = make_trajectory(steps=len(history_actions)).turns
    for i, act in enumerate(history_actions):
        history[2 + 2 * i] = history[2 + 2 * i].model_copy(update={"action": act})
    return StepFacts(
        instance=INSTANCE,
        instruction="find a non-living thing",
        history=history,
        thought="t",
        action=action,
        observation="Observation: ok",
        valid=valid,
        score=score,
        previous_score=previous,
        failed=failed,
        done=failed,
        step_index=len(history_actions),
    )


def _position(actions: list[str]) -> int:
    return Alignment("scienceworld", gold_steps(_reference(GOLD))).position(
        _facts("x", actions).history
    )


def test_alignment_skips_unneeded_gold_steps() -> None:
    gold = gold_steps(_reference(GOLD))
    assert [g.action for g in gold] == GOLD
    assert gold[0].thought == "why open door to kitchen"
    assert _position([]) == 0
    assert _position(["go to kitchen"]) == 2  # the open door was not needed
    assert _position(["go to kitchen", "look at chair", "look around"]) == 3
    assert _position(GOLD) == len(GOLD)
    # a generic action matches only the next reference step, never one further on
    assert _position(["look around"]) == 0


ALFWORLD_GOLD = [
    "go to countertop 1",
    "take mug 1 from countertop 1",
    "go to desk 1",
    "put mug 1 in/on desk 1",
]


@pytest.mark.parametrize(
    "wording", ["put mug 1 in/on desk 1", "put mug 1 in desk 1", "Place the mug 1 on desk 1."]
)
def test_alfworld_placing_wordings_match_the_reference(wording) -> None:
    """ALFWorld rewards only the goal, so the reference's position follows the wording: any
    spelling the game reads as the same command is the reference's step."""
    alignment = Alignment("alfworld", gold_steps(_reference(ALFWORLD_GOLD)))
    assert alignment.match(3, wording) == 3
    assert alignment.match(2, wording) == 3  # the walk to the desk turned out unneeded
    assert alignment.match(3, "put mug 1 in/on shelf 1") is None


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        (_facts("go to kitchen", []), None),
        (_facts("Go  To Kitchen", []), None),
        (_facts("go to bathroom", []), "no_progress"),
        (_facts("fly", [], valid=False), "invalid"),
        (_facts("", [], valid=False), "unparseable"),
        (_facts("focus on air", ["go to kitchen"], score=-100, failed=True), "failed"),
        (_facts("pick up table", ["go to kitchen"], score=4, previous=25), "worse"),
        (_facts("teleport to kitchen", [], score=25, previous=8), None),  # progress all the same
    ],
)
def test_reference_verdicts(facts, reason) -> None:
    teacher = ReferenceTeacher()
    judgment = asyncio.run(teacher.judge(facts, _reference(GOLD)))
    assert judgment.reason == reason
    assert judgment.correct is (reason is None)
    if reason is not None:
        position = _position([t.action for t in facts.history if t.role == "assistant"])
        assert judgment.action == GOLD[position]
        assert judgment.thought == f"why {GOLD[position]}"
        assert facts.action in judgment.reflection and judgment.action in judgment.reflection
    assert teacher.stats.calls == 1


def test_rewind_policy() -> None:
    look = _facts("look around", [])
    move = _facts("go to bathroom", [])
    lost = _facts("focus on air", [], failed=True)
    assert not should_rewind("auto", look)
    assert not should_rewind("auto", move)  # corrected in the state the step left
    assert should_rewind("auto", lost)  # only a lost task is taken back
    assert not should_rewind("never", lost)


def test_templates_are_versioned_files() -> None:
    assert set(templates.load_reflections("v1")) == {
        "unparseable",
        "invalid",
        "failed",
        "worse",
        "no_progress",
    }
    with pytest.raises(ValueError, match="no templates for version 'v9'"):
        templates.load_text("v9", "judge.user.txt")
    with pytest.raises(ValueError, match=r"judge: no value for \$reference"):
        templates.chat("v1", "judge", instruction="x")


# -- the LLM teacher's retry and fallback, with a scripted answering model ---------------
@dataclass
class ScriptedModel:
    """Answers from a list, in order (the teacher model is the dependency here)."""

    answers: list[str]
    name: str = "scripted-teacher-model"
    prompts: list = field(default_factory=list)

    async def complete(self, messages, *, session=None, max_new_tokens=None) -> Completion:
        self.prompts.append(messages)
        return Completion(self.answers.pop(0), prompt_tokens=100, completion_tokens=10)

    def end_session(self, session) -> None:
        pass

    async def aclose(self) -> None:
        pass


def test_llm_teacher_retries_then_uses_valid_answer() -> None:
    model = ScriptedModel(
        [
            "no json here",
            json.dumps(
                {
                    "verdict": "wrong",
                    "reflection": "Wrong room.",
                    "thought": "Back.",
                    "action": "go to kitchen",
                }
            ),
        ]
    )
    teacher = LLMTeacher(model, max_retries=2, fallback="correct")
    judgment = asyncio.run(teacher.judge(_facts("go to bathroom", []), _reference(GOLD)))
    assert not judgment.correct and judgment.action == "go to kitchen" and not judgment.fallback
    assert (teacher.stats.malformed, teacher.stats.retries, teacher.stats.fallbacks) == (1, 1, 0)
    prompt = model.prompts[0][1]["content"]
    assert "go to bathroom" in prompt and "move table to red box" in prompt


@pytest.mark.parametrize(("fallback", "correct"), [("correct", True), ("reference", False)])
def test_llm_teacher_falls_back_after_retries(fallback, correct) -> None:
    teacher = LLMTeacher(ScriptedModel(["nope"] * 3), max_retries=2, fallback=fallback)
    judgment = asyncio.run(teacher.judge(_facts("go to bathroom", []), _reference(GOLD)))
    assert judgment.fallback and judgment.correct is correct
    assert (teacher.stats.malformed, teacher.stats.retries, teacher.stats.fallbacks) == (3, 2, 1)


# -- on the real simulator with the embedded student ---------------------------------------
@dataclass
class InjectWrongActions:
    """Wraps the student: at the given assistant-turn indexes it says a wrong action instead
    (a fault injected on purpose; every other turn is the real model's)."""

    inner: object
    wrong: dict[int, str]
    name: str = "embedded+injected"

    async def complete(self, messages, *, session=None, max_new_tokens=None) -> Completion:
        turn = sum(1 for m in messages if m["role"] == "assistant")
        if turn in self.wrong:
            return Completion(format_step("I am sure this is right.", self.wrong[turn]), 10, 8)
        return await self.inner.complete(messages, session=session, max_new_tokens=max_new_tokens)

    def end_session(self, session) -> None:
        self.inner.end_session(session)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _synthesis_rollout(params, instances, backend, teacher, output: Path):
    _, _, d2 = load_prepared(Path("data"))
    reviewer = TeacherReviewer(teacher, {t.key: t for t in d2}, params.synthesis.rewind)
    examples = load_examples(Path("data"))
    return asyncio.run(
        rollout(
            instances,
            backend,
            output,
            env_factory=functools.partial(make_env, params.env),
            settings=EpisodeSettings.from_params(params, source="synthesis"),
            concurrency=1,
            example_for=functools.partial(example_for, examples),
            reviewer=reviewer,
            progress=False,
        )
    )


@pytest.mark.slow
def test_reference_teacher_corrects_injected_mistakes(base_agent_workspace, monkeypatch):
    monkeypatch.chdir(base_agent_workspace)
    params = load_params("params.yaml", ["env.step_limit=16", "synthesis.max_corrections=8"])
    manifest, _, d2 = load_prepared(Path("data"))
    instance = manifest.select("u2")[0]
    student = make_backend(params.student, adapter=Path("models/init_sft"))
    backend = InjectWrongActions(student, {0: "go to bathroom", 2: "open door to greenhouse"})
    teacher = ReferenceTeacher()
    summary = _synthesis_rollout(params, [instance], backend, teacher, Path("out.jsonl"))
    assert summary.errors == {}
    [trajectory] = list(read_trajectories("out.jsonl"))
    Trajectory.model_validate_json(trajectory.model_dump_json())
    assert trajectory.success and trajectory.reward == 1.0, trajectory.turns
    assistant = trajectory.assistant_turns()
    assert assistant[0].kind == "erroneous_step" and assistant[0].action == "go to bathroom"
    assert not assistant[0].loss
    assert assistant[1].kind == "reflection" and assistant[1].loss
    assert assistant[1].content.startswith("Reflection: ")
    reference_actions = [g.action for g in gold_steps(next(t for t in d2 if t.key == instance.key))]
    assert assistant[1].action in reference_actions
    no_progress = [t for t in assistant if t.action == "open door to greenhouse"]
    assert no_progress and all(t.kind == "erroneous_step" for t in no_progress)
    # every correction was executed: an observation follows it
    turns = trajectory.turns
    reflections = [index for index, turn in enumerate(turns) if turn.kind == "reflection"]
    assert len(reflections) >= 2
    assert [turns[index + 1].kind for index in reflections] == ["observation"] * len(reflections)
    assert trajectory.stats.corrections == sum(1 for t in assistant if t.kind == "reflection")
    assert trajectory.stats.corrections >= 2
    assert trajectory.provenance.teacher == "reference"


@pytest.mark.slow
def test_llm_teacher_with_the_embedded_model(base_agent_workspace, monkeypatch):
    monkeypatch.chdir(base_agent_workspace)
    params = load_params(
        "params.yaml",
        [
            "env.step_limit=4",
            "teacher.kind=llm",
            "teacher.max_retries=1",
            "teacher.fallback=reference",
            "teacher.llm={backend: local, model: embedded, generation: {max_new_tokens: 32}}",
        ],
    )
    manifest, _, _ = load_prepared(Path("data"))
    instance = manifest.select("u2")[0]
    student = make_backend(params.student, adapter=Path("models/init_sft"))
    backend = InjectWrongActions(student, {0: "go to bathroom"})
    teacher_model = make_backend(params.teacher.llm)
    teacher = LLMTeacher(teacher_model, max_retries=1, fallback="reference", max_new_tokens=32)
    try:
        summary = _synthesis_rollout(params, [instance], backend, teacher, Path("llm.jsonl"))
    finally:
        asyncio.run(teacher_model.aclose())
    assert summary.errors == {}
    [trajectory] = list(read_trajectories("llm.jsonl"))
    stats = teacher.stats
    assert stats.calls == trajectory.stats.teacher_calls >= 1
    assert stats.malformed >= 1 and stats.retries >= 1  # the 135M model rarely writes JSON
    assert stats.fallbacks == trajectory.stats.teacher_fallbacks
    assert stats.prompt_tokens > 0 and stats.completion_tokens > 0
    # the 135M judge answers no JSON twice in a row, so the reference fallback judges, and
    # it catches the injected wrong step
    assert stats.fallbacks >= 1
    assert trajectory.assistant_turns()[0].kind == "erroneous_step"


@pytest.mark.slow
def test_synthesize_stage_writes_kept_trajectories(base_agent_workspace, monkeypatch):
    monkeypatch.chdir(base_agent_workspace)
    params = load_params("params.yaml")
    summary = synthesize(params, show_progress=False)
    stats = json.loads(Path("data/synthesis_stats.json").read_text())
    kept = list(read_trajectories("data/reflected.jsonl"))
    assert stats["kept"] == len(kept) == summary.kept
    assert stats["episodes"] == len(load_prepared(Path("data"))[0].select("u2"))
    assert stats["kept"] + stats["dropped"] == stats["episodes"]
    assert stats["teacher"] == "reference"
    assert stats["kept"] >= 1, "the tiny base agent solves some U2 tasks with the teacher"
    assert len(kept) == stats["kept"]  # the loop below sees every kept trajectory
    for trajectory in kept:
        # kept: successful, not stopped, and enough of the student's own accepted steps
        assert trajectory.success and trajectory.reward >= params.synthesis.keep_threshold
        assert trajectory.stop_reason is None and trajectory.failure is None
        assert trajectory.own_fraction >= params.synthesis.min_own_steps
        assert trajectory.split == "u2" and trajectory.provenance.source == "synthesis"
        turns = trajectory.assistant_turns()
        assert turns
        for turn in turns:
            assert turn.loss is (turn.kind != "erroneous_step" and turn.action is not None)
        # nothing went unjudged: every student step is accepted or erroneous
        counts = trajectory.stats
        assert counts.accepted_steps + counts.erroneous_steps == counts.student_steps
    # the turn counts of synthesis_stats.json are those of reflected.jsonl
    kinds = [turn.kind for t in kept for turn in t.assistant_turns()]
    assert stats["erroneous_turns"] == kinds.count("erroneous_step")
    assert stats["reflection_turns"] == kinds.count("reflection")
    assert stats["accepted_turns"] == sum(t.stats.accepted_steps for t in kept)
    assert stats["accepted_share"] == round(stats["accepted_turns"] / len(kinds), 4)
    assert 0 <= stats["reflection_token_share"] <= 1
    # reflection turns carry trained tokens, and only they do
    assert (stats["reflection_token_share"] > 0) is (stats["reflection_turns"] > 0)
    assert stats["own_fraction"]["min"] <= stats["own_fraction"]["median"]
    assert sum(stats["dropped_by"].values()) == stats["dropped"]
    assert [t.key for t in kept] == sorted(t.key for t in kept)
    # the episodes finishing in another order (concurrent episodes finish as they are timed)
    # give the same file: the training variants read it in order
    (work_log,) = Path(".stepflow/work").glob("synthesize-*/episodes.jsonl")
    lines = work_log.read_text().splitlines(keepends=True)
    assert len(lines) == stats["episodes"] >= 2
    work_log.write_text("".join(reversed(lines)))
    again = synthesize(params, show_progress=False)  # a rerun resumes: nothing new to run
    assert again.resumed == stats["episodes"]
    assert Path("data/reflected.jsonl").read_text() == "".join(
        t.model_dump_json() + "\n" for t in kept
    )


def _synthesized(accepted: int, steps: int, **update) -> Trajectory:
    trajectory = make_trajectory(steps=steps)
    stats = trajectory.stats.model_copy(update={"accepted_steps": accepted})
    return trajectory.model_copy(update={"stats": stats, **update})


def test_keep_rule_counts_every_reason() -> None:
    from stepflow.teacher.synthesis import drop_reason, kept, own_fraction_summary

    good = _synthesized(3, 4)
    few = _synthesized(1, 4)
    stopped = _synthesized(3, 4, stop_reason="corrections_exhausted")
    unsolved = _synthesized(4, 4, reward=0.5, success=False)
    failed = _synthesized(4, 4, failure="EndpointError: down")
    assert good.own_fraction == 0.75 and few.own_fraction == 0.25
    episodes = [good, few, stopped, unsolved, failed]
    reasons = [drop_reason(t, 1.0, 0.5) for t in episodes]
    assert reasons == [None, "few_own_steps", "corrections_exhausted", "below_threshold", "failed"]
    assert kept(episodes, 1.0, 0.5) == [good]
    assert kept(episodes, 1.0, 0.0) == [good, few]
    assert own_fraction_summary([good, few]) == {
        "min": 0.25,
        "p25": 0.375,
        "median": 0.5,
        "p75": 0.625,
        "max": 0.75,
        "mean": 0.5,
    }

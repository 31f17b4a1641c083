"""The rollout engine on real ScienceWorld with a scripted policy and a scripted reviewer.

The policy replays gold actions (with chosen mistakes or unparseable turns); the reviewer
corrects one chosen step with the gold action. Both are plain classes implementing the
backend and reviewer interfaces; the engine, the environment and the files are real.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stepflow.agent.parser import parse_step
from stepflow.agent.prompts import format_reflection, format_step
from stepflow.data.trajectory import Trajectory, read_trajectories
from stepflow.envs.aio import AsyncEnv
from stepflow.envs.base import TaskInstance
from stepflow.envs.scienceworld import ScienceWorldEnv
from stepflow.llm.base import ChatBackend, Completion
from stepflow.rollout.engine import rollout
from stepflow.rollout.episode import EpisodeSettings, run_episode
from stepflow.rollout.review import Reviewer, StepContext, StepReview

ENV = "scienceworld"
FIND = TaskInstance(ENV, "find-non-living-thing", 1, "train")
LIFESPAN = TaskInstance(ENV, "lifespan-longest-lived", 1, "train")


@dataclass
class GoldPolicy:
    """Replays an instance's gold actions, continuing after the last gold action executed;
    says `mistakes[i]` or `garbage[i]` as its i-th assistant turn instead."""

    gold: dict[str, list[str]]
    mistakes: dict[int, str] = field(default_factory=dict)
    garbage: dict[int, str] = field(default_factory=dict)
    cut: dict[int, str] = field(default_factory=dict)
    name: str = "scripted-gold"
    ended: list[str] = field(default_factory=list)
    prompts: list[list[dict[str, str]]] = field(default_factory=list)

    async def complete(self, messages, *, session=None, max_new_tokens=None) -> Completion:
        self.prompts.append([dict(m) for m in messages])
        gold = self.gold[session]
        said = [m["content"] for m in messages if m["role"] == "assistant"]
        turn = len(said)
        if turn in self.garbage:
            return Completion(self.garbage[turn], prompt_tokens=10, completion_tokens=3)
        if turn in self.cut:  # stopped by the generation limit mid-turn
            return Completion(self.cut[turn], 10, 64, finish_reason="length")
        if turn in self.mistakes:
            text = format_step("This looks right.", self.mistakes[turn])
            return Completion(text, prompt_tokens=10, completion_tokens=5)
        position = 0
        for content in said:
            action = parse_step(content).action
            if position < len(gold) and action == gold[position]:
                position += 1
        text = f"Thought: Next I {gold[position]}.\nAction: {gold[position]}<|im_end|>"
        return Completion(text, prompt_tokens=10, completion_tokens=5)

    def end_session(self, session: str) -> None:
        self.ended.append(session)

    async def aclose(self) -> None:
        pass


@dataclass
class GoldReviewer:
    """Corrects the student step `fix_step` with the gold action; records what it saw."""

    gold: dict[str, list[str]]
    fix_step: int
    rewind: bool = False
    name: str = "scripted-teacher"
    seen: list[StepContext] = field(default_factory=list)
    also_fix: tuple[int, ...] = ()
    correction: str | None = None

    async def review(self, ctx: StepContext) -> StepReview | None:
        self.seen.append(ctx)
        if ctx.step_index != self.fix_step and ctx.step_index not in self.also_fix:
            return None
        valid = await ctx.env.valid_actions()
        assert valid, "the reviewer can query the environment"
        action = self.correction or self.gold[ctx.instance.key][len(ctx.actions) - 1]
        return StepReview(
            reflection=f"'{ctx.action}' was a mistake.",
            thought=f"I should {action} instead.",
            action=action,
            rewind=self.rewind,
        )


@pytest.fixture(scope="module")
def gold() -> dict[str, list[str]]:
    """Gold action sequences of the instances used here."""
    sequences = {}
    with ScienceWorldEnv() as env:
        for variation in (1, 2, 3):
            instance = TaskInstance(ENV, "find-non-living-thing", variation, "train")
            env.reset(instance)
            sequences[instance.key] = env.gold_actions()
        env.reset(LIFESPAN)
        sequences[LIFESPAN.key] = env.gold_actions()
    return sequences


@pytest.fixture(scope="module")
def env():
    with ScienceWorldEnv() as simulator:
        yield AsyncEnv(simulator)


def episode(env, instance, policy, reviewer=None, *, limit=12, corrections=2) -> Trajectory:
    settings = EpisodeSettings(step_limit=limit, max_corrections=corrections, params_hash="h")
    trajectory = asyncio.run(run_episode(env, instance, policy, settings, reviewer=reviewer))
    assert Trajectory.model_validate_json(trajectory.model_dump_json()) == trajectory
    return trajectory


def kinds(trajectory: Trajectory) -> list[tuple[str, bool]]:
    return [(t.kind, t.loss) for t in trajectory.assistant_turns()]


def test_scripted_classes_implement_the_interfaces(gold) -> None:
    assert isinstance(GoldPolicy(gold), ChatBackend)
    assert isinstance(GoldReviewer(gold, 0), Reviewer)


def test_gold_policy_solves_the_task(env, gold) -> None:
    policy = GoldPolicy(gold)
    trajectory = episode(env, FIND, policy)
    assert trajectory.success and trajectory.done and trajectory.reward == 1.0
    assert trajectory.num_steps == len(gold[FIND.key])
    assert all(kind == ("step", True) for kind in kinds(trajectory))
    first = trajectory.assistant_turns()[0]
    action = gold[FIND.key][0]
    assert first.content == format_step(f"Next I {action}.", action)
    assert first.action == action
    assert trajectory.provenance.student_model == "scripted-gold"
    assert trajectory.provenance.params_hash == "h"
    assert trajectory.provenance.teacher is None
    assert trajectory.stats.prompt_tokens == 10 * trajectory.num_steps
    assert policy.ended == [FIND.key]


def test_step_limit_and_unparseable_output(env, gold) -> None:
    policy = GoldPolicy(gold, garbage={1: "I am not sure what to do here.", 2: ""})
    trajectory = episode(env, FIND, policy, limit=4)
    assert trajectory.num_steps == 4
    assert not trajectory.done and not trajectory.success
    assert trajectory.stats.parse_failures == 2
    assert kinds(trajectory) == [("step", True), ("step", False), ("step", False), ("step", True)]
    failed = trajectory.assistant_turns()[1]
    assert failed.action is None
    assert failed.content == "I am not sure what to do here."
    observation = trajectory.turns[trajectory.turns.index(failed) + 1]
    assert observation.content.startswith("Observation: Invalid output: no action found.")
    # the policy resumes the gold path: the 4th turn is the 2nd gold action
    assert trajectory.assistant_turns()[3].action == gold[FIND.key][1]
    assert trajectory.score == 17.0


def test_correction_without_rewind(env, gold) -> None:
    actions = gold[FIND.key]
    policy = GoldPolicy(gold, mistakes={1: "go to kitchen"}, garbage={3: "Hmm."})
    reviewer = GoldReviewer(gold, fix_step=1)
    trajectory = episode(env, FIND, policy, reviewer)
    assert trajectory.success and trajectory.score == 100
    assert kinds(trajectory) == [
        ("step", True),
        ("erroneous_step", False),
        ("reflection", True),
        ("step", False),
        *[("step", True)] * (len(actions) - 2),
    ]
    steps = trajectory.assistant_turns()
    assert steps[1].action == "go to kitchen"
    assert steps[2].content == format_reflection(
        "'go to kitchen' was a mistake.", f"I should {actions[1]} instead.", actions[1]
    )
    assert steps[2].action == actions[1]
    assert trajectory.num_steps == len(actions) + 2
    stats = trajectory.stats
    assert (stats.corrections, stats.invalid_actions, stats.parse_failures) == (1, 1, 1)
    # reviewed: every student step, the unparseable one included, but the winning one
    reviewed = [ctx.step_index for ctx in reviewer.seen]
    student = [i for i, t in enumerate(steps) if t.kind != "reflection"]
    assert reviewed == student[:-1]
    unparsed = next(ctx for ctx in reviewer.seen if ctx.action == "")
    assert not unparsed.result.valid and unparsed.step_index == 3
    assert unparsed.result.observation.startswith("Invalid output: no action found.")
    assert unparsed.result.score == unparsed.previous_score  # nothing ran
    assert stats.teacher_calls == len(reviewed)
    assert trajectory.provenance.teacher == "scripted-teacher"
    context = reviewer.seen[1]
    assert context.action == "go to kitchen" and context.turns[-2].action == "go to kitchen"
    assert context.turns[-1].kind == "observation"
    assert not context.result.valid
    assert context.previous_score == reviewer.seen[0].result.score
    assert context.actions == [actions[0], "go to kitchen"]


def test_every_student_step_is_judged_and_counted(env, gold) -> None:
    actions = gold[FIND.key]
    reviewer = GoldReviewer(gold, fix_step=1)
    policy = GoldPolicy(gold, mistakes={1: "go to kitchen"})
    trajectory = episode(env, FIND, policy, reviewer, corrections=1)
    stats = trajectory.stats
    assert trajectory.success and trajectory.stop_reason is None
    # the mistake plus every gold step but the one the correction did
    assert stats.student_steps == len(actions)
    # the winning step needs no judge; every other student step was judged
    assert stats.teacher_calls == stats.student_steps - 1
    assert (stats.erroneous_steps, stats.accepted_steps) == (1, stats.student_steps - 1)
    assert stats.corrections == 1
    assert trajectory.own_fraction == stats.accepted_steps / trajectory.num_steps


def test_corrections_come_on_top_of_the_step_limit(env, gold) -> None:
    """A limit of exactly the gold length leaves room for a mistake and its correction."""
    actions = gold[FIND.key]
    policy = GoldPolicy(gold, mistakes={1: "go to kitchen"})
    reviewer = GoldReviewer(gold, fix_step=1)
    trajectory = episode(env, FIND, policy, reviewer, limit=len(actions), corrections=1)
    assert trajectory.success
    assert trajectory.stats.student_steps == len(actions)
    assert trajectory.num_steps == len(actions) + 1


def test_a_wrong_step_past_the_correction_budget_stops_the_episode(env, gold) -> None:
    policy = GoldPolicy(gold, mistakes={1: "go to kitchen", 3: "go to kitchen"})
    reviewer = GoldReviewer(gold, fix_step=1, also_fix=(3,))
    trajectory = episode(env, FIND, policy, reviewer, corrections=1)
    assert trajectory.stop_reason == "corrections_exhausted" and not trajectory.success
    assert kinds(trajectory)[-1] == ("erroneous_step", False)  # never trained, never corrected
    assert trajectory.stats.corrections == 1 and trajectory.stats.erroneous_steps == 2
    assert trajectory.stats.student_steps == 3  # nothing ran after it


def test_an_invalid_correction_stops_the_episode(env, gold) -> None:
    policy = GoldPolicy(gold, mistakes={1: "go to kitchen"})
    reviewer = GoldReviewer(gold, fix_step=1, correction="fly to the moon")
    trajectory = episode(env, FIND, policy, reviewer)
    assert trajectory.stop_reason == "bad_correction"
    assert trajectory.turns[-1].content == "Observation: No known action matches that input."


class NoCorrection:
    """Judges every step wrong without a correction to offer."""

    async def review(self, ctx: StepContext) -> StepReview | None:
        return StepReview(reflection="", thought="", action=None)


def test_a_wrong_step_without_correction_stops_the_episode(env, gold) -> None:
    trajectory = episode(env, FIND, GoldPolicy(gold), NoCorrection())
    assert trajectory.stop_reason == "no_correction"
    assert kinds(trajectory) == [("erroneous_step", False)]


@pytest.mark.parametrize("rewind", [True, False])
def test_a_lost_task_is_rewound_in_world_and_conversation(env, gold, rewind) -> None:
    """A wrong "focus on" loses the task. Rewound: the step and its observation leave the
    conversation and the teacher's step runs in the restored world. Not rewound: the
    episode stops (a finished task cannot go on) and is never kept."""
    actions = gold[LIFESPAN.key]
    focus = next(i for i, a in enumerate(actions) if a.startswith("focus on"))
    policy = GoldPolicy(gold, mistakes={focus: "focus on air"})
    reviewer = GoldReviewer(gold, fix_step=focus, rewind=rewind)
    trajectory = episode(env, LIFESPAN, policy, reviewer)
    failed = reviewer.seen[-1].result
    assert failed.failed and failed.done and failed.score < 0
    contents = [t.content for t in trajectory.turns]
    if rewind:
        assert trajectory.success and trajectory.score == 100 and trajectory.done
        assert kinds(trajectory)[focus] == ("step", True)
        assert trajectory.assistant_turns()[focus].action == actions[focus]
        assert "Observation: You focus on the air." not in contents
        assert not any("focus on air" in c for c in contents)
        assert trajectory.stats.rewinds == 1 and trajectory.stats.erroneous_steps == 1
        assert trajectory.num_steps == focus + 1  # the teacher's focus solved the task
    else:
        assert trajectory.stop_reason == "unwinnable" and not trajectory.success
        assert kinds(trajectory)[-1] == ("erroneous_step", False)
        assert contents[-1] == "Observation: You focus on the air."


@pytest.mark.parametrize("rewind", [True, False])
def test_a_correction_runs_in_the_state_the_wrong_step_left(env, gold, rewind) -> None:
    """Closing the door just opened does not lose the task: it is not rewound, whatever the
    review asks, so the correction meets the closed door the conversation shows."""
    actions = gold[FIND.key]
    assert actions[:2] == ["open door to hallway", "go to hallway"]
    policy = GoldPolicy(gold, mistakes={1: "close door to hallway"})
    reviewer = GoldReviewer(gold, fix_step=1, rewind=rewind)
    trajectory = episode(env, FIND, policy, reviewer, limit=3)
    wrong, reflection = trajectory.assistant_turns()[1:3]
    assert wrong.kind == "erroneous_step" and wrong.action == "close door to hallway"
    assert reflection.kind == "reflection" and reflection.action == "go to hallway"
    observation = trajectory.turns[trajectory.turns.index(reflection) + 1].content
    assert observation == "Observation: The door is not open."
    assert trajectory.stats.rewinds == 0


def test_turns_are_recorded_as_the_agent_wrote_them(env, gold) -> None:
    """An agent's own reflection stays in its turn, so the next prompt holds what it said."""
    said = (
        "Reflection: I went the wrong way.\n"
        "Thought: The hallway first.\n"
        "Action: open door to hallway"
    )
    policy = GoldPolicy(gold, garbage={0: said})
    trajectory = episode(env, FIND, policy, limit=2)
    first = trajectory.assistant_turns()[0]
    assert first.content == said and first.kind == "step" and first.loss
    assert policy.prompts[1][-2] == {"role": "assistant", "content": said}


def test_a_turn_cut_at_the_generation_limit_is_never_executed(env, gold) -> None:
    """`focus on orange` cut from `focus on orange juice` could lose the task."""
    policy = GoldPolicy(gold, cut={0: "Thought: I know the answer.\nAction: focus on orange"})
    trajectory = episode(env, FIND, policy, limit=2)
    first = trajectory.assistant_turns()[0]
    assert first.action is None and not first.loss
    observation = trajectory.turns[trajectory.turns.index(first) + 1].content
    assert observation.startswith("Observation: Invalid output: the turn was cut at the")
    assert trajectory.stats.truncated == 1 and trajectory.stats.parse_failures == 1
    assert trajectory.assistant_turns()[1].action == gold[FIND.key][0]


def test_stop_and_resume_gives_each_instance_once(tmp_path: Path, gold) -> None:
    instances = [TaskInstance(ENV, "find-non-living-thing", v, "train") for v in (1, 2, 3)]
    output = tmp_path / "rollout.jsonl"
    settings = EpisodeSettings(step_limit=3)

    def run(**kwargs):
        return asyncio.run(
            rollout(
                instances,
                GoldPolicy(gold),
                output,
                env_factory=ScienceWorldEnv,
                settings=settings,
                progress=False,
                **kwargs,
            )
        )

    first = run(concurrency=1, max_episodes=1)
    assert (first.new_episodes, first.episodes, first.remaining) == (1, 1, 2)
    head = output.read_text()
    second = run(concurrency=2)
    assert (second.new_episodes, second.skipped, second.episodes, second.remaining) == (2, 1, 3, 0)
    assert output.read_text().startswith(head)
    third = run(concurrency=2)
    assert (third.new_episodes, third.skipped, third.episodes) == (0, 3, 3)
    keys = [t.key for t in read_trajectories(output)]
    assert sorted(keys) == sorted(i.key for i in instances)
    assert third.steps == 9 and third.mean_reward > 0
    assert third.steps_per_s == 0.0


class FailingReviewer:
    """Raises on one instance (a broken teacher)."""

    def __init__(self, broken: str) -> None:
        self.broken = broken
        self.raised = 0

    async def review(self, ctx: StepContext) -> StepReview | None:
        if ctx.instance.key == self.broken:
            self.raised += 1
            raise RuntimeError("teacher exploded")
        return None


def test_failed_episode_is_reported_not_written(tmp_path: Path, gold) -> None:
    instances = [TaskInstance(ENV, "find-non-living-thing", v, "train") for v in (1, 2)]
    output = tmp_path / "rollout.jsonl"
    settings = EpisodeSettings(step_limit=2, max_corrections=1)

    def run(reviewer):
        return asyncio.run(
            rollout(
                instances,
                GoldPolicy(gold),
                output,
                env_factory=ScienceWorldEnv,
                settings=settings,
                concurrency=1,
                reviewer=reviewer,
                progress=False,
            )
        )

    broken = FailingReviewer(instances[0].key)
    summary = run(broken)
    assert broken.raised == 1  # only a crashed simulator gets the episode started over
    assert list(summary.errors) == [instances[0].key]
    assert "teacher exploded" in summary.errors[instances[0].key]
    assert (summary.episodes, summary.remaining) == (1, 1)
    assert [t.key for t in read_trajectories(output)] == [instances[1].key]
    again = run(FailingReviewer("none"))
    assert (again.new_episodes, again.episodes, again.errors) == (1, 2, {})


class JvmKiller:
    """Kills the simulator's JVM (SIGKILL) once, after step `at` of instance `target`."""

    def __init__(self, target: str, at: int) -> None:
        self.target = target
        self.at = at
        self.killed = 0

    async def review(self, ctx: StepContext) -> StepReview | None:
        if ctx.instance.key == self.target and ctx.step_index == self.at and not self.killed:
            ctx.env.env.java_process().kill()
            ctx.env.env.java_process().wait()
            self.killed += 1
        return None


@pytest.mark.slow
@pytest.mark.parametrize("max_restarts", [3, 0], ids=["jvm-restarted", "env-replaced"])
def test_jvm_killed_mid_episode_is_rerun(tmp_path: Path, gold, max_restarts: int) -> None:
    """With restarts left the env restarts its JVM and replays the episode's actions; with
    none the worker starts the episode over on a fresh env. Either way every instance ends
    with the trajectory an undisturbed run gives."""
    instances = [TaskInstance(ENV, "find-non-living-thing", v, "train") for v in (1, 2, 3)]
    settings = EpisodeSettings(step_limit=4, max_corrections=1)

    def run(output: Path, reviewer):
        return asyncio.run(
            rollout(
                instances,
                GoldPolicy(gold),
                output,
                env_factory=lambda: ScienceWorldEnv(max_restarts=max_restarts),
                settings=settings,
                concurrency=2,
                reviewer=reviewer,
                progress=False,
            )
        )

    killer = JvmKiller(instances[1].key, at=1)
    summary = run(tmp_path / "killed.jsonl", killer)
    assert killer.killed == 1
    assert (summary.episodes, summary.remaining, summary.errors, summary.failed) == (3, 0, {}, 0)
    assert summary.env_restarts == 1
    killed = {t.key: t for t in read_trajectories(tmp_path / "killed.jsonl")}
    run(tmp_path / "calm.jsonl", None)
    calm = {t.key: t for t in read_trajectories(tmp_path / "calm.jsonl")}
    assert sorted(killed) == sorted(calm) == sorted(i.key for i in instances)
    for key, trajectory in killed.items():
        expected = calm[key]
        assert [t.content for t in trajectory.turns] == [t.content for t in expected.turns]
        assert (trajectory.reward, trajectory.success) == (expected.reward, expected.success)
    in_env = killed[instances[1].key].stats.env_restarts
    assert in_env == (1 if max_restarts else 0)


@dataclass
class Recorder:
    """Passes every call to the real model and keeps the prompt token ids it was fed."""

    inner: object
    scripted: dict[int, str] = field(default_factory=dict)
    prompts: list[list[int]] = field(default_factory=list)
    name: str = "embedded"

    async def complete(self, messages, *, session=None, max_new_tokens=None) -> Completion:
        self.prompts.append(self.inner.encode(messages))
        turn = sum(1 for m in messages if m["role"] == "assistant")
        if turn in self.scripted:
            return Completion(self.scripted[turn], 0, 0)
        return await self.inner.complete(messages, session=session, max_new_tokens=max_new_tokens)

    def end_session(self, session: str) -> None:
        self.inner.end_session(session)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_the_agent_is_prompted_with_exactly_what_training_feeds(env, gold, embedded_dir):
    """For every turn of an episode of the real model (one turn scripted: a reflection), the
    prompt token ids at inference equal the training row's ids up to that turn."""
    from stepflow.config import GenerationConfig
    from stepflow.llm.local import LocalBackend
    from stepflow.train.masking import tokenize_trajectory

    model = LocalBackend("embedded", generation=GenerationConfig(max_new_tokens=16))
    reflection = (
        "Reflection: I skipped the hallway.\nThought: Through the hallway.\n"
        "Action: open door to hallway"
    )
    recorder = Recorder(model, scripted={1: reflection})
    try:
        trajectory = episode(env, FIND, recorder, limit=3)
    finally:
        asyncio.run(model.aclose())
    assert trajectory.assistant_turns()[1].content == reflection
    tokenized = tokenize_trajectory(trajectory, model.tokenizer)
    assert len(tokenized.spans) == len(recorder.prompts) == 3
    for span, prompt in zip(tokenized.spans, recorder.prompts, strict=True):
        assert prompt == tokenized.input_ids[: span.start], f"turn {span.turn_index}"

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
from stepflow.envs.aio import AsyncEnv
from stepflow.envs.base import TaskInstance
from stepflow.envs.scienceworld import ScienceWorldEnv
from stepflow.episode import RolloutSettings, run_episode
from stepflow.llm.base import ChatBackend, Completion
from stepflow.review import Reviewer, StepContext, StepReview
from stepflow.rollout import rollout
from stepflow.trajectory import Trajectory, read_trajectories

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
    name: str = "scripted-gold"
    ended: list[str] = field(default_factory=list)

    async def complete(self, messages, *, session=None, max_new_tokens=None) -> Completion:
        gold = self.gold[session]
        said = [m["content"] for m in messages if m["role"] == "assistant"]
        turn = len(said)
        if turn in self.garbage:
            return Completion(self.garbage[turn], prompt_tokens=10, completion_tokens=3)
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

    async def review(self, ctx: StepContext) -> StepReview | None:
        self.seen.append(ctx)
        if ctx.step_index != self.fix_step:
            return None
        valid = await ctx.env.valid_actions()
        assert valid, "the reviewer can query the environment"
        action = self.gold[ctx.instance.key][len(ctx.actions) - 1]
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
    settings = RolloutSettings(step_limit=limit, max_corrections=corrections, params_hash="h")
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


def test_corrections_are_capped(env, gold) -> None:
    reviewer = GoldReviewer(gold, fix_step=1)
    policy = GoldPolicy(gold, mistakes={1: "go to kitchen"})
    trajectory = episode(env, FIND, policy, reviewer, corrections=1)
    assert trajectory.stats.corrections == 1
    assert trajectory.stats.teacher_calls == 2
    assert trajectory.success


@pytest.mark.parametrize("rewind", [True, False])
def test_terminal_mistake_is_rewound(env, gold, rewind) -> None:
    """A wrong "focus on" loses the task; the correction runs in the restored world (a step
    that ended the episode is rewound even when the review does not ask for it)."""
    actions = gold[LIFESPAN.key]
    focus = next(i for i, a in enumerate(actions) if a.startswith("focus on"))
    policy = GoldPolicy(gold, mistakes={focus: "focus on air"})
    reviewer = GoldReviewer(gold, fix_step=focus, rewind=rewind)
    trajectory = episode(env, LIFESPAN, policy, reviewer)
    failed = reviewer.seen[-1].result
    assert failed.failed and failed.done and failed.score < 0
    assert trajectory.success and trajectory.score == 100 and trajectory.done
    assert kinds(trajectory)[focus:] == [("erroneous_step", False), ("reflection", True)]
    wrong = trajectory.assistant_turns()[focus]
    assert trajectory.turns[trajectory.turns.index(wrong) + 1].content == (
        "Observation: You focus on the air."
    )
    assert trajectory.num_steps == focus + 2


@pytest.mark.parametrize("rewind", [True, False])
def test_rewind_restores_the_world(env, gold, rewind) -> None:
    """Closing the door just opened: only a rewound world lets the corrected step through."""
    actions = gold[FIND.key]
    assert actions[:2] == ["open door to hallway", "go to hallway"]
    policy = GoldPolicy(gold, mistakes={1: "close door to hallway"})
    reviewer = GoldReviewer(gold, fix_step=1, rewind=rewind)
    trajectory = episode(env, FIND, policy, reviewer, limit=len(actions) + 1)
    reflection = trajectory.assistant_turns()[2]
    assert reflection.kind == "reflection" and reflection.action == "go to hallway"
    observation = trajectory.turns[trajectory.turns.index(reflection) + 1].content
    if rewind:
        assert "You move to the hallway" in observation
        assert trajectory.success
    else:
        assert observation == "Observation: The door is not open."
        assert not trajectory.success


def test_stop_and_resume_gives_each_instance_once(tmp_path: Path, gold) -> None:
    instances = [TaskInstance(ENV, "find-non-living-thing", v, "train") for v in (1, 2, 3)]
    output = tmp_path / "rollout.jsonl"
    settings = RolloutSettings(step_limit=3)

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
    settings = RolloutSettings(step_limit=2, max_corrections=1)

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
    settings = RolloutSettings(step_limit=4, max_corrections=1)

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

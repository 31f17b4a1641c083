"""Prompts fitted to the context: the rule, its use at inference (a real episode of the
embedded model), in the teacher's judge prompt and in training rows, and the paper's
configuration checked against its longest golden trajectory."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stepflow.agent.context import (
    ELIDED_OBSERVATION,
    KEEP_RECENT,
    CharEstimate,
    ContextOverflow,
    PromptFitter,
    TemplateCounter,
    fit_turns,
    steps_omitted,
)
from stepflow.agent.prompts import render_example, to_messages, without_example
from stepflow.config import load_params
from stepflow.data.golden import GoldReplay, render_golden, template_thought
from stepflow.data.trajectory import EpisodeStats, Provenance, Trajectory
from stepflow.envs.base import TaskInstance
from stepflow.teacher.base import StepFacts, TeacherStats
from stepflow.teacher.llm import judge_prompt
from stepflow.train.examples import build_examples, fit_for_training, training_view

REPO = Path(__file__).resolve().parent.parent
ROOMS = ["kitchen", "hallway", "workshop", "greenhouse", "bathroom", "art studio"]


def replay(steps: int, variation: int = 0) -> GoldReplay:
    """A ScienceWorld-style replay: walking between rooms, with room descriptions."""
    actions, observations = [], []
    for i in range(steps):
        room = ROOMS[i % len(ROOMS)]
        actions.append(f"go to {room}")
        observations.append(
            f"You move to the {room}. This room is called the {room}. In it, you see: "
            f"the agent, a substance called air, a table (on the table is: a glass cup "
            f"containing nothing, a notebook number {i}), a cupboard (that is closed), "
            f"a sink, which is turned off. You also see: A door to the hallway (that is open)."
        )
    return GoldReplay(
        TaskInstance("scienceworld", "find-non-living-thing", variation, "u1"),
        "Your task is to find a(n) non-living thing. First, focus on the thing. Then, move "
        "it to the red box in the kitchen.",
        "This room is called the hallway. In it, you see: the agent, a substance called air, "
        "a picture. You also see: A door to the kitchen (that is open).",
        actions,
        observations,
        [0.0] * (steps - 1) + [100.0],
    )


def golden(steps: int, example_steps: int = 0) -> Trajectory:
    """A golden trajectory of `steps` steps, with a demonstration of `example_steps`."""
    provenance = Provenance(source="golden")

    def render(r: GoldReplay, example: str | None) -> Trajectory:
        thoughts = [template_thought(a) for a in r.actions]
        return render_golden(r, thoughts, example, provenance, 400)

    example = render_example(render(replay(example_steps, 9), None)) if example_steps else None
    return render(replay(steps), example)


@pytest.fixture(scope="module")
def counter(tokenizer) -> TemplateCounter:
    return TemplateCounter(tokenizer)


def size(counter, turns, generation_prompt: bool = True) -> int:
    return counter.count(to_messages(turns), generation_prompt=generation_prompt)


def test_a_prompt_that_fits_is_left_alone(counter) -> None:
    turns = golden(6).turns
    fitted = fit_turns(turns, size(counter, turns), counter)
    assert not fitted.fitted and fitted.turns == turns


def test_oldest_observations_are_elided_first_and_no_more_than_needed(counter) -> None:
    turns = golden(12).turns[:-1]  # a prompt: ends with an observation
    full = size(counter, turns)
    budget = full - 150
    fitted = fit_turns(turns, budget, counter)
    assert fitted.fitted and fitted.tokens <= budget < full
    assert not fitted.example_dropped and fitted.dropped_steps == 0
    assert len(fitted.turns) == len(turns)
    elided = [i for i, t in enumerate(fitted.turns) if t.content == ELIDED_OBSERVATION]
    observations = [i for i, t in enumerate(turns) if t.kind == "observation"]
    assert elided == observations[: len(elided)]  # oldest first
    assert len(elided) == fitted.elided_observations >= 1
    for index, turn in enumerate(turns):  # everything else is untouched
        if index not in elided:
            assert fitted.turns[index] == turn
    assert set(observations[-KEEP_RECENT:]).isdisjoint(elided)
    # one elision fewer would not fit: the fewest reductions were applied
    fewer = list(fitted.turns)
    fewer[elided[-1]] = turns[elided[-1]]
    assert size(counter, fewer) > budget


def test_demonstration_goes_before_steps_are_windowed(counter) -> None:
    turns = golden(14, example_steps=10).turns[:-1]
    assert without_example(turns[1].content) is not None
    budget = size(counter, turns) // 2
    fitted = fit_turns(turns, budget, counter)
    assert fitted.example_dropped and fitted.dropped_steps == 0, fitted
    assert fitted.turns[1].content == without_example(turns[1].content)
    assert fitted.turns[0] == turns[0]

    tight = fitted.tokens - 120
    windowed = fit_turns(turns, tight, counter)
    assert windowed.dropped_steps >= 1 and windowed.tokens <= tight
    instruction = windowed.turns[1].content
    assert instruction.endswith(steps_omitted(windowed.dropped_steps))
    assert instruction.startswith(without_example(turns[1].content))
    assert windowed.turns[-2 * KEEP_RECENT :] == turns[-2 * KEEP_RECENT :]
    roles = [t.role for t in windowed.turns]
    assert all(a != b for a, b in itertools.pairwise(roles[1:]))  # still alternates
    # the counter is the real chat template: it renders without error
    assert counter.tokenizer.apply_chat_template(to_messages(windowed.turns), tokenize=False)


def test_a_prompt_that_cannot_fit_raises_and_is_counted(counter) -> None:
    turns = golden(8).turns[:-1]
    with pytest.raises(ContextOverflow, match="over the budget of 50"):
        fit_turns(turns, 50, counter)
    loose = fit_turns(turns, 50, counter, strict=False)
    assert loose.overflow and loose.tokens > 50 and loose.dropped_steps > 0
    stats = EpisodeStats()
    fitter = PromptFitter(size(counter, turns) - 100, counter)
    fitter.messages(turns, stats)
    fitter.messages(turns[:5], stats)
    assert stats.fitted_prompts == 1  # only the long prompt was fitted


def test_char_estimate_overestimates_the_embedded_tokenizer(counter) -> None:
    turns = golden(20, example_steps=5).turns
    estimate = CharEstimate()
    exact = size(counter, turns)
    assert estimate.count(to_messages(turns)) > exact
    assert estimate.count(to_messages(turns)) < 2 * exact  # conservative, not absurd


def test_training_row_trains_the_last_turn_on_the_prompt_the_agent_had(tokenizer, counter):
    trajectory = golden(16)
    turns = trajectory.turns
    last = len(turns) - 2  # the last assistant turn
    prompt_budget = size(counter, turns[:last]) - 200
    agent_prompt = PromptFitter(prompt_budget, counter).messages(turns[:last])
    seen = tokenizer.apply_chat_template(
        agent_prompt, tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    view = training_view(
        trajectory, tokenizer, max_seq_len=4096, prompt_budget=prompt_budget, truncation="elide"
    )
    assert view.fitted is not None and view.fitted.elided_observations > 0
    assert view.tokenized.input_ids[: len(seen)] == list(seen)  # token-identical prefix
    span = view.tokenized.spans[-1]
    assert span.start == len(seen) and span.trained
    assert view.keep == span.train_end  # trained up to its end-of-turn token
    # a trajectory whose prompts all fit is trained exactly as it was seen
    short = golden(4)
    exact = training_view(short, tokenizer, max_seq_len=4096, prompt_budget=prompt_budget)
    assert exact.fitted is None and exact.tokenized.input_ids == exact.original.input_ids


def test_training_rows_fitted_to_max_seq_len_are_counted(tokenizer) -> None:
    trajectories = [golden(30), golden(3)]
    examples, stats = build_examples(trajectories, tokenizer, max_seq_len=600)
    assert stats.kept == 2 and stats.fitted == 1 and stats.truncated == 0
    assert stats.elided_observations > 0
    assert max(len(e["input_ids"]) for e in examples) <= 600
    cut, cut_stats = build_examples(trajectories, tokenizer, max_seq_len=600, truncation="truncate")
    assert cut_stats.fitted == 0 and cut_stats.truncated == 1
    # eliding trains the last steps (on the prompt the agent had); cutting loses them
    final = trajectories[0].turns[-2].content
    assert final in tokenizer.decode(examples[0]["input_ids"])
    assert final not in tokenizer.decode(cut[0]["input_ids"])
    assert stats.max_trained_turn_tokens > 0 and stats.windowed_steps > 0


def _facts(history, step_index: int) -> StepFacts:
    return StepFacts(
        instance=TaskInstance("scienceworld", "find-non-living-thing", 0, "u2"),
        instruction="Your task is to find a(n) non-living thing.",
        history=history,
        thought="I go somewhere.",
        action="go to bathroom",
        observation="Observation: You move to the bathroom.",
        valid=True,
        score=0,
        previous_score=0,
        failed=False,
        done=False,
        step_index=step_index,
    )


def test_judge_prompt_is_fitted_history_first_reference_last() -> None:
    reference = golden(40)
    history = golden(30).turns[:-2]
    facts = _facts(history, step_index=14)
    counter = CharEstimate()
    full, fitted = judge_prompt(facts, reference)
    assert not fitted
    unfitted = counter.count(full)
    roomy, fitted = judge_prompt(facts, reference, budget=10**6, counter=counter)
    assert roomy == full and not fitted  # a budget that fits changes nothing

    budget = unfitted - 600
    messages, fitted = judge_prompt(facts, reference, budget=budget, counter=counter)
    text = messages[1]["content"]
    assert fitted and counter.count(messages) <= budget
    reference_part, history_part = text.split("What the student did so far:")
    assert ELIDED_OBSERVATION in history_part
    assert ELIDED_OBSERVATION not in reference_part  # the reference is clipped last
    assert "Action: go to bathroom" in history_part  # the latest step is always shown

    tight = counter.count(messages) // 3
    messages, fitted = judge_prompt(facts, reference, budget=tight, counter=counter)
    reference_part, history_part = messages[1]["content"].split("What the student did so far:")
    assert fitted and counter.count(messages) <= tight
    assert "(steps 1-" in history_part and ELIDED_OBSERVATION in reference_part
    assert "15. " in reference_part  # the reference step at the student's position stays
    with pytest.raises(ContextOverflow):
        judge_prompt(facts, reference, budget=100, counter=counter)


def test_llm_teacher_counts_fitted_judge_prompts() -> None:
    from stepflow.teacher.llm import LLMTeacher

    @dataclass
    class Unused:
        name: str = "not-called"

    teacher = LLMTeacher(Unused(), budget=1500, counter=CharEstimate())
    assert isinstance(teacher.stats, TeacherStats)
    teacher.messages(_facts(golden(30).turns[:-2], 10), golden(40))
    teacher.messages(_facts(golden(2).turns[:2], 0), golden(3))
    assert teacher.stats.fitted_prompts == 1


# -- a real episode: the embedded model on ScienceWorld, prompts fitted --------------------
@dataclass
class Recording:
    """The real backend, with every prompt it is sent kept for inspection."""

    inner: object
    prompts: list = field(default_factory=list)
    name: str = "embedded"

    async def complete(self, messages, *, session=None, max_new_tokens=None):
        self.prompts.append(messages)
        return await self.inner.complete(messages, session=session, max_new_tokens=max_new_tokens)

    def end_session(self, session) -> None:
        self.inner.end_session(session)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.slow
def test_episode_prompts_fit_the_agent_context(embedded_dir, counter) -> None:
    from stepflow.envs.aio import AsyncEnv
    from stepflow.envs.scienceworld import ScienceWorldEnv
    from stepflow.llm.local import LocalBackend
    from stepflow.rollout.episode import EpisodeSettings, run_episode

    backend = Recording(LocalBackend("embedded"))
    instance = TaskInstance("scienceworld", "find-non-living-thing", 1, "train")
    # the opening prompt is ~330 tokens; each step adds ~60-130: prompts outgrow the budget
    # after 3-4 steps, and the last 2 steps always fit beside the opening
    budget = 560
    settings = EpisodeSettings(
        step_limit=8,
        max_observation_chars=200,
        max_new_tokens=24,
        prompt_fit=PromptFitter(budget, TemplateCounter(backend.inner.tokenizer)),
    )

    async def main() -> Trajectory:
        env = AsyncEnv(ScienceWorldEnv())
        try:
            return await run_episode(env, instance, backend, settings)
        finally:
            await env.close()
            await backend.aclose()

    trajectory = asyncio.run(main())
    assert trajectory.failure is None and trajectory.num_steps == len(backend.prompts)
    sizes = [counter.count(p) for p in backend.prompts]
    assert max(sizes) <= budget
    fitted = [p for p in backend.prompts if any(m["content"] == ELIDED_OBSERVATION for m in p)]
    assert fitted and trajectory.stats.fitted_prompts == len(fitted)
    # the stored trajectory keeps every observation in full
    assert all(t.content != ELIDED_OBSERVATION for t in trajectory.turns)


# -- params.paper.yaml against its longest golden trajectory --------------------------------
@pytest.mark.slow
def test_paper_params_fit_every_prompt_of_the_longest_golden_trajectory() -> None:
    """Every prompt of the paper configuration's longest golden trajectory fits Llama-2's
    context once fitted, as does every judge prompt of the teacher and every training row.

    Llama-2's tokenizer cannot be loaded here, so tokens are counted with the conservative
    `CharEstimate` (3 characters per token; it overestimates the embedded model's tokenizer,
    test above). The trajectory is the real simulator's gold path of the paper's task type
    with the highest step limit (the longest paths: 120-200 steps), thoughts from the
    template (teacher thoughts are one sentence as well), with a demonstration of the same
    task type, as prepare renders it.
    """
    from stepflow.data.golden import replay_gold
    from stepflow.envs.scienceworld import ScienceWorldEnv

    params = load_params(REPO / "params.paper.yaml")
    counter = CharEstimate()
    agent_budget = params.agent.max_context_tokens - params.student.generation.max_new_tokens
    teacher = params.teacher
    assert teacher.llm is not None and teacher.max_context_tokens is not None
    assert teacher.max_context_tokens <= params.serving.max_model_len
    judge_budget = teacher.max_context_tokens - teacher.llm.generation.max_new_tokens
    # the longest gold paths measured: inclined-plane-friction-unnamed-surfaces, 177-205
    # steps on its first six train variations (mendelian-genetics-*: 126-132)
    longest = "inclined-plane-friction-unnamed-surfaces"
    task = (
        longest
        if longest in params.env.task_types
        else max(params.env.task_types, key=params.env.step_limit_for)
    )
    limit = params.env.step_limit_for(task)
    with ScienceWorldEnv(params.env.simplification) as env:
        variation = env.variations(task, "train")[0]
        gold = replay_gold(env, TaskInstance("scienceworld", task, variation, "u1"))
    assert gold.success and len(gold.actions) > 50
    provenance = Provenance(source="golden")
    chars = params.agent.max_observation_chars
    thoughts = [template_thought(a) for a in gold.actions]
    example = render_example(render_golden(gold, thoughts, None, provenance, chars))
    trajectory = render_golden(gold, thoughts, example, provenance, chars)
    turns = trajectory.turns
    assert counter.count(to_messages(turns)) > params.agent.max_context_tokens  # must be fitted

    fitter = PromptFitter(agent_budget, counter)
    stats = EpisodeStats()
    steps = [i for i, t in enumerate(turns) if t.role == "assistant"][:limit]
    for index in steps:  # raises ContextOverflow if a prompt cannot fit
        assert counter.count(fitter.messages(turns[:index], stats)) <= agent_budget
    assert stats.fitted_prompts > 0

    for number, index in enumerate(steps):
        facts = _facts(turns[:index], number)
        messages, _ = judge_prompt(facts, trajectory, budget=judge_budget, counter=counter)
        assert counter.count(messages) <= judge_budget

    row = fit_for_training(
        turns, None, params.training.max_seq_len, prompt_budget=agent_budget, counter=counter
    )
    assert row is not None and not row.overflow and row.tokens <= agent_budget
    # the row's last (trained) turn fits after its fitted prompt
    assert counter.count(to_messages(row.turns), generation_prompt=False) <= (
        params.training.max_seq_len
    )


def test_context_keys_are_typed(params_file) -> None:
    from stepflow.config import ConfigError

    params = load_params(params_file)
    assert params.agent.max_context_tokens is None and params.teacher.max_context_tokens is None
    assert params.training.truncation == "elide"
    paper = load_params(REPO / "params.paper.yaml")
    assert (paper.agent.max_context_tokens, paper.teacher.max_context_tokens) == (4096, 8192)
    for bad in ("agent.max_context_tokens=0", "teacher.max_context_tokens=-1"):
        with pytest.raises(ConfigError, match="max_context_tokens"):
            load_params(params_file, [bad])
    with pytest.raises(ConfigError, match=r"training\.truncation"):
        load_params(params_file, ["training.truncation=clip"])


def test_teacher_thought_prompts_are_fitted() -> None:
    from stepflow.teacher.thoughts import LLMThoughtWriter

    @dataclass
    class Unused:
        name: str = "not-called"

    long = replay(40)
    counter = CharEstimate()
    roomy = LLMThoughtWriter(Unused()).messages(long, 39)
    budget = counter.count(roomy) // 2
    writer = LLMThoughtWriter(Unused(), budget=budget, counter=counter)
    messages = writer.messages(long, 39)
    history = messages[1]["content"]
    assert counter.count(messages) <= budget < counter.count(roomy)
    assert ELIDED_OBSERVATION in history and history.count(ELIDED_OBSERVATION) < 37
    assert f"Next action: {long.actions[39]}" in history
    assert long.observations[38][:60] in history  # the latest observations stay in full
    assert writer.messages(long, 2) == LLMThoughtWriter(Unused()).messages(long, 2)
    assert writer.fitted_prompts == 1
    tight = LLMThoughtWriter(Unused(), budget=600, counter=counter)
    assert "earlier steps omitted" in tight.messages(long, 39)[1]["content"]

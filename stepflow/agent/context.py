"""Prompts that fit the model's context: one deterministic rule at inference and training.

A ReAct prompt grows by one step (assistant turn + observation) per step; a long episode
outgrows the model's context (Llama-2: 4096 tokens), and an endpoint then refuses the
request (HTTP 400) while a local model silently runs past its trained positions. Every
prompt is therefore fitted to a token budget by `fit_turns`, which applies the fewest
*reductions* of this fixed list, in this order, that make the rendered prompt fit:

1. elide an earlier observation: its content becomes `ELIDED_OBSERVATION` (oldest first;
   the last `KEEP_RECENT` observations, and observations already shorter than the marker,
   are kept);
2. drop the one-shot demonstration from the instruction turn (the task and the first
   observation stay; the text is then exactly the zero-shot instruction turn);
3. window: drop the oldest whole steps (assistant turn and its observation), keeping the
   last `KEEP_RECENT` steps; the instruction turn then ends with `steps_omitted(n)`.

The system prompt, the task, the first observation and the last `KEEP_RECENT` steps are
never touched. A prompt that does not fit even with every reduction applied raises
`ContextOverflow` (a `BackendError`: the episode is recorded as failed with that cause).
Reductions are tried with a binary search over their count (a few token counts per step,
only when the prompt is over budget), so the result is a pure function of the turns, the
budget and the token counter.

Where it applies (and what it counts, so that nothing is cut silently):
- inference (`PromptFitter`, used where an episode builds its prompt): budget = the
  agent's context (`agent.max_context_tokens`, or the model's own context length from its
  config) minus `student.generation.max_new_tokens`; fitted prompts are counted in
  `EpisodeStats.fitted_prompts`;
- the LLM teacher's judge prompt (`stepflow.teacher.llm`): the history and then the
  reference are fitted the same way to `teacher.max_context_tokens` (counted in
  `TeacherStats.fitted_prompts`);
- training (`training.truncation: elide`, `stepflow.train.examples`): the prompt of a trajectory's
  last trained turn is fitted by the same call with the same budget as the agent's prompt
  at that step (tighter only if the row would not fit `training.max_seq_len`); counted in
  `MaskStats.fitted`.

The guarantee, and its limit. Stored trajectories keep every observation in full; elision
happens when a prompt or a training row is built. A training row holds all steps at once,
while the prompt of step k held only the steps before k, so once elision started somewhere
in an episode one row cannot match the prompt of every step. What holds (same tokenizer
counting at both ends, i.e. the local backend or an endpoint serving `student.model`):
- a trajectory none of whose prompts needed fitting, and which fits `max_seq_len`, is
  trained exactly as the agent saw it (token-identical prefixes: nothing elided anywhere);
- in a fitted row, the last trained turn is trained on exactly the prompt the agent had at
  that step, provided `training.max_seq_len` >= the agent's context (as in
  params.paper.yaml: 4096 and 4096); the earlier turns of the row see the same elisions,
  which are at least those they had at inference (elision only grows with the episode):
  the model is never trained on context the agent did not have, but early steps of a long
  trajectory are trained with less context than they had;
- windowing (reduction 3) removes whole steps, trained ones included, from a row; they
  are counted (`MaskStats.windowed_steps`, `windowed_trained_turns`) and not trained.
With `max_seq_len` below the agent's context, long rows are fitted tighter than the agent's
prompts were (counted as fitted all the same), and rows still too long after every
reduction are cut (`MaskStats.truncated`).

Token counting: the chat template and tokenizer of the model (`TemplateCounter`) for the
local backend, and for an endpoint whose `model` key names a model whose tokenizer loads
here (the same files the server serves); otherwise `CharEstimate`, a conservative
3 characters per token plus 8 tokens per message (English text takes ~4 characters per
token with Llama-2's and Qwen's tokenizers), which overestimates and so errs towards
fitting too early, never too late.

Over 300 lines, one module: the rule, its budgets and its token counters are used together
at inference, by the teacher and in training; the guarantee above holds for them as one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from stepflow.agent.prompts import to_messages, without_example
from stepflow.data.trajectory import EpisodeStats, Turn
from stepflow.llm.base import BackendError, Message

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from stepflow.config import EndpointConfig, LLMConfig, Params

log = logging.getLogger(__name__)

ELIDED_OBSERVATION = "Observation: (earlier observation omitted)"
KEEP_RECENT = 2
CHARS_PER_TOKEN = 3.0
TOKENS_PER_MESSAGE = 8

T = TypeVar("T")


def steps_omitted(count: int) -> str:
    """The note a windowed prompt's instruction turn ends with."""
    return f"\n(Your first {count} steps are not shown.)"


class ContextOverflow(BackendError):
    """A prompt that does not fit its context budget even with every reduction applied."""


class TokenCounter(Protocol):
    """Counts the tokens of chat messages as the model would see them."""

    name: str

    def count(self, messages: Sequence[Message], *, generation_prompt: bool = True) -> int: ...


class TemplateCounter:
    """Exact: the model's chat template and tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.name = f"tokenizer of {tokenizer.name_or_path}"

    def count(self, messages: Sequence[Message], *, generation_prompt: bool = True) -> int:
        encoded = self.tokenizer.apply_chat_template(
            list(messages),
            tokenize=True,
            add_generation_prompt=generation_prompt,
            return_dict=True,
        )
        return len(encoded["input_ids"])


@dataclass(frozen=True)
class CharEstimate:
    """Conservative estimate when the model's tokenizer is not at hand (see module doc)."""

    chars_per_token: float = CHARS_PER_TOKEN
    per_message: int = TOKENS_PER_MESSAGE

    @property
    def name(self) -> str:
        return f"estimate ({self.chars_per_token:g} chars/token, {self.per_message}/message)"

    def count(self, messages: Sequence[Message], *, generation_prompt: bool = True) -> int:
        body = sum(math.ceil(len(m["content"]) / self.chars_per_token) for m in messages)
        return body + self.per_message * (len(messages) + int(generation_prompt))


def fewest(render: Callable[[int], T], size: Callable[[T], int], total: int, budget: int):
    """`(render(n), n)` for the smallest n in [0, total] found to fit `budget` by binary
    search (sizes shrink as n grows); `(render(total), None)` when even that does not fit."""
    first = render(0)
    if size(first) <= budget:
        return first, 0
    best = render(total)
    if total == 0 or size(best) > budget:
        return best, None
    low, high = 0, total  # render(low) is over budget, render(high) fits
    while high - low > 1:
        middle = (low + high) // 2
        candidate = render(middle)
        if size(candidate) <= budget:
            high, best = middle, candidate
        else:
            low = middle
    return best, high


@dataclass(frozen=True)
class Fitted:
    """Turns fitted to a budget and what the fitting did."""

    turns: list[Turn]
    tokens: int
    elided_observations: int = 0
    example_dropped: bool = False
    dropped_steps: int = 0
    dropped_trained: int = 0
    overflow: bool = False

    @property
    def fitted(self) -> bool:
        """Whether anything was elided or dropped."""
        return bool(self.elided_observations or self.example_dropped or self.dropped_steps)


def _instruction_index(turns: Sequence[Turn]) -> int:
    return next((i for i, t in enumerate(turns) if t.kind == "instruction"), -1)


def _reductions(turns: Sequence[Turn], keep_recent: int) -> list[tuple[str, int]]:
    """The reductions of the rule, in order: ("elide", turn), ("example", instruction
    turn), ("drop", assistant turn)."""
    first = _instruction_index(turns) + 1
    observations = [i for i, t in enumerate(turns) if i >= first and t.kind == "observation"]
    recent = set(observations[len(observations) - keep_recent :]) if keep_recent else set()
    plan = [
        ("elide", i)
        for i in observations
        if i not in recent and len(turns[i].content) > len(ELIDED_OBSERVATION)
    ]
    if first > 0 and without_example(turns[first - 1].content) is not None:
        plan.append(("example", first - 1))
    steps = [i for i, t in enumerate(turns) if i >= first and t.role == "assistant"]
    windowed = steps[: max(0, len(steps) - keep_recent)]
    plan += [("drop", i) for i in windowed if i + 1 < len(turns)]
    return plan


def _apply(turns: Sequence[Turn], plan: Sequence[tuple[str, int]]) -> list[Turn]:
    elided = {i for kind, i in plan if kind == "elide"}
    dropped = {j for kind, i in plan if kind == "drop" for j in (i, i + 1)}
    example = any(kind == "example" for kind, _ in plan)
    steps = sum(1 for kind, _ in plan if kind == "drop")
    out: list[Turn] = []
    for index, turn in enumerate(turns):
        if index in dropped:
            continue
        if index in elided:
            turn = turn.model_copy(update={"content": ELIDED_OBSERVATION})
        elif turn.kind == "instruction" and (example or steps):
            content = (without_example(turn.content) if example else None) or turn.content
            if steps:
                content += steps_omitted(steps)
            turn = turn.model_copy(update={"content": content})
        out.append(turn)
    return out


def fit_turns(
    turns: Sequence[Turn],
    budget: int,
    counter: TokenCounter,
    *,
    generation_prompt: bool = True,
    keep_recent: int = KEEP_RECENT,
    strict: bool = True,
) -> Fitted:
    """`turns` fitted to `budget` tokens by the rule of the module docstring.

    With `strict`, a prompt that cannot fit raises `ContextOverflow`; without, the most
    reduced turns are returned with `overflow` set (training then cuts what is left).
    """
    turns = list(turns)
    plan = _reductions(turns, keep_recent)

    def size(candidate: list[Turn]) -> int:
        return counter.count(to_messages(candidate), generation_prompt=generation_prompt)

    rendered, count = fewest(lambda n: _apply(turns, plan[:n]), size, len(plan), budget)
    if count is None and strict:
        raise ContextOverflow(
            f"the prompt needs {size(rendered)} tokens with every earlier observation elided, "
            f"the demonstration dropped and only the last {keep_recent} steps kept, over the "
            f"budget of {budget} (counted with the {counter.name}); raise the context "
            "(agent.max_context_tokens / teacher.max_context_tokens) or clip observations "
            "further (agent.max_observation_chars)"
        )
    used = plan if count is None else plan[:count]
    dropped = [i for kind, i in used if kind == "drop"]
    return Fitted(
        turns=rendered,
        tokens=size(rendered),
        elided_observations=sum(1 for kind, _ in used if kind == "elide"),
        example_dropped=any(kind == "example" for kind, _ in used),
        dropped_steps=len(dropped),
        dropped_trained=sum(1 for i in dropped if turns[i].loss),
        overflow=count is None,
    )


@dataclass(frozen=True)
class PromptFitter:
    """The agent's prompts fitted to `budget` prompt tokens (context minus generation)."""

    budget: int
    counter: TokenCounter
    keep_recent: int = KEEP_RECENT

    def messages(self, turns: Sequence[Turn], stats: EpisodeStats | None = None) -> list[Message]:
        """Chat messages of `turns`, fitted; a fitted prompt is counted in `stats`."""
        fitted = fit_turns(turns, self.budget, self.counter, keep_recent=self.keep_recent)
        if fitted.fitted and stats is not None:
            stats.fitted_prompts += 1
        return to_messages(fitted.turns)


def fit_messages(
    turns: Sequence[Turn], fitter: PromptFitter | None, stats: EpisodeStats | None = None
) -> list[Message]:
    """The prompt of an episode's next turn: `turns` as messages, fitted when a fitter is set."""
    if fitter is None:
        return to_messages(list(turns))
    return fitter.messages(turns, stats)


# -- budgets and counters from params.yaml -------------------------------------------------
def model_context_length(model: str) -> int | None:
    """The context length in a model's config (`max_position_embeddings` or the like);
    None when the config cannot be read here (a hub id with no hub access)."""
    from transformers import AutoConfig

    from stepflow.llm.embedded import resolve_model

    try:
        config = AutoConfig.from_pretrained(resolve_model(model))
    except (OSError, ValueError) as exc:
        log.debug("no config for %s: %s", model, exc)
        return None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def token_counter(model: str, tokenizer: PreTrainedTokenizerBase | None = None) -> TokenCounter:
    """The exact counter of `model` when its tokenizer loads here, else `CharEstimate`."""
    if tokenizer is None:
        from stepflow.train.modeling import load_tokenizer

        try:
            tokenizer = load_tokenizer(model)
        except (OSError, ValueError) as exc:
            log.info("no tokenizer for %s (%s): prompt sizes are estimated", model, exc)
            return CharEstimate()
    return TemplateCounter(tokenizer)


def endpoint_context_length(endpoint: EndpointConfig) -> int | None:
    """The context length an OpenAI-compatible server reports for its model (vLLM's
    `max_model_len` in `GET /models`); None when no server answers with one."""
    import os

    import httpx

    key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for url in endpoint.urls:
        try:
            reply = httpx.get(f"{url.rstrip('/')}/models", headers=headers, timeout=10.0)
            reply.raise_for_status()
            models = reply.json().get("data", [])
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            log.debug("no model list from %s: %s", url, exc)
            continue
        for entry in models:
            if not isinstance(entry, dict):
                continue
            length = entry.get("max_model_len")
            if entry.get("id") == endpoint.model and isinstance(length, int) and length > 0:
                return length
    return None


def context_budget(context: int | None, llm: LLMConfig, max_new_tokens: int, key: str) -> int:
    """Prompt tokens left after generation by a context: `key`'s value, else the model's
    config, else what the model's server reports (`max_model_len`)."""
    length = context or model_context_length(llm.model)
    if length is None and llm.endpoint is not None:
        length = endpoint_context_length(llm.endpoint)
    if length is None:
        where = f" nor from its server {llm.endpoint.urls}" if llm.endpoint else ""
        raise ValueError(
            f"{key} is null and the context length of model {llm.model!r} cannot be read "
            f"from its config here{where}; set {key}"
        )
    budget = length - max_new_tokens
    if budget <= 0:
        raise ValueError(
            f"{key}: a context of {length} tokens leaves no room for a prompt after "
            f"{max_new_tokens} generated tokens"
        )
    return budget


def prompt_fitter(
    params: Params, llm: LLMConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> PromptFitter:
    """The agent's prompt fitter for the model `llm` (the student, or evaluation's model)."""
    budget = context_budget(
        params.agent.max_context_tokens,
        llm,
        llm.generation.max_new_tokens,
        "agent.max_context_tokens",
    )
    return PromptFitter(budget, token_counter(llm.model, tokenizer))

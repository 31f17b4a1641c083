"""ReAct prompting: the system prompt, the instruction turn, step and reflection formats.

A trajectory is stored with its prompt already rendered, so training sees exactly what the
agent saw at rollout time. The optional one-shot example is a golden trajectory of the
training split (chosen by the prepare stage, never a test task).
"""

from __future__ import annotations

import functools
from importlib import resources

from stepflow.agent.parser import ParsedStep
from stepflow.data.trajectory import Trajectory, Turn

OBSERVATION_PREFIX = "Observation: "
EXAMPLE_INTRO = "Here is an example of a solved task.\n"
EXAMPLE_OUTRO = "\n\nNow it is your turn."


@functools.cache
def system_prompt(env: str) -> str:
    """The system prompt of an environment (from `templates/agent/<env>.system.txt`)."""
    path = resources.files("stepflow") / "templates" / "agent" / f"{env}.system.txt"
    if not path.is_file():
        raise ValueError(f"no agent prompt template for environment {env!r}")
    return path.read_text().strip()


def format_step(thought: str | None, action: str) -> str:
    """An assistant turn: `Thought: ...` (optional) then `Action: ...`."""
    thought = (thought or "").strip()
    if not thought:
        return f"Action: {action.strip()}"
    return f"Thought: {thought}\nAction: {action.strip()}"


def format_reflection(reflection: str, thought: str | None, action: str) -> str:
    """A teacher's correction turn: `Reflection: ...` then the corrected step."""
    return f"Reflection: {reflection.strip()}\n{format_step(thought, action)}"


def format_turn(parsed: ParsedStep) -> str:
    """A parsed agent turn as recorded: `Reflection: ...` (when the agent wrote one), then
    the step. The recorded turn is the context of the agent's next prompt, so it keeps
    everything the agent said that training teaches it to say."""
    assert parsed.action is not None, "only a parsed step with an action is recorded"
    if parsed.reflection:
        return format_reflection(parsed.reflection, parsed.thought, parsed.action)
    return format_step(parsed.thought, parsed.action)


def format_observation(observation: str, max_chars: int | None = None) -> str:
    """A user turn holding an environment observation (clipped to `max_chars`)."""
    text = observation.strip()
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars].rstrip() + " ..."
    return OBSERVATION_PREFIX + text


def render_example(example: Trajectory) -> str:
    """A golden trajectory rendered as a plain-text demonstration."""
    lines = [f"Task: {example.instruction}"]
    for turn in example.turns[2:]:
        lines.append(turn.content)
    return "\n".join(lines)


def instruction_text(
    instruction: str, first_observation: str, example: str | None, max_chars: int | None = None
) -> str:
    """The first user turn: the optional demonstration, the task and the first observation."""
    parts = []
    if example:
        parts.append(f"{EXAMPLE_INTRO}{example}{EXAMPLE_OUTRO}")
    parts.append(f"Task: {instruction.strip()}")
    parts.append(format_observation(first_observation, max_chars))
    return "\n".join(parts)


def without_example(instruction_content: str) -> str | None:
    """The instruction turn's text with its one-shot demonstration left out (None when it
    has none): exactly what `instruction_text` writes without an example."""
    if not instruction_content.startswith(EXAMPLE_INTRO):
        return None
    _, separator, rest = instruction_content.partition(EXAMPLE_OUTRO + "\n")
    return rest if separator else None


def opening_turns(
    env: str,
    instruction: str,
    first_observation: str,
    example: str | None = None,
    max_chars: int | None = None,
) -> list[Turn]:
    """System prompt and instruction turn that open every trajectory."""
    return [
        Turn(role="system", kind="system", content=system_prompt(env)),
        Turn(
            role="user",
            kind="instruction",
            content=instruction_text(instruction, first_observation, example, max_chars),
        ),
    ]


def to_messages(turns: list[Turn]) -> list[dict[str, str]]:
    """Chat messages (role, content) for a chat template or an OpenAI endpoint."""
    return [{"role": t.role, "content": t.content} for t in turns]

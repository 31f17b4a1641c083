"""Import/export of the agent-SFT conversation format used by other agent-tuning projects.

A record is `{"id": ..., "conversations": [{"from": "human"|"gpt"|"system", "value": ...,
"loss": bool|null}, ...]}`. Exported records also carry a `stepflow` block (every trajectory
field but the turns) and a `kind`/`action` per turn, so export → import is lossless; records
from elsewhere import without them: kinds are inferred from position and loss flags, an
assistant turn without a loss flag is trained (as SFT on such data trains every assistant
turn), and its action is read from its "Action: ..." line (ETO's and AgentTuning's ALFWorld
data write `put X in/on Y`, the wording stepflow's ALFWorld speaks).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stepflow.agent.parser import parse_step
from stepflow.data.jsonl import DataError, write_records
from stepflow.data.trajectory import Provenance, Trajectory, Turn

_FROM_ROLE = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
_TO_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def to_conversation(trajectory: Trajectory) -> dict[str, Any]:
    """One trajectory as a conversation record."""
    conversations = [
        {
            "from": _TO_FROM[turn.role],
            "value": turn.content,
            "loss": turn.loss if turn.role == "assistant" else None,
            "kind": turn.kind,
            "action": turn.action,
            **({"score": turn.score} if turn.score is not None else {}),
        }
        for turn in trajectory.turns
    ]
    meta = trajectory.model_dump(mode="json", exclude={"turns"})
    return {"id": trajectory.key, "conversations": conversations, "stepflow": meta}


def _infer_kind(role: str, index: int, entry: dict[str, Any]) -> str:
    if role == "system":
        return "system"
    if role == "user":
        return "instruction" if index <= 1 else "observation"
    if entry.get("loss") is False:
        return "erroneous_step"
    return "reflection" if entry["value"].lstrip().startswith("Reflection:") else "step"


def from_conversation(record: dict[str, Any], defaults: dict[str, Any] | None = None) -> Trajectory:
    """A conversation record as a trajectory; `defaults` fill fields a foreign record lacks
    (env, task_type, variation, split, reward, success, ...)."""
    entries = record.get("conversations")
    if not isinstance(entries, list) or not entries:
        raise ValueError("record has no 'conversations' list")
    turns = []
    for index, entry in enumerate(entries):
        role = _FROM_ROLE.get(entry.get("from"))
        if role is None:
            raise ValueError(f"conversations[{index}]: unknown speaker {entry.get('from')!r}")
        foreign = "kind" not in entry
        kind = entry.get("kind") or _infer_kind(role, index, entry)
        flag = entry.get("loss")
        trained = flag is not False if foreign else bool(flag)
        loss = trained if role == "assistant" and kind != "erroneous_step" else False
        action = entry.get("action")
        if foreign and role == "assistant" and action is None:
            action = parse_step(entry["value"]).action
        turns.append(
            Turn(
                role=role,
                content=entry["value"],
                kind=kind,
                loss=loss,
                action=action,
                score=entry.get("score"),
            )
        )
    meta = dict(record.get("stepflow") or {})
    if not meta:
        meta = {
            "env": "imported",
            "task_type": "imported",
            "variation": 0,
            "split": "u1",
            "reward": 1.0,
            "score": 100.0,
            "success": True,
            "provenance": Provenance(source="import", extra={"id": str(record.get("id", ""))}),
            **(defaults or {}),
        }
        first_user = next((t for t in turns if t.role == "user"), None)
        meta.setdefault("instruction", first_user.content if first_user else "")
        meta["num_steps"] = sum(1 for t in turns if t.role == "assistant")
    return Trajectory.model_validate({**meta, "turns": turns})


def export_conversations(trajectories: Iterable[Trajectory], path: str | Path) -> int:
    """Write trajectories as conversation records (JSONL, atomic)."""
    return write_records(path, (to_conversation(t) for t in trajectories))


def import_conversations(
    path: str | Path, defaults: dict[str, Any] | None = None
) -> Iterator[Trajectory]:
    """Read conversation records from JSONL or a JSON list; errors name file and record."""
    import json

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON: {exc}") from None
        where = f"{path}: record {{}}"
    else:
        items = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        where = f"{path}:{{}}"
    for number, item in items:
        try:
            record = json.loads(item) if isinstance(item, str) else item
            yield from_conversation(record, defaults)
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{where.format(number)}: {exc}") from None

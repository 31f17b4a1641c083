"""WebShop: the WebShop site (princeton-nlp/WebShop `web_agent_site`) driven over HTTP.

The protocol is the site's own, as ReAct-style agent projects drive it: a session named
`fixed_<goal>` shows goal `<goal>`; pages are `/<session>` (search box),
`/search_results/<session>/<keywords>/<page>`, `/item_page/<session>/<asin>/<keywords>/<page>/
<options>`, `/item_sub_page/.../<subpage>/<options>` and `/done/<session>/<asin>/<options>`,
whose page carries "Your score (min 0.0, max 1.0)" and the reward. Actions are
`search[keywords]` and `click[button]`; the page's HTML is turned into text where every
clickable is shown in brackets. Navigation state lives here, so reset + replay restores a
state exactly. Golden trajectories come from human demonstrations in the conversation format.

Over 300 lines, one module: one environment's adapter (pages to text, navigation,
demonstrations) behind the `TextEnv` interface, as each environment has.
"""

from __future__ import annotations

import re
from functools import cache
from html.parser import HTMLParser
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import httpx

from stepflow.config import WebShopConfig
from stepflow.envs.base import StepResult, TaskInstance, TextEnv

ENV_NAME = "webshop"
TASK_TYPE = "shop"
SCORE_LABEL = "Your score (min 0.0, max 1.0)"
SUBPAGES = ("Description", "Features", "Reviews", "Attributes")
INVALID = "Invalid action!"
_ACTION = re.compile(r"^(?P<verb>search|click)\[(?P<arg>.*)\]$", re.S)
_SKIP_TAGS = {"style", "script", "head", "title", "meta"}
_INSTRUCTION_IDS = ("instruction-text", "goal-instruction-text")


class WebShopUnavailable(ConnectionError):
    """The WebShop server could not be reached."""


class _Page(HTMLParser):
    """Visible text of a WebShop page with what each piece is (button, option, product)."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[tuple[str, str]] = []  # (kind, text)
        self.instruction: list[str] = []
        self._stack: list[tuple[str, dict]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag not in ("br", "img", "input", "hr", "meta", "link"):
            self._stack.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self._stack) - 1, -1, -1):
            if self._stack[index][0] == tag:
                del self._stack[index:]
                break

    def handle_data(self, data: str) -> None:
        text = " ".join(data.split())
        if not text or any(tag in _SKIP_TAGS for tag, _ in self._stack):
            return
        if any(a.get("id") in _INSTRUCTION_IDS for _, a in self._stack):
            self.instruction.append(text)
            return
        tag, attrs = self._stack[-1] if self._stack else ("", {})
        if tag == "button":
            kind = "button"
        elif tag == "label":
            kind = "option"
        elif "product-link" in (attrs.get("class") or "").split():
            kind = "product"
        else:
            kind = "text"
        self.items.append((kind, text))


def parse_page(html: str) -> _Page:
    """Parse one page."""
    page = _Page()
    page.feed(html)
    page.close()
    return page


def instruction_of(page: _Page) -> str:
    """The goal instruction shown on a page ("Instruction:" label removed)."""
    text = " ".join(page.instruction)
    return re.sub(r"^\s*Instruction:\s*", "", text).strip()


def render(page: _Page, selected: set[str]) -> str:
    """The page as observation text: one line per text or button, an option group's
    choices after its heading, clickables in brackets, chosen options in [[ ]]."""
    lines: list[str] = []
    last = ""
    for kind, text in page.items:
        if kind == "option":
            mark = f"[[{text}]]" if text in selected else f"[{text}]"
            if lines and last in ("option", "text"):
                lines[-1] += mark if last == "option" else f" {mark}"
            else:
                lines.append(mark)
        else:
            lines.append(text if kind == "text" else f"[{text}]")
        last = kind
    return "\n".join(lines)


@cache
def load_demonstrations(path: Path) -> dict[int, tuple[str, ...]]:
    """Goal index → action sequence of the demonstrations in a conversation-format file.

    The goal comes from a record's `stepflow.variation`, else the number ending its `id`
    (`webshop_123`, `fixed_123`)."""
    import json

    from stepflow.agent.parser import parse_step
    from stepflow.data.convert import from_conversation
    from stepflow.data.jsonl import DataError

    if not path.is_file():
        raise FileNotFoundError(f"env.webshop.demonstrations: {path} does not exist")
    text = path.read_text(encoding="utf-8")
    records = (
        json.loads(text)
        if text.lstrip().startswith("[")
        else [json.loads(line) for line in text.splitlines() if line.strip()]
    )
    demos: dict[int, tuple[str, ...]] = {}
    for number, record in enumerate(records, start=1):
        goal = (record.get("stepflow") or {}).get("variation")
        match = re.search(r"(\d+)$", str(record.get("id", "")))
        if goal is None and match is None:
            raise DataError(f"{path}: record {number}: no goal index (id or stepflow.variation)")
        trajectory = from_conversation(record, {"env": ENV_NAME, "task_type": TASK_TYPE})
        actions = tuple(
            turn.action or parse_step(turn.content).action or ""
            for turn in trajectory.assistant_turns()
            if turn.kind != "erroneous_step"
        )
        demos[int(goal) if goal is not None else int(match.group(1))] = actions
    return demos


class WebShopEnv(TextEnv):
    """A WebShop server behind the TextEnv interface; reward is the site's score on Buy Now."""

    name = ENV_NAME

    def __init__(self, config: WebShopConfig | None = None) -> None:
        self.config = config or WebShopConfig()
        self._client = httpx.Client(timeout=self.config.timeout_s, follow_redirects=True)
        self._instance: TaskInstance | None = None
        self._state: dict = {}
        self._page: _Page | None = None

    # -- task space ----------------------------------------------------------------------
    def task_types(self) -> list[str]:
        """WebShop has one kind of task: buy the product the instruction describes."""
        return [TASK_TYPE]

    def variations(self, task_type: str, split: Literal["train", "dev", "test"]) -> list[int]:
        """Goal indices of a split (`env.webshop.*_goals`)."""
        if task_type != TASK_TYPE:
            raise ValueError(f"unknown WebShop task type {task_type!r} (only {TASK_TYPE!r})")
        first, last = getattr(self.config, f"{split}_goals")
        return list(range(first, last))

    # -- HTTP ----------------------------------------------------------------------------
    @property
    def session(self) -> str:
        assert self._instance is not None
        return f"fixed_{self._instance.variation}"

    def _url(self) -> str:
        s = self._state
        keywords = quote(s.get("query", ""), safe="")
        options = quote(str(s.get("options", {})), safe="")
        base = f"{self.config.url}"
        page_type = s["page"]
        if page_type == "init":
            return f"{base}/{self.session}"
        if page_type == "search":
            return f"{base}/search_results/{self.session}/{keywords}/{s['page_num']}"
        asin = quote(s["asin"], safe="")
        if page_type == "item":
            return f"{base}/item_page/{self.session}/{asin}/{keywords}/{s['page_num']}/{options}"
        if page_type == "item_sub":
            return (
                f"{base}/item_sub_page/{self.session}/{asin}/{keywords}/{s['page_num']}/"
                f"{s['subpage']}/{options}"
            )
        return f"{base}/done/{self.session}/{asin}/{options}"

    def _fetch(self) -> _Page:
        url = self._url()
        try:
            response = self._client.get(url)
            response.raise_for_status()
        except httpx.TransportError as exc:
            raise WebShopUnavailable(
                f"WebShop server at {self.config.url} (env.webshop.url): {exc}"
            ) from exc
        self._page = parse_page(response.text)
        return self._page

    # -- episode -------------------------------------------------------------------------
    def reset(self, instance: TaskInstance) -> tuple[str, str]:
        """Open the goal's session; return (instruction, search page)."""
        if instance.env != ENV_NAME:
            raise ValueError(f"{instance.key}: not a WebShop instance")
        self._instance = instance
        self._state = {"page": "init"}
        page = self._fetch()
        instruction = instruction_of(page)
        return instruction, f"WebShop\nInstruction:\n{instruction}\n{render(page, set())}"

    def _clickables(self) -> dict[str, str]:
        page = self._page
        return {} if page is None else {t.lower(): k for k, t in page.items if k != "text"}

    def _original(self, label: str) -> str:
        assert self._page is not None
        return next(t for k, t in self._page.items if k != "text" and t.lower() == label.lower())

    def _option_type(self, label: str) -> str:
        """The option group (the text heading it) of an option label on the item page."""
        assert self._page is not None
        group = ""
        for kind, text in self._page.items:
            if kind == "text":
                group = text
            elif kind == "option" and text.lower() == label.lower():
                return group
        return group

    def _invalid(self) -> StepResult:
        return StepResult(INVALID, 0.0, 0.0, done=False, success=False, valid=False)

    def step(self, action: str) -> StepResult:
        """Execute `search[...]` or `click[...]`; reward on Buy Now."""
        if self._instance is None:
            raise RuntimeError("step() before reset()")
        match = _ACTION.match(action.strip())
        if match is None:
            return self._invalid()
        verb, arg = match.group("verb"), match.group("arg").strip()
        state, page_type = self._state, self._state["page"]
        clickables = self._clickables()
        note = None
        if verb == "search":
            if page_type != "init" or not arg:
                return self._invalid()
            self._state = {"page": "search", "query": arg, "page_num": 1}
        elif arg.lower() not in clickables:
            return self._invalid()
        elif arg.lower() == "back to search":
            self._state = {"page": "init"}
        elif arg.lower() == "next >" and page_type == "search":
            state["page_num"] += 1
        elif arg.lower() == "< prev":
            if page_type == "search" and state["page_num"] > 1:
                state["page_num"] -= 1
            elif page_type == "item_sub":
                state["page"] = "item"
            elif page_type == "item":
                state.update(page="search", options={})
            else:
                return self._invalid()
        elif arg.lower() == "buy now" and page_type == "item":
            state["page"] = "done"
        elif arg.lower() in (s.lower() for s in SUBPAGES) and page_type == "item":
            state.update(page="item_sub", subpage=self._original(arg))
        elif clickables[arg.lower()] == "product" and page_type == "search":
            state.update(page="item", asin=self._original(arg), options={})
        elif clickables[arg.lower()] == "option" and page_type == "item":
            label = self._original(arg)
            state.setdefault("options", {})[self._option_type(label)] = label
            note = f"You have clicked {label}."
        else:
            return self._invalid()
        page = self._fetch()
        if self._state["page"] == "done":
            return self._bought(page)
        selected = set(self._state.get("options", {}).values())
        observation = note or render(page, selected)
        return StepResult(observation, 0.0, 0.0, done=False, success=False)

    def _bought(self, page: _Page) -> StepResult:
        texts = [t for _, t in page.items]
        if SCORE_LABEL not in texts or texts.index(SCORE_LABEL) + 1 >= len(texts):
            raise RuntimeError(f"WebShop done page has no '{SCORE_LABEL}': {self._url()}")
        reward = max(0.0, min(1.0, float(texts[texts.index(SCORE_LABEL) + 1])))
        return StepResult(
            observation=f"{SCORE_LABEL}: {reward:g}",
            reward=reward,
            score=reward * 100.0,
            done=True,
            success=reward >= 1.0,
            info={"asin": self._state.get("asin"), "options": self._state.get("options", {})},
        )

    def valid_actions(self) -> list[str]:
        """`search[<keywords>]` on the search page, else `click[...]` of every clickable."""
        if self._state.get("page") == "init":
            return ["search[<keywords>]"]
        assert self._page is not None
        return [f"click[{text}]" for kind, text in self._page.items if kind != "text"]

    def gold_actions(self) -> list[str]:
        """The demonstration's actions for the current goal ([] when there is none)."""
        if self._instance is None:
            raise RuntimeError("gold_actions() before reset()")
        if self.config.demonstrations is None:
            raise ValueError(
                "env.webshop.demonstrations is not set: WebShop golden trajectories come from "
                "human demonstrations (conversation format, see README)"
            )
        demos = load_demonstrations(Path(self.config.demonstrations).resolve())
        return list(demos.get(self._instance.variation, ()))

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()

"""Self-reflected trajectory synthesis: teachers that judge student steps and write
reflections + corrections, and the `synthesize` stage that runs them on U2 (`synthesis`)."""

from __future__ import annotations

from stepflow.config import TeacherConfig
from stepflow.teacher.base import Judgment, StepFacts, Teacher, TeacherStats

__all__ = ["Judgment", "StepFacts", "Teacher", "TeacherStats", "make_teacher"]


def make_teacher(config: TeacherConfig) -> Teacher:
    """The teacher configured in params.yaml (`teacher.kind`, `teacher.reflection`); an LLM
    judge gets its prompts fitted to `teacher.max_context_tokens` (or its model's context)."""
    from stepflow.agent.context import context_budget, token_counter
    from stepflow.llm import make_backend
    from stepflow.teacher.llm import LLMTeacher
    from stepflow.teacher.reference import ReferenceTeacher

    backend = make_backend(config.llm) if config.llm is not None else None
    if config.kind == "llm":
        assert backend is not None and config.llm is not None  # TeacherConfig validation
        generated = config.llm.generation.max_new_tokens
        return LLMTeacher(
            backend,
            prompt_version=config.prompt_version,
            max_retries=config.max_retries,
            fallback=config.fallback,
            max_new_tokens=generated,
            budget=context_budget(
                config.max_context_tokens,
                config.llm,
                generated,
                "teacher.max_context_tokens",
            ),
            counter=token_counter(config.llm.model, getattr(backend, "tokenizer", None)),
        )
    return ReferenceTeacher(
        config.prompt_version,
        reflection_backend=backend if config.reflection == "llm" else None,
        max_new_tokens=config.llm.generation.max_new_tokens if config.llm else 96,
    )

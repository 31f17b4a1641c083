"""ScienceWorld's JVMs run with a capped heap (one per parallel episode adds up fast)."""

from __future__ import annotations

import os

from stepflow.envs.base import TaskInstance
from stepflow.envs.scienceworld import JVM_OPTIONS, ScienceWorldEnv


def max_heap_bytes(env: ScienceWorldEnv) -> int:
    """The JVM's own answer: Runtime.maxMemory() over the simulator's gateway."""
    return int(env._sim._gateway.jvm.java.lang.Runtime.getRuntime().maxMemory())


def test_the_simulator_jvm_heap_is_capped_unless_the_user_sets_jvm_options(monkeypatch) -> None:
    assert "-Xmx512m" in JVM_OPTIONS.split()
    for name in ("JDK_JAVA_OPTIONS", "JAVA_TOOL_OPTIONS"):
        monkeypatch.delenv(name, raising=False)
    env = ScienceWorldEnv()
    try:
        assert max_heap_bytes(env) <= 512 * 2**20
        variation = env.variations("find-animal", "train")[0]
        env.reset(TaskInstance("scienceworld", "find-animal", variation, "train"))
        assert env.step("look around").observation
    finally:
        env.close()
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Xmx768m")
    monkeypatch.delenv("JDK_JAVA_OPTIONS", raising=False)
    env = ScienceWorldEnv()
    try:
        assert 512 * 2**20 < max_heap_bytes(env) <= 768 * 2**20
        assert "JDK_JAVA_OPTIONS" not in os.environ
    finally:
        env.close()

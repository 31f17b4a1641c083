"""The machine's matmul peak: FLOP/s of large square `torch.matmul`s, fp32 and bf16.

Training's fraction of peak (benchmarks/bench_training.py) is its model FLOP/s over this
peak, for the dtype its matmuls run in. Each figure is the best of `--bursts` timed bursts
(`--seconds` each) of n x n @ n x n products, 2n^3 FLOPs apiece; the best burst is the one
that held the cores alone longest, which on a shared machine is the nearest to the
hardware's figure. Threads, dtypes and bursts are interleaved.

    python benchmarks/bench_matmul.py [--size 2048] [--threads 1,2] [--bursts 5]

Writes benchmarks/results/matmul.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from stepflow.data.jsonl import atomic_write_json
from stepflow.provenance import code_version, utc_now
from stepflow.train.modeling import cpu_has_native_bf16, device

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "matmul.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def matmul_burst(dtype: torch.dtype, size: int, seconds: float) -> float:
    """FLOP/s of back-to-back `size`-square matmuls for about `seconds` (one burst)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)  # first call: allocation and kernel choice
    count = 0
    began = time.perf_counter()
    while (elapsed := time.perf_counter() - began) < seconds:
        torch.matmul(a, b)
        count += 1
    return 2 * size**3 * count / elapsed


def peak_flops(
    dtype: torch.dtype, size: int = 2048, bursts: int = 3, seconds: float = 0.3
) -> float:
    """The best of `bursts` matmul bursts on the current torch threads, in FLOP/s."""
    return max(matmul_burst(dtype, size, seconds) for _ in range(bursts))


def machine_load() -> list[float]:
    """The 1, 5 and 15-minute load averages (`uptime`)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    """The CPU's model name (lscpu), or the platform's processor string."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine() -> dict:
    """What the figures were measured on."""
    return {
        "device": device(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def main() -> None:
    """Measure every (threads, dtype) `--bursts` times, interleaved; keep best and median."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}")
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args()
    threads = sorted({int(t) for t in args.threads.split(",")})
    loads = [machine_load()]
    bursts: dict[str, list[float]] = {}
    for _ in range(args.bursts):
        for n in threads:
            torch.set_num_threads(n)
            for name, dtype in DTYPES.items():
                flops = matmul_burst(dtype, args.size, args.seconds)
                bursts.setdefault(f"{name}/threads_{n}", []).append(flops)
        loads.append(machine_load())
    peak = {key: round(max(v) / 1e9, 2) for key, v in bursts.items()}
    median = {key: round(statistics.median(v) / 1e9, 2) for key, v in bursts.items()}
    report = {
        "created_at": utc_now().isoformat(),
        "code_version": code_version(),
        "machine": machine(),
        "setup": {
            "size": args.size,
            "threads": threads,
            "bursts": args.bursts,
            "seconds_per_burst": args.seconds,
        },
        "peak_gflops": peak,
        "median_gflops": median,
        "bf16_over_fp32": {
            f"threads_{n}": round(peak[f"bfloat16/threads_{n}"] / peak[f"float32/threads_{n}"], 2)
            for n in threads
        },
        "load_average_1_5_15": loads,
        "note": "cores shared with other processes: the best burst is the peak, the median "
        "what a longer job can expect under the load recorded here",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS, report)
    print(RESULTS)
    for key in bursts:
        print(f"{key:>22}: peak {peak[key]:7.1f} GFLOP/s, median {median[key]:7.1f}")
    print("load average during the run:", loads)


if __name__ == "__main__":
    main()

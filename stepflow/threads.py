"""torch's thread count for a block of work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run torch on `threads` threads inside the block (None: leave them as they are).

    On a CPU shared with other processes (simulators, servers, other stages), one thread is
    the fast setting: two OpenMP threads wait for each other at every op whenever another
    process holds a core.
    """
    import torch  # here: a rollout on an endpoint needs no torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

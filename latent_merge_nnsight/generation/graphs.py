"""CUDA graphs of a fixed-shape step, shared by the fast engine and live sources.

A step function reads its inputs from static buffers and returns its outputs; `CapturedStep` warms it up
on one side stream per device (refusing a step that synchronises), captures it, and replays it.
`EagerStep` stands in for it off CUDA, so the fixed-shape path runs (and is tested) on CPU too.
`StepInputs` holds a decode step's static inputs and replays the step with the KV caches writing at
its device-side slot. `FixedStep` puts both together: the one fixed-shape decode step of both engines
(the fast engine's paired step, a `Stepper`'s own step for a live source under the nnsight engine).
"""

import functools
import warnings
from collections.abc import Callable, Hashable
from typing import Any, TypeAlias

import torch

__all__ = ["CapturedStep", "EagerStep", "FixedStep", "StepGraphs", "StepInputs", "side_stream"]


_SIDE_STREAMS: dict[int, Any] = {}


def side_stream() -> Any:
    """One warm-up/capture stream per device, reused by every capture: cuBLAS keeps a workspace for each
    stream it has seen, so a fresh stream per capture leaves a workspace behind each time (on an H200 this
    held 17 MB per capture, up to the 32 streams of torch's pool)."""
    device = torch.cuda.current_device()
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


StepOut: TypeAlias = "torch.Tensor | tuple[StepOut, ...] | list[StepOut] | None"
"""What a fixed-shape step returns: tensors, maybe nested in tuples and lists (refilled in place)."""
PoolHandle: TypeAlias = tuple[int, int]
"""A CUDA graphs' memory pool (`CUDAGraph.pool()`, torch's `_POOL_HANDLE`)."""


class CapturedStep:
    """One captured fixed-shape step (a decode step for one batch size), replayed on its static buffers."""

    def __init__(self, step: Callable[[], StepOut], pool: PoolHandle | None = None):
        stream = side_stream()
        stream.wait_stream(torch.cuda.current_stream())
        mode = torch.cuda.get_sync_debug_mode()
        with torch.cuda.stream(stream):  # warm-up outside the graph (rewrites the same cache slot)
            step()  # the first call may compile (torch.compile), which is allowed to synchronise
            torch.cuda.set_sync_debug_mode("error")  # a step that synchronises cannot be captured
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.out = step()

    def replay(self) -> Any:
        self.graph.replay()
        return self.out


class EagerStep:
    """Stands in for `CapturedStep` off CUDA (`static_step=True`): runs the same fixed-shape step.

    Like a graph's outputs, the tensors it returns are the same ones every replay (refilled in place), so
    code that forgets to copy a result before the next step fails on CPU too.
    """

    def __init__(self, step: Callable[[], StepOut]):
        self.step = step
        self.out: StepOut = None

    def replay(self) -> Any:
        fresh = self.step()
        if self.out is None:
            self.out = fresh
        else:
            _refill(self.out, fresh)
        return self.out


def _refill(out: StepOut, fresh: StepOut) -> None:
    """Copy `fresh` into `out`, tensor by tensor, through tuples and lists (None stays None)."""
    if isinstance(out, torch.Tensor):
        out.copy_(fresh)
    elif isinstance(out, (tuple, list)):
        for o, f in zip(out, fresh, strict=True):
            _refill(o, f)


class StepGraphs:
    """Fixed-shape steps by key (a batch size, a depth): captured CUDA graphs sharing one memory pool, or
    `EagerStep`s when `use_graphs` is off.

    `replay(key, step)` captures `step` the first time a key comes and replays it after. A failed capture
    warns, records `error`, turns `use_graphs` off and returns None: the caller then runs the step
    eagerly (and keeps doing so). Off CUDA a failing step raises as it would anyway.
    """

    def __init__(self, device: torch.device, use_graphs: bool, what: str):
        self.device = device
        self.use_graphs = use_graphs
        self.what = what
        self.steps: dict[Hashable, CapturedStep | EagerStep] = {}
        self.pool: PoolHandle | None = None
        self.error: str | None = None

    def __bool__(self) -> bool:
        return bool(self.steps)

    def replay(self, key: Hashable, step: Callable[[], Any]) -> Any:
        try:
            if key not in self.steps and not self.use_graphs:
                self.steps[key] = EagerStep(step)
            elif key not in self.steps:
                with torch.cuda.device(self.device):
                    graph = CapturedStep(step, pool=self.pool)
                self.steps[key] = graph
                self.pool = graph.graph.pool()
            return self.steps[key].replay()
        except Exception as e:  # capture is best effort: the caller falls back to its eager step
            if not self.use_graphs:
                raise
            self.error = f"{type(e).__name__}: {e}"
            warnings.warn(
                f"CUDA graph capture of {self.what} failed ({self.error}); running it eagerly", stacklevel=3
            )
            self.use_graphs = False
            self.clear()
            return None

    def clear(self) -> None:
        """Drop every step (and the graphs' memory pool)."""
        self.steps.clear()
        self.pool = None


class StepInputs:
    """The static inputs of a fixed-shape decode step, and its replay with the caches writing at `slot`.

    Attributes:
        ids, pos: the new token and its position per row, `[rows, 1]` (a run may use the first rows only).
        slot: the cache slot the step writes, `[1]` (a device tensor: one graph serves every step).
        kv_mask: `[rows, kv_slots]`, the attention mask over cache slots (for a step that keeps its own).
        shape: `(rows, kv_slots)` as made.
    """

    def __init__(self, rows: int, device: torch.device | str, kv_slots: int | None = None):
        zeros = functools.partial(torch.zeros, dtype=torch.long, device=device)
        self.ids, self.pos, self.slot = zeros(rows, 1), zeros(rows, 1), zeros(1)
        self.kv_mask = None if kv_slots is None else zeros(rows, kv_slots)
        self.shape = (rows, kv_slots)

    def load(self, ids: torch.Tensor, positions: torch.Tensor, slot: int) -> None:
        """This step's tokens `[n, 1]` and positions `[n, 1]` into the first n rows, and its slot."""
        n = ids.shape[0]
        self.ids[:n].copy_(ids)
        self.pos[:n].copy_(positions)
        self.slot.fill_(slot)

    def replay(self, graphs: StepGraphs, key: Hashable, step: Callable[[], Any], caches: list[Any]) -> Any:
        """Run `step` (captured under `key` the first time) with every `KVCache` in `caches` writing at
        `slot`; returns its outputs, or None when capture failed. Each cache then counts the slot as
        written (or, when the step did not run, as not)."""
        for cache in caches:
            cache.graph_mode, cache.write_index = True, self.slot
        out = None
        try:
            out = graphs.replay(key, step)
            return out
        finally:
            for cache in caches:
                cache.graph_mode = False
                cache.filled = [cache.end if out is not None else cache.start] * cache.n_layers


class FixedStep:
    """A decode step run at fixed shapes: its static inputs, its captured (or eager) versions by key,
    and `on`, whether decode steps take this path (a failed capture turns it off for good).

    Arguments:
        device: where the step runs.
        use_graphs: capture the step as CUDA graphs (CUDA only).
        static: run the fixed-shape step without capturing it (to check the path on CPU).
        what: the step's name in the warning of a failed capture.
    """

    def __init__(self, device: torch.device, use_graphs: bool, static: bool, what: str):
        self.graphs = StepGraphs(device, use_graphs, what)
        self.on = use_graphs or static
        self.inputs: StepInputs | None = None  # made on first use

    def inputs_for(self, rows: int, device: torch.device | str, kv_slots: int | None = None) -> StepInputs:
        """The static inputs for `rows` rows (and a mask over `kv_slots` slots). New buffers make every
        captured step stale, so those are dropped."""
        inputs = self.inputs
        if inputs is None or inputs.shape != (rows, kv_slots):
            self.graphs.clear()
            self.inputs = StepInputs(rows, device, kv_slots=kv_slots)
        return self.inputs

    def replay(self, key: Hashable, step: Callable[[], Any], caches: list[Any]) -> Any:
        """`StepInputs.replay` on these inputs; None (and `on` turned off) when capture failed."""
        out = self.inputs.replay(self.graphs, key, step, caches)
        if out is None:
            self.on = False
        return out

    def release(self) -> None:
        """Drop the captured steps and the static inputs."""
        self.graphs.clear()
        self.inputs = None

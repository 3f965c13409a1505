"""A local system as the judge of JudgeBench's official protocol (no API needed): `lmn judgebench-accuracy
--judge-system`. Lives here, above `systems/`: a system is the judge's model, JudgeBench is evaluation."""

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from latent_merge_nnsight.evaluation.judge import judgebench_accuracy_sync
from latent_merge_nnsight.systems.loaded import LoadedSystem, load_system
from latent_merge_nnsight.systems.spec import System

__all__ = ["judge_model_id", "judgebench_accuracy_system"]


def judge_model_id(system: "LoadedSystem", overrides: Mapping[str, Any] | None = None) -> str:
    """``name-<hash>``: the system's name plus a hash of its settings, so a judgment cache never mixes
    judgments of two different setups that share a name."""
    blob = json.dumps([system.config.to_dict(), dict(overrides or {})], sort_keys=True)
    return f"{system.name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def judgebench_accuracy_system(
    pairs: Sequence[Any],
    system: "str | Path | System | LoadedSystem",
    template: Any,
    *,
    cache_path: str | Path | None = None,
    batch_size: int = 8,
    both_orders: bool = True,
    progress: bool = True,
    retry_invalid: bool = False,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """JudgeBench's official protocol with a local system as the judge (`lmn judgebench-accuracy
    --judge-system`): returns records in JudgeBench's output format, for `official_accuracy`.

    Judge requests are batched ``batch_size`` at a time (twice that many are kept in flight so the next
    batch gathers while one generates). ``overrides`` set the judge's sampling (e.g. ``max_new_tokens``).
    """
    loaded = load_system(system)
    fn = loaded.complete_fn(max_batch_size=batch_size, **overrides)
    model_id = judge_model_id(loaded, overrides)
    return judgebench_accuracy_sync(
        pairs,
        fn,
        template,
        cache_path=cache_path,
        judge_model=model_id,
        judge_name=loaded.name,
        both_orders=both_orders,
        concurrency=2 * batch_size,
        progress=progress,
        retry_invalid=retry_invalid,
    )

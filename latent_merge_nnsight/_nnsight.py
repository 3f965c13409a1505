"""Where this package meets nnsight's side effects.

Importing nnsight mounts a `save` method on `object` (so `value.save()` works inside a trace). anyio
(under httpx, starlette, openai) checks at class-definition time that every public attribute of a
`TypedAttributeSet` subclass is annotated, sees the mounted `save` through `dir(cls)` and raises
`TypeError: Attribute 'save' is missing its type annotation`. Which one is imported first then decides
whether judging and streaming work. `make_anyio_tolerate_mounts()` removes that dependence on order:
it imports anyio with the mount lifted (if nnsight is already in), and teaches anyio's check that public
names living on `object` itself are mounts, not attributes of the set. It runs when this module is imported,
which the package's `__init__` does first.

Below that guard is every other place the package reaches into nnsight beyond its documented `trace`
/ `generate` / envoy API: the wrapper class and the module it holds, the mediator of the running trace
(which model, which rows of a batched invoke), whether a model can be traced or is mid-trace, the
undecorated `generate`, the tracer class a pair's generation subclasses,
the per-module controllers the engines take off, and the error an out-of-order read raises. nnsight is
imported when one of these is first used (importing this module stays cheap and is done first).
"""

import contextlib
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from latent_merge_nnsight.nouns import Model, Tokenizer

if TYPE_CHECKING:
    from torch import nn


def _mounted_names() -> set[str]:
    """Public names on `object` itself: Python defines none, so every one is a mount (nnsight's `save`)."""
    return {name for name in vars(object) if not name.startswith("_")}


def _tolerant_init_subclass(cls: type) -> None:
    """anyio's annotation check for typed attribute sets, with names mounted on `object` left out."""
    annotated: set[str] = set()
    for klass in cls.__mro__:
        annotated.update(getattr(klass, "__annotations__", {}))
    mounted = _mounted_names()
    for name in dir(cls):
        if not name.startswith("_") and name not in annotated and name not in mounted:
            raise TypeError(f"Attribute {name!r} is missing its type annotation")


def _import_anyio_unmounted() -> None:
    """Import anyio (whose own classes run the check at import) with nnsight's mounts lifted, then restore."""
    mounted = {name: vars(object)[name].__func__ for name in _mounted_names()}
    if not mounted:
        import anyio  # noqa: F401

        return
    from nnsight._c import mount, unmount

    for name in mounted:
        unmount(name)
    try:
        import anyio  # noqa: F401
    finally:
        for name, func in mounted.items():
            mount(func, name)


def make_anyio_tolerate_mounts() -> None:
    """Make anyio work whether it is imported before or after nnsight; a no-op without anyio. Idempotent."""
    if "anyio" not in sys.modules:
        if importlib.util.find_spec("anyio") is None:
            return
        _import_anyio_unmounted()
    from anyio import TypedAttributeSet

    current = TypedAttributeSet.__dict__.get("__init_subclass__")
    if getattr(current, "__func__", None) is _tolerant_init_subclass:
        return
    TypedAttributeSet.__init_subclass__ = classmethod(_tolerant_init_subclass)  # type: ignore[assignment]


make_anyio_tolerate_mounts()


# ----------------------------------------------------------------------------------------------------
# nnsight internals the package relies on (imported lazily: see the module docstring)


def is_wrapped(obj: object) -> bool:
    """Whether `obj` is an nnsight wrapper or envoy (it holds a module: see `unwrap`)."""
    return hasattr(obj, "_module")


def unwrap(obj: object) -> Any:
    """The module an nnsight wrapper or envoy holds (`obj` itself when it is neither)."""
    return getattr(obj, "_module", obj)


def transformers_model(hf_model: "nn.Module", tokenizer: Tokenizer) -> Any:
    """nnsight's wrapper of an in-memory HF causal LM (`TransformersModel`)."""
    from nnsight.modeling.transformers import TransformersModel

    return TransformersModel(hf_model, tokenizer=tokenizer)


def current_mediator(who: str) -> Any | None:
    """The mediator of the trace running now (None outside a trace); `who` names the caller in nnsight's
    own error messages."""
    from nnsight.intervention.interleaver import Mediator

    try:
        return Mediator.current(who)
    except ValueError:
        return None


def invoke_rows(who: str) -> tuple[int, int] | None:
    """`(start, size)` of the batch rows of the invoke running now, when a trace batches several."""
    mediator = current_mediator(who)
    return None if mediator is None else mediator.batch_group


def traced_roots(who: str) -> list[Any] | None:
    """The root envoys of the models the running trace interleaves (None outside a trace)."""
    mediator = current_mediator(who)
    if mediator is None:
        return None
    return [e for e in mediator.interleaver.envoys.values() if getattr(e, "path", None) == "model"]


def is_traceable(model: Model) -> bool:
    """Whether `model` is an nnsight model (it has an interleaver, so it can be traced)."""
    return hasattr(model, "interleaver")


def model_generate(model: Model, *args: object, **kwargs: object) -> Any:
    """The model class's own `generate` (the HF call a traced generation runs), without the tracing
    decorator nnsight puts around it."""
    return type(model).generate.__wrapped__(model, *args, **kwargs)


def is_interleaving(model: Model) -> bool:
    """Whether `model` (an nnsight model) is inside a running trace now."""
    return bool(getattr(getattr(model, "interleaver", None), "interleaving", False))


def tracer_class() -> type:
    """nnsight's `InterleavingTracer`, the class `model.trace(tracer_cls=...)` expects to be subclassed."""
    from nnsight.intervention.tracer import InterleavingTracer

    return InterleavingTracer


def out_of_order_error() -> type[Exception]:
    """The error nnsight raises when a trace reads a module after a later one (`OutOfOrderError`)."""
    from nnsight.intervention.interleaver import OutOfOrderError

    return OutOfOrderError


def _controller_class() -> type | None:
    try:  # the forward nnsight installs on every module of a wrapped model
        from nnsight.intervention.source import Controller
    except ImportError:  # another nnsight: its controllers stay on (slower, same results)
        return None
    return Controller


@contextlib.contextmanager
def plain_forwards(modules: Sequence[Any]) -> Iterator[None]:
    """Run `modules` without nnsight's per-module controllers while the block lasts.

    A wrapped model's every module forwards through a controller that lets a trace reach it. Outside a
    trace it still costs a couple of microseconds per module call (5-10% of a tiny model's eager decode
    step on CPU), and `torch.compile` has to trace through it. The engines call the models directly and
    trace nothing, so they take the controllers off and put the same ones back after (a model is never
    traced from two threads at once: nnsight refuses that anyway). A module under an accelerate hook
    keeps its controller, which runs the hook.
    """
    controller = _controller_class()
    taken: list[tuple[Any, Any]] = []
    try:
        if controller is not None:
            for module in modules:
                forward = module.__dict__.get("forward")
                if isinstance(forward, controller) and "_hf_hook" not in module.__dict__:
                    del module.__dict__["forward"]
                    taken.append((module, forward))
        yield
    finally:
        for module, forward in taken:
            module.__dict__["forward"] = forward

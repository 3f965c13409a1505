"""Where this package meets nnsight's side effects.

Importing nnsight mounts a `save` method on `object` (so `value.save()` works inside a trace). anyio
(under httpx, starlette, openai) checks at class-definition time that every public attribute of a
`TypedAttributeSet` subclass is annotated, sees the mounted `save` through `dir(cls)` and raises
`TypeError: Attribute 'save' is missing its type annotation`. Which one is imported first then decides
whether judging and streaming work. `make_anyio_tolerate_mounts()` removes that dependence on order:
it imports anyio with the mount lifted (if nnsight is already in), and teaches anyio's check that public
names living on `object` itself are mounts, not attributes of the set. It runs when this module is imported,
which the package's `__init__` does first.
"""

import importlib.util
import sys


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

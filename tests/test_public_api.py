"""The public surface: every name in __all__ imports, and importing patches nothing of ours."""

import ast
import importlib
from pathlib import Path

import latent_merge_nnsight as lmn

PACKAGE = Path(lmn.__file__).parent


def test_every_public_name_is_importable():
    for name in lmn.__all__:
        assert getattr(lmn, name) is not None, name


def test_submodules_import_without_cycles():
    for mod in (
        "ops",
        "sites",
        "positions",
        "metrics",
        "errors",
        "inputs",
        "models",
        "residuals",
        "lockstep",
        "merge",
        "recipe",
        "deltas",
    ):
        importlib.import_module(f"latent_merge_nnsight.{mod}")


def test_bottom_modules_import_nothing_of_the_package_but_errors():
    import ast
    from pathlib import Path

    root = Path(lmn.__file__).parent
    for mod in ("ops", "sites", "positions", "metrics"):
        tree = ast.parse((root / f"{mod}.py").read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("latent_merge_nnsight")
            ):
                assert node.module == "latent_merge_nnsight.errors", (mod, node.module)


def test_no_public_name_is_also_a_submodule_so_the_attribute_is_always_the_public_object():
    """`lmn.capture` and `lmn.pair` are functions; were a submodule named so, importing it would rebind the
    package attribute to the module (Python sets it on import) and `lmn.capture(...)` would fail."""
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(lmn.__path__)}
    assert {"residuals", "lockstep", "metrics", "ops"} <= submodules
    assert set(lmn.__all__) & submodules == set()
    assert lmn.capture.__module__ == "latent_merge_nnsight.residuals" and callable(lmn.capture)
    assert lmn.pair.__module__ == "latent_merge_nnsight.lockstep" and callable(lmn.pair)
    assert type(lmn) is type(ast)  # a plain module: no class swapped in to guard an attribute


def test_errors_are_value_errors():
    assert issubclass(lmn.LatentMergeError, ValueError)


def _module_imports(path: Path, everywhere: bool = False) -> list[tuple[str, list[str]]]:
    """(module, names) of each import a module runs when it is imported: the top level, its `try`/`if`
    blocks (not `if TYPE_CHECKING`), never the bodies of functions or classes. `everywhere=True`: every
    import statement in the file (lazy imports in functions and `if TYPE_CHECKING` too)."""
    found: list[tuple[str, list[str]]] = []
    tree = ast.parse(path.read_text())
    todo = list(ast.walk(tree)) if everywhere else list(tree.body)
    while todo:
        node = todo.pop()
        if everywhere and isinstance(node, (ast.If, ast.Try)):
            continue  # ast.walk already lists the statements inside
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body]
    return found


def _import_graph(everywhere: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports (`from pkg.a import b` counts `pkg.a.b` if b is a module);
    `everywhere`: lazy and TYPE_CHECKING imports count too."""
    files = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        for target, names in _module_imports(f, everywhere):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in files]
            for t in subs + ([target] if len(subs) < len(names) or not names else []):
                if t in files and t != mod:
                    graph[mod].add(t)
    return graph


def test_the_package_has_no_import_cycle():
    graph = _import_graph()
    assert {"latent_merge_nnsight.plan", "latent_merge_nnsight.generation.fast"} <= graph.keys()
    assert "latent_merge_nnsight.plan" in graph["latent_merge_nnsight.generation.fast"]
    state: dict[str, str] = {}  # grey while on the current path, black when done

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = "grey"
        for t in sorted(graph[mod]):
            assert state.get(t) != "grey", "import cycle: " + " -> ".join([*path[path.index(t) :], t])
            if t not in state:
                visit(t, [*path, t])
        state[mod] = "black"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(mod: str) -> None:
        index[mod] = low[mod] = len(index)
        stack.append(mod)
        for t in graph[mod]:
            if t not in index:
                visit(t)
                low[mod] = min(low[mod], low[t])
            elif t in stack:
                low[mod] = min(low[mod], index[t])
        if low[mod] == index[mod]:
            group = []
            while True:
                t = stack.pop()
                group.append(t)
                if t == mod:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for mod in sorted(graph):
        if mod not in index:
            visit(mod)
    return circles


def test_the_circle_count_finds_a_circle_it_is_shown():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_even_through_lazy_and_type_checking_imports():
    graph = _import_graph(everywhere=True)
    # lazy imports are in this graph: generate() reaches the vLLM executor only inside a function
    run, vllm_run = "latent_merge_nnsight.generation.run", "latent_merge_nnsight.vllm_engine.run"
    assert vllm_run in graph[run] and vllm_run not in _import_graph()[run]
    assert _circles(graph) == []


# The package's floors, bottom first: a module may import its own floor and those below it. A module
# belongs to the floor of the longest prefix that names it (`zoo` is the registry of shipped checkpoints,
# a noun; `zoo.train`, which trains them on the toy tasks, is a tool on the floor of the applications).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ground", ("errors", "nouns", "net", "_nnsight", "jsonl", "ops", "sites", "positions", "metrics",
                "sampling_rules", "sampling", "zoo", "zoo.tokenizer", "baselines.regmean_math")),
    ("models", ("inputs", "models", "residuals", "deltas", "ensemble", "recipe", "request_recipe",
                "baselines")),
    ("plan", ("plan", "merge")),
    ("generation", ("generation", "lockstep", "vllm_engine")),
    ("systems", ("systems",)),
    ("evaluation", ("evaluation",)),
    ("analysis", ("analysis",)),
    ("applications", ("demo", "serve", "zoo.train")),
    ("cli", ("cli",)),
    ("package", ("",)),  # latent_merge_nnsight/__init__: the public names, resolved lazily
)  # fmt: skip
MAX_ARROWS_UP = 4


def _floor(module: str, layers=LAYERS) -> int:
    """The index in `layers` of the floor `module` (a dotted name under the package) belongs to."""
    rel = module.removeprefix(PACKAGE.name).removeprefix(".")
    best = (-1, -1)  # (floor, length of the prefix that placed it)
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            if (rel == p or (p and rel.startswith(p + "."))) and len(p) > best[1]:
                best = (i, len(p))
    return best[0]


def _arrows_up(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """Each import that goes from a lower floor to a higher one, as 'a (floor) -> b (floor)'."""
    name = {i: n for i, (n, _) in enumerate(layers)}
    return [
        f"{m} ({name[_floor(m, layers)]}) -> {t} ({name[_floor(t, layers)]})"
        for m in sorted(graph)
        for t in sorted(graph[m])
        if _floor(t, layers) > _floor(m, layers)
    ]


def test_the_arrow_count_finds_an_arrow_up_it_is_shown():
    layers = (("low", ("a",)), ("high", ("b", "a.tool")))
    graph = {"latent_merge_nnsight.a": {"latent_merge_nnsight.b"}, "latent_merge_nnsight.b": set()}
    assert _arrows_up(graph, layers) == ["latent_merge_nnsight.a (low) -> latent_merge_nnsight.b (high)"]
    graph = {"latent_merge_nnsight.b": {"latent_merge_nnsight.a"}, "latent_merge_nnsight.a.tool": set()}
    assert _arrows_up(graph, layers) == []
    assert _floor("latent_merge_nnsight.a.tool", layers) == 1
    assert _floor("latent_merge_nnsight.a.x", layers) == 0 and _floor("latent_merge_nnsight.c", layers) == -1


def test_imports_point_down_the_declared_floors():
    """Every module sits on a declared floor, and at most MAX_ARROWS_UP imports (lazy and TYPE_CHECKING
    ones included) go up from a lower floor to a higher one."""
    graph = _import_graph(everywhere=True)
    prefixes = [p for _, ps in LAYERS for p in ps]
    assert len(prefixes) == len(set(prefixes)), "a prefix is declared on two floors"
    rel = {m.removeprefix(PACKAGE.name).removeprefix(".") for m in graph}
    for p in prefixes:
        assert any(r == p or r.startswith(p + ".") for r in rel), f"no module is named by {p!r}"
    assert [m for m in sorted(graph) if _floor(m) == -1] == [], "modules on no declared floor (add to LAYERS)"
    arrows = _arrows_up(graph)
    assert len(arrows) <= MAX_ARROWS_UP, f"{len(arrows)} imports go up a floor:\n" + "\n".join(arrows)


MAX_LINES = 600
MAX_BARE_ANY = 0.08


def _annotated_parameters(tree: ast.AST) -> list[ast.arg]:
    params = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            every = [*a.posonlyargs, *a.args, *a.kwonlyargs, *(x for x in (a.vararg, a.kwarg) if x)]
            params += [p for p in every if p.annotation is not None]
    return params


def _bare_any_share(sources: dict[str, str]) -> tuple[int, int]:
    """(parameters annotated with a bare `Any`, annotated parameters) over the given module sources."""
    params = [p for text in sources.values() for p in _annotated_parameters(ast.parse(text))]
    return sum(ast.unparse(p.annotation) == "Any" for p in params), len(params)


def test_the_any_count_counts_only_bare_any_parameters():
    text = "def f(a: Any, b: list[Any], c, *d: Any, e: int = 1, **k: Any) -> Any: ..."
    assert _bare_any_share({"m": text}) == (3, 5)


def test_signatures_name_their_types_and_files_stay_small():
    """The house rules of issue 22: bare `Any` on at most 8% of annotated parameters (the nouns have
    aliases: `Model`, `Sources`, `Prompts`, `RecipeLike`, ...), and no module over 600 lines."""
    sources = {str(p.relative_to(PACKAGE)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}
    long = {name: n for name, text in sources.items() if (n := len(text.splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"
    bare, total = _bare_any_share(sources)
    assert bare <= MAX_BARE_ANY * total, f"bare Any on {bare} of {total} annotated parameters"

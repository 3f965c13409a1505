"""The public surface: every name in __all__ imports, and importing patches nothing of ours."""

import importlib

import latent_merge_nnsight as lmn


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
        "capture",
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


def test_errors_are_value_errors():
    assert issubclass(lmn.LatentMergeError, ValueError)

"""Recipe: the three layer/alpha forms, exact YAML/JSON round trips, and errors that name the field."""

import numpy as np
import pytest
from pydantic import ValidationError

import latent_merge_nnsight as lmn
from latent_merge_nnsight import LatentMergeError, Recipe


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe(op="slerp", layers={20: 0.5}),
        Recipe(op="lerp", layers=[18, 20], alpha=0.3, positions="all", site="post", name="x"),
        Recipe(op="regmean", layers=[4], lam=1.0, weights=[1, 2], sources=["a", "b"]),
        Recipe(op="slerp", layers="all", alpha=[0.0, 0.5, 1.0]),
        Recipe(op="delta", layers=[3], alpha=4.0, deltas="d.safetensors", positions=[0, -1]),
    ],
)
def test_yaml_and_json_round_trip_exactly(recipe, tmp_path):
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_json(recipe.to_json()) == recipe
    for suffix in (".yaml", ".json"):
        recipe.save(tmp_path / f"r{suffix}")
        assert Recipe.from_file(tmp_path / f"r{suffix}") == recipe


def test_lambda_is_spelled_lambda_in_files():
    r = Recipe(op="regmean", layers=[2], lam=0.5)
    assert "lambda: 0.5" in r.to_yaml()
    assert Recipe.from_yaml("op: regmean\nlayers: [2]\nlambda: 0.5\n") == r


def test_layer_alphas_three_forms():
    assert Recipe(layers={3: 0.2, 1: 0.4}).layer_alphas(6) == {1: 0.4, 3: 0.2}
    assert Recipe(layers=[1, 3], alpha=0.7).layer_alphas(6) == {1: 0.7, 3: 0.7}
    # mergekit-style gradient over relative depth: layer i of n sits at i/(n-1)
    got = Recipe(layers="all", alpha=[0.0, 0.5, 1.0]).layer_alphas(5)
    depth = np.array([0, 0.25, 0.5, 0.75, 1.0])
    expected = np.where(depth <= 0.5, depth, 0.5 + (depth - 0.5))  # piecewise 0->0.5->1, slope 1 both sides
    assert list(got) == [0, 1, 2, 3, 4]
    assert np.allclose(list(got.values()), expected)
    got = Recipe(layers=[0, 9], alpha=[0.2, 0.6]).layer_alphas(10)
    assert got == pytest.approx({0: 0.2, 9: 0.6})
    assert Recipe(op="regmean", layers=[2], lam=1.0).layer_alphas(4) == {2: None}


def test_unknown_op_names_the_field():
    with pytest.raises(ValidationError) as e:
        Recipe.from_yaml("op: slrep\nlayers: {2: 0.5}\n")
    err = e.value.errors()[0]
    assert err["loc"] == ("op",)
    assert "unknown op 'slrep'; expected one of" in err["msg"]


def test_layer_out_of_range_names_the_field():
    r = Recipe.from_yaml("op: slerp\nlayers: {40: 0.5}\n")
    with pytest.raises(LatentMergeError, match=r"recipe field 'layers': \[40\] out of range .* 28 layers"):
        r.layer_alphas(28)
    with pytest.raises(ValidationError) as e:
        Recipe.from_yaml("op: slerp\nlayers: [-1]\nalpha: 0.5\n")
    assert e.value.errors()[0]["loc"][0] == "layers"


@pytest.mark.parametrize(
    "data, message",
    [
        (dict(op="slerp", layers={2: 1.5}), r"layers\[2\]=1.5 is outside \[0, 1\]"),
        (dict(op="slerp", layers=[2]), "alpha is required"),
        (dict(op="slerp", layers={2: 0.5}, alpha=0.5), "not both"),
        (dict(op="regmean", layers=[2], alpha=0.5, **{"lambda": 1.0}), "not both"),
        (dict(op="lerp", layers=[2], alpha=0.5, **{"lambda": 1.0}), "lambda applies to regmean"),
        (dict(op="slerp", layers=[2], alpha=0.5, weights=[1.0]), "weights apply to multi-source ops"),
        (dict(op="slerp", layers=[], alpha=0.5), "layers is empty"),
        (dict(op="slerp", layers=[2], alpha=0.5, color="red"), "Extra inputs are not permitted"),
    ],
)
def test_invalid_recipes(data, message):
    with pytest.raises(ValidationError, match=message):
        Recipe.model_validate(data)


def test_extrapolation_flag_and_steering_strength():
    assert Recipe(op="lerp", layers={1: 1.5}, allow_extrapolation=True).layer_alphas(3) == {1: 1.5}
    assert Recipe(op="delta", layers={1: 8.0}).layer_alphas(3) == {1: 8.0}


def test_recipe_prints_compactly():
    text = str(lmn.Recipe(op="slerp", layers={20: 0.5}))
    assert text == "Recipe(op='slerp', layers={20: 0.5}, site='pre', positions='last')"


def test_a_relative_deltas_file_is_read_next_to_the_recipe_file(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "d.safetensors").write_bytes(b"")
    (folder / "r.yaml").write_text("op: delta\nlayers: {1: 1.0}\ndeltas: d.safetensors\n")
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    assert Recipe.from_file(folder / "r.yaml").deltas == str(folder / "d.safetensors")
    assert Recipe.from_yaml((folder / "r.yaml").read_text()).deltas == "d.safetensors"  # no file: as written

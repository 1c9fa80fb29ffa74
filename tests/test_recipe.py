
"""The one parameter schema as the Prefect API and UI see it, and partial parameter files."""

from __future__ import annotations

import pytest
import yaml

from modelpress.methods import REGISTRY
from modelpress.recipe import Recipe

from helpers import REPO, run_cli

pytestmark = pytest.mark.unit


def _flow_schema() -> dict:
    """The compression flow's parameter schema, as a deployment stores it."""
    from prefect.utilities.callables import parameter_schema

    from modelpress.flows.compress import compress_flow

    return parameter_schema(compress_flow.fn).model_dump_for_openapi()


def _api_error(params: dict) -> str:
    """What the Prefect API answers for these parameters (its own validator), '' if valid."""
    from prefect.utilities.schema_tools.validation import validate

    try:
        validate(params, _flow_schema(), raise_on_error=True, preprocess=True, ignore_required=True,
                 allow_none_with_default=True)
    except Exception as e:  # noqa: BLE001 - prefect's ValidationError
        return str(e)
    return ""


def test_method_is_a_choice_discriminated_by_name():
    method = _flow_schema()["definitions"]["Recipe"]["properties"]["method"]
    assert method["discriminator"]["propertyName"] == "name"
    # every registered method, and only those, is a choice of the UI form
    assert set(method["discriminator"]["mapping"]) == set(REGISTRY) >= {"pq", "prune", "prune_pq", "kmeans", "uniform"}
    assert len(method["oneOf"]) == len(REGISTRY)


def test_api_names_a_bad_field_inside_the_method():
    params = {"recipe": Recipe().model_dump(mode="json")}
    assert _api_error(params) == ""
    params["recipe"]["method"]["kmeans_itres"] = 3  # a typo
    err = _api_error(params)
    assert "recipe.method" in err and "'kmeans_itres' was unexpected" in err, err
    # The CLI and the flow (pydantic) name it too, with the user's path.
    assert "method.kmeans_itres" in str(_recipe_error({"method": {"name": "pq", "kmeans_itres": 3}}))


def _recipe_error(raw: dict) -> Exception:
    try:
        Recipe.parse(raw)
    except ValueError as e:
        return e
    raise AssertionError("accepted")


def test_method_without_name_is_pq():
    assert Recipe.parse({"method": {"kmeans_iters": 4}}).method.name == "pq"


def test_partial_params_file_merges_onto_params_yaml(tmp_path):
    base = Recipe.from_yaml(REPO / "params.yaml")
    partial = tmp_path / "nightly.yaml"
    partial.write_text(yaml.safe_dump({"method": {"kmeans_iters": 4}, "finetune": {"epochs": 2}}))
    merged = Recipe.from_yaml(partial, base=REPO / "params.yaml")
    assert merged.method.kmeans_iters == 4 and merged.finetune.epochs == 2
    assert merged.model_copy(update={"method": base.method, "finetune": base.finetune}) == base
    assert merged.method.model_copy(update={"kmeans_iters": base.method.kmeans_iters}) == base.method
    # Another method replaces the method section; a mapping value (data.files) is taken whole.
    other = tmp_path / "other.yaml"
    npz = {"cifar10-train.npz": "ab" * 32, "cifar10-test.npz": "cd" * 32}
    other.write_text(yaml.safe_dump({"method": {"name": "uniform", "bits": 4}, "data": {"name": "cifar10", "files": npz}}))
    merged = Recipe.from_yaml(other, base=REPO / "params.yaml")
    assert merged.method.name == "uniform" and merged.method.bits == 4
    assert merged.data.files == npz and merged.data.sources == base.data.sources
    # A method section without a name sets fields of the base's method, whatever that method is.
    prune_base, nightly = tmp_path / "prune.yaml", tmp_path / "deeper.yaml"
    prune_base.write_text(yaml.safe_dump({"method": {"name": "prune", "target_sparsity": 0.9}}))
    nightly.write_text(yaml.safe_dump({"method": {"target_sparsity": 0.95}}))
    merged = Recipe.from_yaml(nightly, base=prune_base)
    assert merged.method.name == "prune" and merged.method.target_sparsity == 0.95


@pytest.mark.pipeline
def test_cli_merges_a_partial_params_file(tmp_path):
    partial = tmp_path / "p.yaml"
    partial.write_text(yaml.safe_dump({"method": {"name": "pq", "kmeans_itres": 3}}))
    out = run_cli("run", "--params", str(partial))
    assert out.returncode == 1 and "method.kmeans_itres: Extra inputs are not permitted" in out.stderr


def test_overrides_reach_names_that_hold_dots(tmp_path):
    """-S and a sweep point's `set` address entries of the mappings keyed by names (data.files,
    method.overrides) by the whole name, dots included."""
    sha = "ab" * 32
    r = Recipe().with_overrides({"data.files.train-images-idx3-ubyte.gz": sha})
    assert r.data.files["train-images-idx3-ubyte.gz"] == sha and len(r.data.files) == 4
    r = Recipe().with_overrides({"method.overrides.layer1.0.conv1": {"block_size": 4, "k": 16}})
    assert r.method.overrides["layer1.0.conv1"].k == 16
    r = r.with_overrides({"method.overrides.layer1.0.conv1.k": 32})  # a field of an entry that is there
    assert (r.method.overrides["layer1.0.conv1"].block_size, r.method.overrides["layer1.0.conv1"].k) == (4, 32)
    assert list(r.method.overrides) == ["layer1.0.conv1"]
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"teacher": {"arch": "cifar_vit", "arch_kwargs": None}}))
    r = Recipe.from_yaml(params, ["teacher.arch_kwargs.num_layers=2", "method.overrides.encoder.layers.0.mlp.0={block_size: 4, k: 8}"])
    assert r.teacher.arch_kwargs == {"num_layers": 2} and r.method.overrides["encoder.layers.0.mlp.0"].k == 8


def test_the_checkouts_parameters_while_a_run_versions_and_after_one_was_killed(tmp_path):
    """A run's DVC versioning puts its own parameters in params.yaml for the time of `dvc commit`
    and `dvc push`: meanwhile, and after a run killed there, the pipeline's commands read the
    checkout's own parameters."""
    from modelpress.tasks.versioning import checkout_params, params_as

    (tmp_path / ".dvc").mkdir()
    own = yaml.safe_dump({"run": {"name": "own"}})
    (tmp_path / "params.yaml").write_text(own)
    with params_as(Recipe.parse({"run": {"name": "versioned"}}), tmp_path):
        assert Recipe.from_yaml(tmp_path / "params.yaml").run.name == "versioned"
        assert checkout_params(tmp_path).read_text() == own  # the copy the versioning keeps
    assert checkout_params(tmp_path) == tmp_path / "params.yaml" and (tmp_path / "params.yaml").read_text() == own
    # Killed inside: the copy is left, and no one holds the lock.
    (tmp_path / ".dvc" / "tmp" / "modelpress-params.yaml.orig").write_text(own)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"run": {"name": "killed"}}))
    assert checkout_params(tmp_path) == tmp_path / "params.yaml" and (tmp_path / "params.yaml").read_text() == own
    assert not (tmp_path / ".dvc" / "tmp" / "modelpress-params.yaml.orig").exists()


def test_the_readmes_run_examples_are_valid_on_the_checkouts_params():
    """Every `modelpress run -S ...` line of the README passes the checks a run makes before any
    work, on the params.yaml a newcomer has (a layer name of another architecture would not)."""
    import re
    import shlex

    from modelpress.stages import preflight

    lines = [m.group(1) for m in re.finditer(r"^modelpress run (.*?)(?:\s+#.*)?$", (REPO / "README.md").read_text(), re.M)]
    assert len(lines) >= 3
    for line in lines:
        args = shlex.split(line)
        sets = [a for flag, a in zip(args, args[1:]) if flag in ("-S", "--set")]
        assert sets, line
        preflight(Recipe.from_yaml(REPO / "params.yaml", sets))

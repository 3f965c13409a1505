"""Installing the package leaves vLLM working for every model under Model Runner V2, and our model's
logits processor loads, checks requests and leaves logits alone under both runners (vLLM's own loaders)."""

import importlib.metadata as md
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.input_processor import InputProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, build_custom_logits_processors
from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_plugins

from latent_merge_nnsight.vllm_engine.mix_op import LatentMergeConfig
from latent_merge_nnsight.vllm_engine.requests import FRONT, PROCESSOR

GROUP = "vllm.logits_processors"
BAD = {"latent_merge": {"alpha": "half"}}


def params(extra=None) -> SamplingParams:
    return SamplingParams(max_tokens=4, extra_args=extra)


def model_config(logits_processors=None, hf_config=None):
    return SimpleNamespace(
        logits_processors=logits_processors, runner_type="generate", hf_config=hf_config, model="m"
    )


def front_door(mc, *, v2: bool):
    """vLLM's own choice of the per-request validator (`InputProcessor.__init__` runs this)."""
    fake = SimpleNamespace(vllm_config=SimpleNamespace(use_v2_model_runner=v2), model_config=mc)
    return InputProcessor._build_logits_processors_params_validator(fake)


def ours_configured(export_dir, listed=None):
    """Our model's config after its config hook, as `VllmConfig.__post_init__` runs it."""
    from vllm.config import CompilationConfig

    mc = model_config(listed, AutoConfig.from_pretrained(export_dir))
    vllm_config = SimpleNamespace(model_config=mc, compilation_config=CompilationConfig())
    LatentMergeConfig.verify_and_update_config(vllm_config)
    return vllm_config


def test_the_installed_package_declares_no_logits_processor_plugin():
    dist = md.distribution("latent_merge_nnsight")  # installed (its entry points are what vLLM reads)
    groups = {e.group for e in dist.entry_points}
    assert "vllm.general_plugins" in groups
    assert GROUP not in groups


def test_v2_loader_loads_every_installed_plugin():
    loaded = _load_v2_logitsprocs_plugins()  # raised ValueError with the old V1 entry point installed
    assert all(c.__module__.split(".")[0] != "latent_merge_nnsight" for c in loaded)


def _fake_plugin(root, target):
    info = root / "lmn_fake_plugin-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lmn-fake-plugin\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\nfake = {target}\n")


def test_v2_loader_refuses_a_v1_only_plugin_and_accepts_ours(tmp_path, monkeypatch):
    """The check our first test relies on is live: vLLM 0.33 refuses a V1-only plugin (what our package
    installed before); our class, were it installed as a plugin, passes V2's loader."""
    v1_only = tmp_path / "v1"
    _fake_plugin(v1_only.mkdir() or v1_only, "vllm.v1.sample.logits_processor.builtin:MinPLogitsProcessor")
    monkeypatch.syspath_prepend(str(v1_only))
    with pytest.raises(ValueError, match="V1-interface plugins are not supported"):
        _load_v2_logitsprocs_plugins()
    monkeypatch.undo()
    both = tmp_path / "both"
    _fake_plugin(both.mkdir() or both, PROCESSOR)
    monkeypatch.syspath_prepend(str(both))
    assert [c.__name__ for c in _load_v2_logitsprocs_plugins()] == ["LatentMergeRequests"]


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])
def test_a_plain_model_accepts_requests_under_either_runner(v2):
    check = front_door(model_config(), v2=v2)
    check(params())
    check(params({"other_plugin": 1}))


def test_the_config_hook_lists_our_processor_once_beside_the_users(export_dir):
    vllm_config = ours_configured(export_dir, ["user.module:Proc"])
    assert vllm_config.model_config.logits_processors == ["user.module:Proc", PROCESSOR]
    LatentMergeConfig.verify_and_update_config(vllm_config)  # each process may run the hook again
    assert vllm_config.model_config.logits_processors == ["user.module:Proc", PROCESSOR]
    assert FRONT["export"].layers == [2, 3]


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])
def test_our_front_door_refuses_a_bad_recipe_and_accepts_good_ones(export_dir, v2):
    check = front_door(ours_configured(export_dir).model_config, v2=v2)
    check(params())
    check(params({"latent_merge": {"alpha": 0.3}}))
    check(params({"latent_merge": '{"layers": {"3": 1.0}}'}))
    with pytest.raises(VLLMValidationError, match=r"latent_merge\.alpha"):
        check(params(BAD))
    with pytest.raises(VLLMValidationError, match=r"not exported"):
        check(params({"latent_merge": {"layers": {"7": 0.5}}}))


def test_v2_worker_builds_our_processor_which_leaves_logits_alone(export_dir):
    vllm_config = ours_configured(export_dir)
    req_states = SimpleNamespace(  # what `LogitsProcRequestState.from_request_state` reads
        device=torch.device("cpu"), max_num_reqs=4, vocab_size=8,
        all_token_ids=None, prompt_len=None, prefill_len=None, total_len=None,
    )  # fmt: skip
    procs = build_custom_logits_processors(
        vllm_config, req_states, False, vllm_config.model_config.logits_processors
    )
    assert [type(p).__name__ for p in procs] == ["LatentMergeRequests"]
    (proc,) = procs
    assert proc.add_request(2, params({"latent_merge": {"alpha": 0.3}})) is False
    proc.apply_staged_writes()
    logits = torch.randn(3, 8)
    before = logits.clone()
    mapping = torch.tensor([2, 0, 1])
    ctx = LogitsContext(
        expanded_idx_mapping=mapping, idx_mapping=mapping, idx_mapping_np=mapping.numpy(),
        expanded_local_pos=torch.zeros(3, dtype=torch.long), input_ids=torch.tensor([5, 6, 7]),
        pos=torch.tensor([9, 4, 6]), seq_lens_upper_bound_np=mapping.numpy() + 10,
    )  # fmt: skip
    assert torch.equal(proc.apply(logits, ctx), before)


def test_v1_loader_loads_our_processor_and_the_v1_runner_builds_it(export_dir):
    from vllm.v1.sample.logits_processor import LogitsProcessor, _load_custom_logitsprocs

    vllm_config = ours_configured(export_dir)
    classes = _load_custom_logitsprocs(vllm_config.model_config.logits_processors)  # plugins + listed
    ours = [c for c in classes if c.__name__ == "LatentMergeRequests"]
    assert len(ours) == 1 and issubclass(ours[0], LogitsProcessor)
    proc = ours[0](vllm_config, torch.device("cpu"), False)  # as the V1 runner's build_logitsprocs does
    assert proc.is_argmax_invariant()
    logits = torch.randn(2, 8)
    assert torch.equal(proc.apply(logits.clone()), logits)

"""The CUDA-graph modes the merged model runs under: its config hook keeps the mix out of captured graphs
(piecewise graphs split at the mix), and the model refuses a mode that would capture it."""

from types import SimpleNamespace

import pytest
from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.vllm_engine.mix_op import OP, LatentMergeConfig
from latent_merge_nnsight.vllm_engine.model import _check_graphs
from latent_merge_nnsight.vllm_engine.requests import PROCESSOR


def hooked(mode, graphs) -> CompilationConfig:
    cc = CompilationConfig()
    cc.mode, cc.cudagraph_mode = mode, graphs
    model_config = SimpleNamespace(logits_processors=None)
    LatentMergeConfig.verify_and_update_config(
        SimpleNamespace(compilation_config=cc, model_config=model_config)
    )
    assert model_config.logits_processors == [PROCESSOR]  # the hook also lists the model's own processor
    return cc


@pytest.mark.parametrize(
    "graphs", [None, CUDAGraphMode.FULL, CUDAGraphMode.FULL_DECODE_ONLY, CUDAGraphMode.FULL_AND_PIECEWISE]
)
def test_the_hook_turns_full_graphs_piecewise(graphs):
    for mode in (None, CompilationMode.VLLM_COMPILE):
        assert hooked(mode, graphs).cudagraph_mode == CUDAGraphMode.PIECEWISE


def test_the_hook_keeps_no_graphs_and_eager_modes():
    assert hooked(None, CUDAGraphMode.NONE).cudagraph_mode == CUDAGraphMode.NONE
    assert hooked(CompilationMode.NONE, None).cudagraph_mode == CUDAGraphMode.NONE


def check(mode, graphs, splitting=None) -> CompilationConfig:
    cc = CompilationConfig()
    cc.mode, cc.cudagraph_mode, cc.splitting_ops = mode, graphs, splitting
    _check_graphs(SimpleNamespace(compilation_config=cc))
    return cc


def test_piecewise_graphs_split_at_the_mix():
    attn = "vllm::unified_attention_with_output"
    cc = check(CompilationMode.VLLM_COMPILE, CUDAGraphMode.PIECEWISE, [attn])
    assert cc.splitting_ops == [attn, OP]
    assert check(CompilationMode.VLLM_COMPILE, CUDAGraphMode.PIECEWISE, [attn, OP]).splitting_ops == [
        attn,
        OP,
    ]
    assert check(CompilationMode.DYNAMO_TRACE_ONCE, CUDAGraphMode.NONE, []).splitting_ops == []


@pytest.mark.parametrize(
    "mode, graphs",
    [
        (CompilationMode.VLLM_COMPILE, CUDAGraphMode.FULL),
        (CompilationMode.VLLM_COMPILE, CUDAGraphMode.FULL_AND_PIECEWISE),
        (CompilationMode.DYNAMO_TRACE_ONCE, CUDAGraphMode.PIECEWISE),
    ],
)
def test_graphs_that_would_capture_the_mix_are_refused(mode, graphs):
    with pytest.raises(LatentMergeError, match=f"cudagraph_mode={graphs.name}"):
        check(mode, graphs, [])

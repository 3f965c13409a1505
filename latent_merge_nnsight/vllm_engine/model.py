"""`LatentMergeForCausalLM`: a latent merge as one vLLM model.

It holds the base's whole decoder (`base.*`) and, for each source, its embedding and its blocks below
the highest merged layer (`src{j}.*`; never its upper blocks, norm or head), all built from vLLM's own
decoder-layer classes for the family. Every attention layer has its own prefix and layer index, so vLLM
allocates and pages a KV cache for each, for the base and the sources alike.

A forward runs, for each layer i: the mix at (i, "pre"), base block i, each source's block i (below its
depth), the mix at (i, "post"); then the base's final norm. vLLM's blocks pass the residual as
`(hidden, residual)` pairs, so a mix first adds them up (the residual stream itself, as in HF), mixes
through `Plan.apply` (the one mixing call of every engine) and hands the base's next block `(mixed, None)`.

vLLM compiles the forward (`@support_torch_compile`, as its own Qwen2Model): each mix is one call of the
custom op `vllm::latent_merge_mix` (`mix_op.py`), opaque to dynamo and a splitting op of piecewise CUDA
graphs, so the graph traced once holds nothing of any batch. The op runs eagerly every forward; the first
merged site of a forward builds its per-token tensors (`_mix`), the others reuse them (`mix_now`).

Which tokens mix, and with which alpha: vLLM's token batch is the requests' scheduled tokens back to back
(`query_start_loc` gives the boundaries), in persistent-batch order under the V1 runner and in each step's
order under Model Runner V2 (`runner_v2.py` hands over its position -> slot map). `requests.TABLE` gives
each request's prompt length and recipe, so each token gets its alpha per layer as a tensor. Positions
"last" select the tokens at or after a request's last prompt token (its position `prompt_len - 1`, then
every generated token), which holds whatever chunk of the prompt this step runs and whatever a
prefix-cache hit skipped; a request's `merge_from` moves that first merged position (prompt logprobs
scored as generation merges).
"""

import dataclasses
import glob
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from vllm.compilation.decorators import support_torch_compile

from latent_merge_nnsight.errors import LatentMergeError
from latent_merge_nnsight.ops import get_op
from latent_merge_nnsight.plan import Plan, load_recipe_deltas, recipe_plan
from latent_merge_nnsight.vllm_engine import SUPPORTED_FAMILIES
from latent_merge_nnsight.vllm_engine.export import Export, read_export
from latent_merge_nnsight.vllm_engine.mix_op import MODELS, OP, register_mix_op
from latent_merge_nnsight.vllm_engine.requests import TABLE

if TYPE_CHECKING:
    from transformers import PretrainedConfig
    from vllm.config import VllmConfig
    from vllm.sequence import IntermediateTensors

__all__ = ["LatentMergeForCausalLM"]

register_mix_op()

_STACKED = (  # HF weight name part -> (vLLM fused parameter part, shard)
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)


def _decoder_layer(
    family: str, config: "PretrainedConfig", vllm_config: "VllmConfig", prefix: str
) -> nn.Module:
    """vLLM's own decoder block of `family`."""
    if family == "qwen2":
        from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer as Layer
    elif family == "qwen3":
        from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer as Layer
    elif family == "llama":
        from vllm.model_executor.models.llama import LlamaDecoderLayer

        return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix, config=config)
    elif family == "mistral":
        from vllm.model_executor.models.mistral import MistralDecoderLayer

        return MistralDecoderLayer(vllm_config=vllm_config, prefix=prefix, config=config)
    else:
        raise LatentMergeError(
            f"model_type={family!r} is not supported by the vLLM engine; supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}"
        )
    return Layer(
        config=config,
        cache_config=vllm_config.cache_config,
        quant_config=vllm_config.quant_config,
        prefix=prefix,
    )


class _Stack(nn.Module):
    """One model's embedding, some of its blocks (keyed by their global layer index) and maybe its norm."""

    def __init__(
        self,
        name: str,
        config: "PretrainedConfig",
        vllm_config: "VllmConfig",
        blocks: int,
        offset: int,
        with_norm: bool,
    ) -> None:
        super().__init__()
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        self.name, self.blocks, self.offset = name, blocks, offset
        quant = vllm_config.quant_config
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, quant_config=quant, prefix=f"{name}.embed_tokens"
        )
        self.layers = nn.ModuleDict(
            {
                str(offset + i): _decoder_layer(
                    config.model_type, config, vllm_config, f"{name}.layers.{offset + i}"
                )
                for i in range(blocks)
            }
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if with_norm else None

    def block(self, i: int) -> nn.Module:
        return self.layers[str(self.offset + i)]


class _Mix:
    """This forward's mixing: one plan per op present in the batch, with per-token alphas and positions."""

    def __init__(self, plans: list[tuple[Plan, Tensor]]) -> None:
        self.plans = plans

    def __call__(self, layer: int, site: str, hb: Tensor, hs: list[Tensor]) -> Tensor:
        out = hb[None]
        srcs = [h[None] for h in hs]
        for plan, select in self.plans:
            out = plan.apply(layer, site, out, srcs, select[None])
        return out[0]


def _check_graphs(vllm_config: "VllmConfig") -> None:
    """Refuse a CUDA-graph setup that would capture the mix (the config hook picks a safe one by
    default); add the mix to the ops piecewise graphs split at."""
    from vllm.config import CompilationMode, CUDAGraphMode

    cc = vllm_config.compilation_config
    if cc.mode == CompilationMode.VLLM_COMPILE and OP not in (cc.splitting_ops or []):
        cc.splitting_ops = [*(cc.splitting_ops or []), OP]
    graphs = cc.cudagraph_mode
    if graphs is None or graphs == CUDAGraphMode.NONE:
        return
    if graphs != CUDAGraphMode.PIECEWISE or cc.mode != CompilationMode.VLLM_COMPILE:
        raise LatentMergeError(
            f"the latent-merge vLLM model runs CUDA graphs only piecewise, split around its mix "
            f"(cudagraph_mode=PIECEWISE with compilation mode VLLM_COMPILE); got "
            f"cudagraph_mode={graphs.name}, mode={cc.mode.name if cc.mode is not None else None}: "
            "use those, or enforce_eager=True"
        )


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": 0,
        "positions": -1,
        "intermediate_tensors": 0,
        "inputs_embeds": 0,
    }
)
class LatentMergeForCausalLM(nn.Module):
    """The composite model an lmn vLLM export names (see the module docstring)."""

    def __init__(self, *, vllm_config: "VllmConfig", prefix: str = "") -> None:
        super().__init__()
        from transformers import AutoConfig
        from vllm.model_executor.layers.logits_processor import LogitsProcessor
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        config = vllm_config.model_config.hf_config.get_text_config()
        block = getattr(config, "latent_merge", None)
        if block is None:
            raise LatentMergeError("LatentMergeForCausalLM needs a config written by `lmn export vllm`")
        export = read_export(block)
        folder = vllm_config.model_config.model
        if export.recipe is not None and export.recipe.get("deltas"):
            path = export.recipe["deltas"]
            export.recipe = {
                **export.recipe,
                "deltas": path if os.path.isabs(path) else os.path.join(folder, path),
            }
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise LatentMergeError(
                "the latent-merge vLLM model runs without pipeline parallelism (use tensor parallel)"
            )
        _check_graphs(vllm_config)
        if vllm_config.speculative_config is not None:
            raise LatentMergeError("the latent-merge vLLM model does not support speculative decoding")
        self.export: Export = export
        self.config = config
        n = export.n_layers
        self.base = _Stack("base", config, vllm_config, n, 0, with_norm=True)
        self.sources: list[_Stack] = []  # registered as src0, src1, ... (their layers' prefixes)
        offset = n
        for j, path in enumerate(export.sources):
            cfg = AutoConfig.from_pretrained(path)
            stack = _Stack(f"src{j}", cfg, vllm_config, export.source_blocks, offset, False)
            self.add_module(f"src{j}", stack)
            self.sources.append(stack)
            offset += export.source_blocks
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config, prefix="lm_head"
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.base.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.plan = self._plan()
        self.attn_name = "base.layers.0.self_attn.attn"
        self.dtype = vllm_config.model_config.dtype
        self._deltas_on: torch.device | None = None
        self._forward: tuple[Any, _Mix | None] | None = None  # (forward context, its mix)
        self.mix_name = f"latent_merge_{id(self)}"
        MODELS[self.mix_name] = self

    # ------------------------------------------------------------------------------------------------
    # the plan

    def _plan(self) -> Plan | None:
        """The export's plan, its alphas as the plan resolved them (RegMean's lambda is its beta there),
        so each token can carry its own alpha."""
        recipe = self.export.recipe_obj()
        if recipe is None:
            return None
        plan = recipe_plan(recipe, self.export.n_layers)
        if plan.op.static_source:
            d = load_recipe_deltas(recipe)
            plan.deltas = {k: d.resid(k, recipe.site) for k in plan.alphas}
        return plan

    def mix_now(self, layer: int, site: str, hb: Tensor, hs: list[Tensor], positions: Tensor) -> Tensor:
        """The mix at (layer, site) of the running forward (the op's body; eager, never compiled)."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        ctx = get_forward_context() if is_forward_context_available() else None
        if ctx is None or self._forward is None or self._forward[0] is not ctx:
            # the first merged site of this forward: its per-token tensors, kept for the other sites
            self._forward = (ctx, self._mix(positions) if ctx is not None else None)
        mix = self._forward[1]
        return hb if mix is None else mix(layer, site, hb, hs)

    def _mix(self, positions: Tensor) -> _Mix | None:
        """Per-token alphas and positions of this forward (None: nothing mixes, e.g. vLLM's profiling run)."""
        plan = self.plan
        if plan is None or not TABLE.rows:
            return None
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return None
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):
            raise LatentMergeError("the latent-merge vLLM model does not support micro-batching (DBO)")
        if not metadata or self.attn_name not in metadata:
            return None
        md = metadata[self.attn_name]
        starts = md.query_start_loc
        n_reqs = starts.shape[0] - 1
        device = positions.device
        n_tok = positions.shape[0]
        layers = sorted(plan.alphas)
        exported = [plan.alphas[k] for k in layers]
        ops, first, op_id, alphas = _request_rows(n_reqs, plan.op.name, exported, plan.positions == "all")
        token = torch.arange(n_tok, device=device)
        req = torch.searchsorted(starts[1:].to(device), token, right=True).clamp(max=max(n_reqs - 1, 0))
        real = token < int(getattr(md, "num_actual_tokens", n_tok))
        where = real & (positions >= torch.tensor(first, device=device)[req])  # each request's first merged
        tok_op = torch.tensor(op_id, device=device)[req]
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        tok_alpha = torch.tensor(alphas, dtype=dtype, device=device)[req]  # [tokens, layers]
        deltas = plan.deltas
        if deltas is not None:
            if self._deltas_on != device:
                plan.deltas = {k: v.to(device) for k, v in deltas.items()}
                self._deltas_on = device
            deltas = plan.deltas
        plans = []
        for k, name in enumerate(ops):
            layer_alphas = {layer: tok_alpha[None, :, i] for i, layer in enumerate(layers)}
            op = get_op(name)
            params = plan.params if op.name == plan.op.name else {}
            step = dataclasses.replace(plan, op=op, alphas=layer_alphas, params=params, deltas=deltas)
            plans.append((step, where & (tok_op == k)))
        return _Mix(plans)

    # ------------------------------------------------------------------------------------------------
    # Model Runner V2: request slots

    @staticmethod
    def get_model_state_cls() -> type:
        """V2's model state for this model: it keeps `TABLE` by request slot and hands over each step's
        batch position -> slot map (`runner_v2.py`; the V1 runner never asks)."""
        from latent_merge_nnsight.vllm_engine.runner_v2 import LatentMergeModelState

        return LatentMergeModelState

    # ------------------------------------------------------------------------------------------------
    # vLLM's model interface

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.base.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        intermediate_tensors: "IntermediateTensors | None" = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: object,
    ) -> Tensor:
        if inputs_embeds is not None or input_ids is None:
            raise LatentMergeError(
                "the latent-merge vLLM model takes token ids (prompt embeddings are refused)"
            )
        plan = self.plan
        pre = set(plan.alphas) if plan is not None and plan.site == "pre" else set()
        post = set(plan.alphas) if plan is not None and plan.site == "post" else set()
        hb, rb = self.base.embed_tokens(input_ids), None
        hs: list[tuple[Tensor, Tensor | None]] = [(s.embed_tokens(input_ids), None) for s in self.sources]

        def mixed(layer: int, site: str) -> tuple[Tensor, None]:
            full = hb if rb is None else hb + rb
            srcs = [h if r is None else h + r for h, r in hs]
            # an opaque op: compiled code holds the call, the op reads this forward's batch
            out = torch.empty_like(full)  # in the piece before the op: a captured graph's own memory
            torch.ops.vllm.latent_merge_mix(full, srcs, positions, out, layer, site, self.mix_name)
            return out, None

        for i in range(self.export.n_layers):
            if i in pre:
                hb, rb = mixed(i, "pre")
            hb, rb = self.base.block(i)(positions, hb, rb)
            for j, s in enumerate(self.sources):
                if i < s.blocks:
                    hs[j] = s.block(i)(positions, *hs[j])
            if i in post:
                hb, rb = mixed(i, "post")
        if rb is None:
            return self.base.norm(hb)
        hb, _ = self.base.norm(hb, rb)
        return hb

    def compute_logits(self, hidden_states: Tensor) -> Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Read the base's and the sources' own weight files (vLLM hands the export's placeholder)."""
        for _ in weights:
            pass
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        n = self.export.n_layers
        self._load(self.export.base, self.base, n, params, loaded, head=True)
        for path, stack in zip(self.export.sources, self.sources, strict=True):
            self._load(path, stack, stack.blocks, params, loaded, head=False)
        return loaded

    def _load(
        self, folder: str, stack: _Stack, blocks: int, params: dict, loaded: set[str], head: bool
    ) -> None:
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise LatentMergeError(f"{folder} has no *.safetensors weights")
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no iterator
                    target = self._target(name, stack, blocks, head)
                    if target is None:
                        continue
                    tensor = f.get_tensor(name)
                    for hf_part, fused, shard in _STACKED:
                        if hf_part in target:
                            fused_name = target.replace(hf_part, fused)
                            param = params[fused_name]
                            param.weight_loader(param, tensor, shard)
                            loaded.add(fused_name)
                            break
                    else:
                        if target not in params:
                            continue  # e.g. a tied head
                        param = params[target]
                        getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                        loaded.add(target)

    def _target(self, name: str, stack: _Stack, blocks: int, head: bool) -> str | None:
        """This model's parameter for HF weight `name` of `stack`'s checkpoint (None: not needed)."""
        if "rotary_emb." in name:
            return None
        if name.startswith("lm_head."):
            return None if not head or self.config.tie_word_embeddings else name
        body = name.removeprefix("model.")
        if body.startswith("embed_tokens."):
            return f"{stack.name}.{body}"
        if body.startswith("norm."):
            return f"{stack.name}.{body}" if stack.norm is not None else None
        if body.startswith("layers."):
            _, index, rest = body.split(".", 2)
            if int(index) >= blocks:
                return None  # a source's upper blocks are never read
            return f"{stack.name}.layers.{stack.offset + int(index)}.{rest}"
        return None


def _request_rows(
    n_reqs: int, exported_op: str, exported: list[float], every: bool
) -> tuple[list[str], list[int], list[int], list[list[float]]]:
    """Per request of this step's batch (`TABLE.row`): (the ops in use, the export's first, then each
    request's first merged position, index into those ops and alphas per merged layer). The first merged
    position is the request's ``merge_from``, else 0 for positions "all" (``every``), else its last prompt
    token's (then every generated token)."""
    ops = [exported_op]
    first, op_id, alphas = [], [], []
    for r in range(n_reqs):
        row = TABLE.row(r)  # V1: row r of the persistent batch; V2: the slot of batch position r
        if row is None:
            first.append(2**62)  # a padding row: never mixed
            op_id.append(0)
            alphas.append(exported)
            continue
        start = row.recipe.merge_from if row.recipe is not None else None
        first.append(start if start is not None else 0 if every else row.prompt_len - 1)
        if row.recipe is None or not row.recipe.alphas:  # merge_from alone: the export's alphas
            op_id.append(0)
            alphas.append(exported)
        else:
            if row.recipe.op not in ops:
                ops.append(row.recipe.op)
            op_id.append(ops.index(row.recipe.op))
            alphas.append([a for _, a in row.recipe.alphas])
    return ops, first, op_id, alphas

"""Export a trained drafter in the checkpoint layouts vLLM and SGLang load.

Each layout is written so that the serving engine computes exactly what the selfspec drafter
computes (tests check this against a torch reference of each engine's forward):

``eagle`` -- EAGLE-1 layout: vLLM ``method="eagle"`` (``EagleLlamaForCausalLM``,
    vllm/model_executor/models/llama_eagle.py) and SGLang ``--speculative-algorithm EAGLE``
    (``LlamaForCausalLMEagle``, python/sglang/srt/models/llama_eagle.py). Both read
    ``fc(cat[embed(x), h])`` through Llama decoder layers whose layer 0 has no input norm, and
    return ``hidden + residual`` to the target's own lm_head. The selfspec layer *does* normalize
    its input, so the export puts an idle layer 0 first (zero o_proj and down_proj: it passes the
    fc output through as the residual) and the trained layer second, whose input norm the engines
    keep. ``fc``'s columns are swapped (selfspec feeds ``[h; e]``). Plain ``config.json``
    (LlamaConfig): ``architectures`` is ``LlamaForCausalLM`` for vLLM (its EAGLEConfig renames it
    ``EagleLlamaForCausalLM``) and ``LlamaForCausalLMEagle`` for SGLang (``--engine``).
    ``embed_tokens`` and ``lm_head`` are not written: both engines share the target's.
``medusa`` -- vLLM ``method="medusa"`` (``MedusaModel``, vllm/model_executor/models/medusa.py,
    vllm/transformers_utils/configs/medusa.py): ``blocks.{i}.layers.{j}.{weight,bias}`` (the
    same ``x + SiLU(W x + b)`` blocks, ``medusa_fc_bias: true``) and one shared ``lm_head.weight``
    (``original_lm_head: true``) with any LoRA merged into it; a reduced draft vocabulary becomes
    ``truncated_vocab_size`` + ``token_map``. SGLang has no Medusa support.
``eagle3`` -- the EAGLE-3 layout, for drafters of kind ``eagle3`` (``selfspec train --kind eagle3``):
    vLLM ``method="eagle3"`` (``Eagle3LlamaForCausalLM``, vllm/model_executor/models/llama_eagle3.py)
    and SGLang ``--speculative-algorithm EAGLE3`` (``LlamaForCausalLMEagle3``). Weights
    ``fc.weight`` [H, 3H] over the three fused target layers (``eagle_aux_hidden_state_layer_ids``
    in the config, the same indices the engines read), ``midlayer.{input_layernorm, hidden_norm,
    self_attn.{q,k,v}_proj (2H wide, over [norm(embedding) ; hidden_norm(state)]), self_attn.o_proj,
    post_attention_layernorm, mlp.*}``, ``norm.weight``, ``lm_head.weight`` [Vd, H] (the read-out
    with any LoRA merged; the target's rows for a reduced draft vocabulary) and ``d2t`` [Vd]
    (target id = draft id + d2t) / ``t2d`` [V] bool. ``norm_before_residual: false``: the state
    itself is the residual, as in selfspec. The target's embedding is shared (not written).
    A drafter of kind ``eagle`` (EAGLE-1 layer, which normalizes ``fc([h; e])`` as one vector)
    cannot be written in this layout and is refused; export it with ``--format eagle``.

Layouts were taken from the vLLM and SGLang sources named above (vLLM V1 engine, 2025 main
branch; SGLang 0.4/0.5 era); neither engine runs on this project's CPU test machines, so the
tests check names, shapes, config fields and the reference forward, not a live engine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from selfspec.drafters.base import VocabProjection
from selfspec.io import replace_dir, temp_dir_beside
from selfspec.training.config import ENGINES
from selfspec.training.config import EXPORT_FORMATS as FORMATS

EAGLE_ARCHITECTURE = {"vllm": "LlamaForCausalLM", "sglang": "LlamaForCausalLMEagle"}
EAGLE3_REFUSAL = (
    "this drafter is kind eagle (EAGLE-1 layer: it normalizes fc([h; e]) as one vector), but the EAGLE-3 layout "
    "normalizes the token embedding and a fused hidden state separately; no EAGLE-3 checkpoint computes the same "
    "function, so none is written. Export it with --format eagle (vLLM method=eagle, SGLang EAGLE), or train "
    "with --kind eagle3 for an EAGLE-3 drafter"
)

BLOCK_REFUSAL = (
    "this drafter is kind block (every depth in one forward, with learned depth rows after the context); "
    "the eagle, eagle3 and medusa layouts vLLM and SGLang load draft one depth per forward and have no place "
    "for those rows, so no export computes the same function. Serve it with selfspec, or train --kind eagle3 "
    "for a drafter the engines load"
)


def check_format(kind: str, fmt: str, engine: str = "vllm") -> None:
    """Raise ValueError when ``fmt`` cannot hold a drafter of ``kind`` (before loading anything)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if fmt == "eagle3" and kind == "eagle":
        raise ValueError(EAGLE3_REFUSAL)
    if kind == "block":
        raise ValueError(BLOCK_REFUSAL)
    want = fmt
    if kind != want:
        raise ValueError(f"--format {fmt} exports {want} drafters, but this drafter is {kind}")
    if fmt == "medusa" and engine == "sglang":
        raise ValueError("SGLang has no Medusa support; export --format medusa for vLLM (--engine vllm)")


def readout_weight(drafter: Any, model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The drafter's effective read-out ``[Vd, H]`` (LoRA merged) and its draft ids ``[Vd]`` or None."""
    vocab = drafter.vocab
    if vocab is None:
        return model.get_output_embeddings().weight.detach(), None
    base = next(m for m in vocab.modules() if isinstance(m, VocabProjection))
    weight = base.proj.weight.detach().clone()
    for module in vocab.modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "active_adapters"):
            for name in module.active_adapters:
                weight = weight + module.get_delta_weight(name).detach().to(weight.dtype)
    return weight, drafter.draft_ids


MEDUSA_TOKEN_MAP_NOTE = (
    "vLLM 0.32 refuses Medusa checkpoints with a token_map (a reduced draft vocabulary): its "
    "MedusaModel.load_weights registers token_map as a parameter but does not report it loaded, so "
    "the strict weight loader fails with 'weights were not initialized from checkpoint: {token_map}'"
)


def medusa_tensors(
    drafter: Any, model: Any, full_vocab: bool = False
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``full_vocab``: write the whole read-out (the target's lm_head, the drafter's own rows, LoRA
    merged, at its draft ids) and no token_map: loadable where token_map is not (see
    MEDUSA_TOKEN_MAP_NOTE), but the heads then propose over the full vocabulary."""
    c = drafter.config
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise ValueError("the target's lm_head has a bias, which vLLM's Medusa lm_head cannot hold")
    tensors = {}
    for i, head in enumerate(drafter.heads):
        for j, block in enumerate(head):
            tensors[f"blocks.{i}.layers.{j}.weight"] = block.linear.weight.detach()
            tensors[f"blocks.{i}.layers.{j}.bias"] = block.linear.bias.detach()
    weight, ids = readout_weight(drafter, model)
    if ids is not None and full_vocab:
        full = model.get_output_embeddings().weight.detach().clone().to(weight.dtype)
        full[ids] = weight
        weight, ids = full, None
    tensors["lm_head.weight"] = weight
    if ids is not None:
        tensors["token_map"] = ids.detach().long()
    config = {
        "architectures": ["MedusaModel"],
        "model_type": "medusa",
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "num_heads": c.num_heads,
        "num_hidden_layers": c.num_layers,
        "truncated_vocab_size": int(weight.shape[0]),
        "medusa_fc_bias": True,
        "original_lm_head": True,
        "max_paths": len(drafter.tree.paths()),
        "topk": 10,
    }
    return config, tensors


def llama_layer_config(c: Any, target: Any, layers: int, vocab: int) -> dict[str, Any]:
    """The LlamaConfig fields both EAGLE layouts share: the drafter layer's geometry (``c``, an
    ``EagleConfig``), ``layers`` decoder layers, and the target's positions and special tokens."""
    return {
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "num_hidden_layers": layers,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": vocab,
        "max_position_embeddings": int(getattr(target, "max_position_embeddings", 4096)),
        "bos_token_id": getattr(target, "bos_token_id", None),
        "eos_token_id": getattr(target, "eos_token_id", None),
    }


def eagle_tensors(drafter: Any, model: Any, engine: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if drafter.vocab is not None and not isinstance(drafter.vocab, VocabProjection):
        raise ValueError(
            "this drafter has a LoRA read-out, but vLLM and SGLang EAGLE drafts read with the target's own "
            "lm_head; train without --lora-rank to export it"
        )
    c, layer = drafter.config, drafter.layer
    h = c.hidden_size
    fc = drafter.fc.weight.detach()  # [H, 2H] over [h; e]
    tensors = {"fc.weight": torch.cat([fc[:, h:], fc[:, :h]], dim=1), "fc.bias": fc.new_zeros(h)}
    names = {
        "self_attn.q_proj": layer.q_proj,
        "self_attn.k_proj": layer.k_proj,
        "self_attn.v_proj": layer.v_proj,
        "self_attn.o_proj": layer.o_proj,
        "mlp.gate_proj": layer.gate_proj,
        "mlp.up_proj": layer.up_proj,
        "mlp.down_proj": layer.down_proj,
    }
    for name, linear in names.items():  # layer 0 idles (zero output); layer 1 is the trained layer
        tensors[f"layers.0.{name}.weight"] = torch.zeros_like(linear.weight)
        tensors[f"layers.1.{name}.weight"] = linear.weight.detach()
    tensors["layers.0.post_attention_layernorm.weight"] = torch.ones_like(layer.post_norm.weight)
    tensors["layers.1.input_layernorm.weight"] = layer.input_norm.weight.detach()
    tensors["layers.1.post_attention_layernorm.weight"] = layer.post_norm.weight.detach()
    target = model.config.get_text_config()
    config = {
        "architectures": [EAGLE_ARCHITECTURE[engine]],
        **llama_layer_config(c, target, layers=2, vocab=c.vocab_size),
        "tie_word_embeddings": bool(getattr(target, "tie_word_embeddings", False)),
    }
    return config, tensors


def eagle3_tensors(drafter: Any, model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    c, layer = drafter.config, drafter.layer
    if len(c.feature_layers) != 3:
        raise ValueError(
            f"the EAGLE-3 layout fuses exactly 3 target layers (fc is 3H wide); this drafter fuses "
            f"{len(c.feature_layers)} ({c.feature_layers})"
        )
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise ValueError("the target's lm_head has a bias, which the EAGLE-3 lm_head cannot hold")
    weight, ids = readout_weight(drafter, model)  # [Vd, H], [Vd] | None
    vocab = c.vocab_size
    if ids is None:
        d2t, t2d = torch.zeros(vocab, dtype=torch.long), torch.ones(vocab, dtype=torch.bool)
    else:
        ids = ids.detach().long().cpu()
        d2t = ids - torch.arange(ids.numel())
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[ids] = True
    tensors = {
        "fc.weight": drafter.fc.weight.detach(),
        "norm.weight": drafter.norm.weight.detach(),
        "lm_head.weight": weight,
        "d2t": d2t,
        "t2d": t2d,
    }
    names = {
        "input_layernorm": layer.input_norm,
        "hidden_norm": layer.hidden_norm,
        "self_attn.q_proj": layer.q_proj,
        "self_attn.k_proj": layer.k_proj,
        "self_attn.v_proj": layer.v_proj,
        "self_attn.o_proj": layer.o_proj,
        "post_attention_layernorm": layer.post_norm,
        "mlp.gate_proj": layer.gate_proj,
        "mlp.up_proj": layer.up_proj,
        "mlp.down_proj": layer.down_proj,
    }
    for name, module in names.items():
        tensors[f"midlayer.{name}.weight"] = module.weight.detach()
    target = model.config.get_text_config()
    aux = [int(i) for i in c.feature_layers]
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        **llama_layer_config(c, target, layers=1, vocab=vocab),
        "target_hidden_size": c.hidden_size,
        "draft_vocab_size": int(weight.shape[0]),
        "norm_before_residual": False,
        "eagle_aux_hidden_state_layer_ids": aux,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": aux, "use_aux_hidden_state": True},
        "tie_word_embeddings": False,
    }
    return config, tensors


_SAFETENSORS_FLOATS = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
VLLM_METHOD = {"eagle": "eagle", "eagle3": "eagle3", "medusa": "medusa"}
SGLANG_ALGORITHM = {"eagle": "EAGLE", "eagle3": "EAGLE3"}


def stored_dtype(drafter_dir: Path) -> str | None:
    """The floating dtype of the drafter's own weights file: what it was trained and shipped in."""
    from safetensors import safe_open

    with safe_open(str(Path(drafter_dir) / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            dtype = _SAFETENSORS_FLOATS.get(f.get_slice(name).get_dtype())
            if dtype:
                return dtype
    return None


def best_chain(acceptance: list[float], cost_ratio: float) -> tuple[int, float]:
    """The chain length k maximizing expected tokens per unit of step cost,
    (1 + sum_{d<=k} prod_{j<=d} a_j) / (1 + cost_ratio * k), with ``a_j`` the drafter's top-1
    acceptance at depth j and ``cost_ratio`` one drafted token's cost relative to a verify step.
    Returns (k, expected tokens per step at k)."""
    if not acceptance:
        raise ValueError("no acceptance to choose a chain length from")
    best, reach, tokens = (1, 0.0, -1.0), 1.0, 1.0
    for k, a in enumerate(acceptance, start=1):
        reach *= float(a)
        tokens += reach
        rate = tokens / (1 + cost_ratio * k)
        if rate > best[2] + 1e-12:
            best = (k, tokens, rate)
    return best[0], best[1]


def recommended_settings(drafter: Any, fmt: str, cost_ratio: float = 0.1) -> dict[str, Any]:
    """Speculative settings for the engines from the drafter's calibrated acceptance (a prior when
    it was never calibrated): vLLM drafts a chain, SGLang verifies the drafter's static tree."""
    from selfspec.autotune import drafter_acceptance
    from selfspec.tree import DynamicTree

    measured = bool(getattr(drafter.config, "acceptance", None))
    acc = drafter_acceptance(drafter, DynamicTree())
    top1 = [float(a) for a in acc[:, 0].tolist()]
    k, tokens = best_chain(top1, cost_ratio)
    tree = drafter.tree
    out: dict[str, Any] = {
        "acceptance_source": "calibration" if measured else "prior (the drafter was never calibrated)",
        "top1_acceptance_by_depth": [round(a, 4) for a in top1],
        "cost_ratio": cost_ratio,
        "vllm": {"num_speculative_tokens": k, "expected_tokens_per_step": round(tokens, 3)},
    }
    if fmt in SGLANG_ALGORITHM:
        out["sglang"] = {
            "speculative_num_steps": tree.max_depth,
            "speculative_eagle_topk": int(tree.num_children.max()),
            "speculative_num_draft_tokens": tree.size,
        }
    return out


def command_lines(fmt: str, target: str, out: Path, rec: dict[str, Any]) -> list[str]:
    """The serve commands for the exported directory, with the recommended settings."""
    spec = json.dumps(
        {
            "method": VLLM_METHOD[fmt],
            "model": str(out),
            "num_speculative_tokens": rec["vllm"]["num_speculative_tokens"],
        }
    )
    lines = [f"vllm serve {target} --speculative-config '{spec}'"]
    if "sglang" in rec:
        sg = rec["sglang"]
        lines.append(
            f"python -m sglang.launch_server --model-path {target} --speculative-algorithm "
            f"{SGLANG_ALGORITHM[fmt]} --speculative-draft-model-path {out} --speculative-num-steps "
            f"{sg['speculative_num_steps']} --speculative-eagle-topk {sg['speculative_eagle_topk']} "
            f"--speculative-num-draft-tokens {sg['speculative_num_draft_tokens']}"
        )
    return lines


def export(
    drafter: Any,
    model: Any,
    fmt: str,
    out: Path,
    engine: str = "vllm",
    dtype: str | None = None,
    cost_ratio: float = 0.1,
    full_vocab: bool = False,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for ``fmt`` under ``out`` (atomically), with
    ``selfspec_export.json`` holding the source, the static tree and the recommended settings."""
    check_format(drafter.kind, fmt, engine)
    if fmt == "medusa":
        config, tensors = medusa_tensors(drafter, model, full_vocab)
    elif fmt == "eagle3":
        config, tensors = eagle3_tensors(drafter, model)
    else:
        config, tensors = eagle_tensors(drafter, model, engine)
    cast = getattr(torch, dtype) if dtype else None
    tensors = {
        k: (v.to(cast) if cast is not None and v.is_floating_point() else v).contiguous().cpu()
        for k, v in tensors.items()
    }
    config["torch_dtype"] = str(
        next(v for v in tensors.values() if v.is_floating_point()).dtype
    ).removeprefix("torch.")
    note = {
        "format": fmt,
        "engine": engine,
        "source_kind": drafter.kind,
        "tree": drafter.tree.paths(),
        "dropped": ["draft vocabulary (engines draft over the full vocabulary)"]
        if drafter.draft_ids is not None and (fmt == "eagle" or (fmt == "medusa" and full_vocab))
        else [],
        "recommended": recommended_settings(drafter, fmt, cost_ratio),
    }
    tmp = temp_dir_beside(out)
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "selfspec_export.json").write_text(json.dumps(note, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

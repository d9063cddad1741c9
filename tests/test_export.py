"""Export: files complete (config fields, weight names and shapes) and, through a torch reference
of each engine's forward, computing exactly what the selfspec drafter computes."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

import selfspec
from selfspec.cli import main
from selfspec.training.exporter import EAGLE3_REFUSAL, check_format, export
from tests.helpers import make_tiny, randomized, tiny_target_dir

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")  # fp64: the reference comparison is exact up to rounding


def read(out):
    return json.loads((out / "config.json").read_text()), load_file(str(out / "model.safetensors"))


# ------------------------------------------------------------------- engine references
def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, theta):  # x [heads, N, D], Llama rotate-half convention
    half = x.shape[-1] // 2
    inv = theta ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    return torch.cat(
        [x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin], -1
    )


def llama_layer(w, i, cfg, x, residual, input_norm):
    """vLLM/SGLang LlamaDecoderLayer with its fused residual add; layer 0 of EAGLE has no input norm."""
    eps = cfg["rms_norm_eps"]
    p = f"layers.{i}."
    if residual is None:
        residual, h = x, (rms(x, w[p + "input_layernorm.weight"], eps) if input_norm else x)
    else:
        residual = x + residual
        h = rms(residual, w[p + "input_layernorm.weight"], eps)
    residual = attention(w, p, cfg, h) + residual
    return mlp(w, p, rms(residual, w[p + "post_attention_layernorm.weight"], eps)), residual


def attention(w, p, cfg, h):
    """Causal GQA self-attention with rotary positions 0..n-1, through ``p``'s q/k/v/o weights."""
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    n = h.shape[0]
    q = rope((h @ w[p + "self_attn.q_proj.weight"].T).view(n, nh, hd).transpose(0, 1), cfg["rope_theta"])
    k = rope((h @ w[p + "self_attn.k_proj.weight"].T).view(n, nkv, hd).transpose(0, 1), cfg["rope_theta"])
    v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, nkv, hd).transpose(0, 1)
    k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
    a = (
        F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
        .transpose(0, 1)
        .reshape(n, -1)
    )
    return a @ w[p + "self_attn.o_proj.weight"].T


def mlp(w, p, h):
    return (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[
        p + "mlp.down_proj.weight"
    ].T


def eagle1_reference(cfg, w, embeds, hidden):
    """EagleLlamaForCausalLM / LlamaForCausalLMEagle: fc(cat[e, h]) -> layers -> hidden + residual."""
    x = torch.cat([embeds, hidden], -1) @ w["fc.weight"].T + w["fc.bias"]
    residual = None
    for i in range(cfg["num_hidden_layers"]):
        x, residual = llama_layer(w, i, cfg, x, residual, input_norm=i > 0)
    return x + residual


def eagle3_reference(cfg, w, embeds, fused):
    """Eagle3LlamaForCausalLM / LlamaForCausalLMEagle3, one midlayer, norm_before_residual false:
    g = fc(fused); attention over [input_layernorm(e) ; hidden_norm(g)] with g as the residual;
    returns the pre-norm state (what the next depth reads) and logits mapped to the target vocabulary."""
    eps, p = cfg["rms_norm_eps"], "midlayer."
    g = fused @ w["fc.weight"].T
    x = torch.cat(
        [rms(embeds, w[p + "input_layernorm.weight"], eps), rms(g, w[p + "hidden_norm.weight"], eps)], -1
    )
    n = x.shape[0]
    residual = attention(w, p, cfg, x) + g
    state = mlp(w, p, rms(residual, w[p + "post_attention_layernorm.weight"], eps)) + residual
    draft = rms(state, w["norm.weight"], eps) @ w["lm_head.weight"].T  # [n, Vd]
    logits = draft.new_full((n, cfg["vocab_size"]), float("-inf"))
    logits[:, torch.arange(cfg["draft_vocab_size"]) + w["d2t"]] = draft
    return state, logits


def medusa_reference(cfg, w, hidden):
    """vLLM Medusa: per head, x + SiLU(W x + b) blocks, then the shared lm_head (+ token_map)."""
    out = []
    for i in range(cfg["num_heads"]):
        x = hidden
        for j in range(cfg["num_hidden_layers"]):
            x = x + F.silu(x @ w[f"blocks.{i}.layers.{j}.weight"].T + w[f"blocks.{i}.layers.{j}.bias"])
        logits = x @ w["lm_head.weight"].T
        if "token_map" in w:
            full = logits.new_full((logits.shape[0], cfg["vocab_size"]), float("-inf"))
            full[:, w["token_map"]] = logits
            logits = full
        out.append(logits)
    return out


def with_readout(drafter, vocab, lora):
    """Give the drafter a reduced draft vocabulary and/or a (non-zero) LoRA read-out."""
    if vocab:
        drafter.set_draft_vocab(torch.arange(0, 200, 2))
    if lora:
        drafter.add_vocab_lora(peft.LoraConfig(r=4, lora_alpha=8))
        with torch.no_grad():
            for n, p in drafter.named_parameters():
                if "lora_" in n:
                    p.normal_(std=0.2)


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("engine, arch", [("vllm", "LlamaForCausalLM"), ("sglang", "LlamaForCausalLMEagle")])
def test_eagle_export_is_complete_and_exact(model, tmp_path, engine, arch):
    drafter = randomized(selfspec.new_drafter("eagle", model), seed=3, std=0.1)
    cfg, w = read(export(drafter, model, "eagle", tmp_path / "e", engine))
    c = drafter.config
    assert cfg["architectures"] == [arch] and cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 2
    for key, value in (
        ("hidden_size", 64),
        ("num_attention_heads", c.num_heads),
        ("num_key_value_heads", c.num_kv_heads),
        ("head_dim", c.head_dim),
        ("intermediate_size", c.intermediate_size),
        ("vocab_size", 256),
        ("rope_theta", c.rope_theta),
        ("rms_norm_eps", c.rms_norm_eps),
        ("hidden_act", "silu"),
    ):
        assert cfg[key] == value, key
    layer = {
        "self_attn.q_proj.weight": (c.num_heads * c.head_dim, 64),
        "self_attn.k_proj.weight": (c.num_kv_heads * c.head_dim, 64),
        "self_attn.v_proj.weight": (c.num_kv_heads * c.head_dim, 64),
        "self_attn.o_proj.weight": (64, c.num_heads * c.head_dim),
        "mlp.gate_proj.weight": (c.intermediate_size, 64),
        "mlp.up_proj.weight": (c.intermediate_size, 64),
        "mlp.down_proj.weight": (64, c.intermediate_size),
        "post_attention_layernorm.weight": (64,),
    }
    want = {
        "fc.weight": (64, 128),
        "fc.bias": (64,),
        "layers.1.input_layernorm.weight": (64,),
        **{f"layers.{i}.{k}": s for i in (0, 1) for k, s in layer.items()},
    }
    assert {k: tuple(v.shape) for k, v in w.items()} == want  # no layer-0 input norm, no embed/lm_head
    hidden = torch.randn(7, 64, dtype=torch.float64)
    tokens = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    ref = eagle1_reference(cfg, w, model.get_input_embeddings()(tokens), hidden)
    with torch.no_grad():  # the drafter computes rotary angles in fp32 (as the engines do): ~1e-7 relative
        torch.testing.assert_close(ref, drafter(hidden, tokens), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("vocab, lora", [(0, False), (100, False), (100, True)])
def test_eagle3_export_is_complete_and_exact(model, tmp_path, vocab, lora):
    drafter = randomized(selfspec.new_drafter("eagle3", model, draft_vocab_size=vocab), seed=6, std=0.1)
    with_readout(drafter, vocab, lora)
    cfg, w = read(export(drafter, model, "eagle3", tmp_path / "e3"))
    c, h = drafter.config, 64
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["eagle_aux_hidden_state_layer_ids"] == c.feature_layers == [2, 1, 0]
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == c.feature_layers
    assert (cfg["vocab_size"], cfg["draft_vocab_size"], cfg["norm_before_residual"]) == (
        256,
        vocab or 256,
        False,
    )
    qkv, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    want = {
        "fc.weight": (h, 3 * h),
        "norm.weight": (h,),
        "lm_head.weight": (vocab or 256, h),
        "d2t": (vocab or 256,),
        "t2d": (256,),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.self_attn.q_proj.weight": (qkv, 2 * h),
        "midlayer.self_attn.k_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.v_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, qkv),
        "midlayer.post_attention_layernorm.weight": (h,),
        "midlayer.mlp.gate_proj.weight": (c.intermediate_size, h),
        "midlayer.mlp.up_proj.weight": (c.intermediate_size, h),
        "midlayer.mlp.down_proj.weight": (h, c.intermediate_size),
    }
    assert {k: tuple(v.shape) for k, v in w.items()} == want
    assert int(w["t2d"].sum()) == (vocab or 256) and w["d2t"].dtype == torch.int64
    fused = torch.randn(7, 3 * h, dtype=torch.float64)
    tokens = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    state, logits = eagle3_reference(cfg, w, model.get_input_embeddings()(tokens), fused)
    with torch.no_grad():
        ours = drafter(fused, tokens)
        torch.testing.assert_close(state, ours, atol=1e-6, rtol=1e-5)
        mine = drafter.lm_head(ours)
    assert torch.equal(logits.isinf(), mine.isinf())
    torch.testing.assert_close(logits[~logits.isinf()], mine[~mine.isinf()], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("vocab, lora", [(0, False), (100, True)])
def test_medusa_export_is_complete_and_exact(model, tmp_path, vocab, lora):
    drafter = randomized(
        selfspec.new_drafter("medusa", model, num_heads=3, num_layers=2, draft_vocab_size=vocab),
        seed=5,
        std=0.1,
    )
    with_readout(drafter, vocab, lora)
    cfg, w = read(export(drafter, model, "medusa", tmp_path / "m"))
    assert cfg["architectures"] == ["MedusaModel"] and cfg["model_type"] == "medusa"
    assert (cfg["num_heads"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (
        3,
        2,
        64,
        256,
    )
    assert cfg["medusa_fc_bias"] and cfg["original_lm_head"] and cfg["truncated_vocab_size"] == (vocab or 256)
    names = {f"blocks.{i}.layers.{j}.{t}" for i in range(3) for j in range(2) for t in ("weight", "bias")}
    assert set(w) == names | {"lm_head.weight"} | ({"token_map"} if vocab else set())
    assert w["lm_head.weight"].shape == (vocab or 256, 64)
    hidden = torch.randn(5, 64, dtype=torch.float64)
    with torch.no_grad():
        ours = [drafter.lm_head(drafter.depth_states(hidden)[:, i]) for i in range(3)]
    for a, b in zip(medusa_reference(cfg, w, hidden), ours):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_medusa_full_vocab_export_writes_the_whole_readout_with_the_drafters_rows(model, tmp_path):
    """--full-vocab (vLLM 0.32 cannot load token_map): the target's lm_head with the drafter's own
    rows (LoRA merged) at its draft ids, no token_map; on the draft ids the logits are the drafter's."""
    drafter = randomized(
        selfspec.new_drafter("medusa", model, num_heads=2, num_layers=1, draft_vocab_size=100),
        seed=6,
        std=0.1,
    )
    with_readout(drafter, 100, True)
    out = export(drafter, model, "medusa", tmp_path / "m", full_vocab=True)
    cfg, w = read(out)
    assert (
        "token_map" not in w and cfg["truncated_vocab_size"] == 256 and w["lm_head.weight"].shape == (256, 64)
    )
    ids = drafter.draft_ids
    rest = torch.ones(256, dtype=torch.bool)
    rest[ids] = False
    target = model.get_output_embeddings().weight.detach()
    torch.testing.assert_close(w["lm_head.weight"][rest], target[rest].to(w["lm_head.weight"].dtype))
    hidden = torch.randn(5, 64, dtype=torch.float64)
    with torch.no_grad():
        ours = [drafter.lm_head(drafter.depth_states(hidden)[:, i]) for i in range(2)]
    for a, b in zip(medusa_reference(cfg, w, hidden), ours):
        torch.testing.assert_close(a[:, ids], b[:, ids], atol=1e-9, rtol=1e-9)
    note = json.loads((out / "selfspec_export.json").read_text())
    assert note["dropped"] and "draft vocabulary" in note["dropped"][0]


def test_export_refusals(model, tmp_path):
    eagle = selfspec.new_drafter("eagle", model)
    with pytest.raises(ValueError, match="this drafter is kind eagle .* train with --kind eagle3"):
        export(eagle, model, "eagle3", tmp_path / "x")
    with pytest.raises(ValueError, match="--format eagle exports eagle drafters, but this drafter is eagle3"):
        check_format("eagle3", "eagle")
    with pytest.raises(ValueError, match="fuses exactly 3 target layers"):
        export(selfspec.new_drafter("eagle3", model, feature_layers=[1, 2]), model, "eagle3", tmp_path / "z")
    with pytest.raises(
        ValueError, match="--format medusa exports medusa drafters, but this drafter is eagle"
    ):
        check_format("eagle", "medusa")
    with pytest.raises(ValueError, match="SGLang has no Medusa support"):
        check_format("medusa", "medusa", "sglang")
    eagle.add_vocab_lora(peft.LoraConfig(r=2))
    with pytest.raises(ValueError, match="LoRA read-out"):
        export(eagle, model, "eagle", tmp_path / "y")
    assert "--format eagle" in EAGLE3_REFUSAL


def test_export_cli(tmp_path, capsys):
    loaded, _ = selfspec.load_target(str(tiny_target_dir(tmp_path / "target")), device="cpu")
    selfspec.new_drafter("medusa", loaded).save_pretrained(tmp_path / "d")
    code = main(
        [
            "export",
            "--drafter",
            str(tmp_path / "d"),
            "--format",
            "medusa",
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(tmp_path / "target"),
            "--dtype",
            "float16",
        ]
    )
    assert code == 0 and read(tmp_path / "o")[1]["lm_head.weight"].dtype == torch.float16
    capsys.readouterr()
    assert (
        main(
            ["export", "--drafter", str(tmp_path / "d"), "--format", "eagle3", "--out", str(tmp_path / "o2")]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("selfspec: error: ") and "exports eagle3 drafters" in err[0]


def test_best_chain_maximizes_tokens_per_cost():
    from selfspec.training.exporter import best_chain

    acc = [0.8, 0.6, 0.5, 0.3, 0.1]

    def rate(k, r):
        reach, tokens = 1.0, 1.0
        for a in acc[:k]:
            reach *= a
            tokens += reach
        return tokens / (1 + r * k), tokens

    for r in (0.0, 0.05, 0.1, 0.3, 1.0):
        k, tokens = best_chain(acc, r)
        assert rate(k, r)[0] == pytest.approx(max(rate(j, r)[0] for j in range(1, 6)))
        assert tokens == pytest.approx(rate(k, r)[1])
    assert best_chain(acc, 0.0)[0] == 5 and best_chain(acc, 1.0)[0] == 1
    with pytest.raises(ValueError, match="no acceptance"):
        best_chain([], 0.1)


def test_export_keeps_the_stored_dtype_and_prints_serve_commands(tmp_path, capsys):
    """No --dtype: the export stores what the drafter's file holds (fp16 here), bitwise (the target
    is loaded in fp32 for the export), writes the recommended settings from the calibrated
    acceptance, and prints the vLLM and SGLang command lines."""
    from safetensors import safe_open

    from selfspec.training.exporter import stored_dtype

    loaded, _ = selfspec.load_target(str(tiny_target_dir(tmp_path / "target")), device="cpu")
    drafter = randomized(selfspec.new_drafter("eagle3", loaded, feature_layers=[0, 1, 2]), seed=3, std=0.05)
    drafter.config.acceptance = [[0.9, 0.05], [0.8, 0.05], [0.2, 0.05]]
    drafter.half().save_pretrained(tmp_path / "d")
    assert stored_dtype(tmp_path / "d") == "float16"
    capsys.readouterr()
    argv = ["export", "--drafter", str(tmp_path / "d"), "--format", "eagle3", "--out", str(tmp_path / "o")]
    assert main([*argv, "--model", str(tmp_path / "target"), "--cost-ratio", "0.1"]) == 0
    out = capsys.readouterr().out
    cfg, w = read(tmp_path / "o")
    assert cfg["torch_dtype"] == "float16" and w["fc.weight"].dtype == torch.float16
    with safe_open(str(tmp_path / "d" / "model.safetensors"), "pt") as f:
        assert torch.equal(w["fc.weight"], f.get_tensor("fc.weight"))  # not rounded on the way
    note = json.loads((tmp_path / "o" / "selfspec_export.json").read_text())
    rec = note["recommended"]
    assert rec["acceptance_source"] == "calibration" and rec["vllm"]["num_speculative_tokens"] == 2
    assert rec["sglang"]["speculative_num_draft_tokens"] == drafter.tree.size
    assert '"num_speculative_tokens": 2' in out and "vllm serve " in out
    assert "python -m sglang.launch_server" in out and "--speculative-algorithm EAGLE3" in out
    assert main([*argv, "--cost-ratio", "-1"]) == 2

"""The decoding methods an eval compares, behind one call: ``method.generate(ids, n, sampling, streamer)``.

- ``hf``: ``model.generate`` (greedy, or sampled with the same temperature/top-p/top-k).
- ``pld``: HF prompt-lookup decoding (``prompt_lookup_num_tokens``): n-gram drafts from the prompt.
- ``assisted``: HF assisted generation with a smaller ``assistant_model`` of the same tokenizer.
- ``engine``: ``selfspec.generate`` without a drafter: one token per step through the same engine,
  the baseline that isolates what the drafter buys.
- ``selfspec``: ``selfspec.generate`` with the drafter.
- ``lookup``: ``selfspec.generate`` with no drafter and lookup branches (n-gram matches in the prompt
  and the generated text, ``selfspec.lookup``): selfspec's answer to ``pld``.
- ``selfspec+lookup``: the drafter's tree and lookup branches merged into one tree.
- ``vllm``: vLLM (its own venv and process, ``selfspec.eval.vllm``), no speculation.
- ``vllm+drafter``: vLLM with the drafter exported by ``selfspec export`` (a chain: vLLM drafts no trees).

Sampling options reach HF, selfspec and vLLM as the same settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from selfspec.eval.config import METHODS, NEEDS_DRAFTER, SELFSPEC_METHODS, VLLM_METHODS  # noqa: F401
from selfspec.sampling import SamplingConfig


# How every method picks tokens is the library's SamplingConfig (temperature 0 is greedy; top_k 0
# and top_p 1.0 are off; the eval always sets a seed, and seeds torch before every sampled run);
# these translate it for each engine.
def hf_kwargs(sampling: SamplingConfig) -> dict[str, Any]:
    if sampling.greedy:  # None overrides any sampling values in the model's generation_config
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    # top_k 0 is passed explicitly: HF's own default of 50 would otherwise apply
    return {
        "do_sample": True,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
    }


def selfspec_kwargs(sampling: SamplingConfig) -> dict[str, Any]:
    """The sampling keyword arguments of ``selfspec.generate``."""
    if sampling.greedy:
        return {}
    return dataclasses.asdict(sampling)


def vllm_request(sampling: SamplingConfig) -> dict[str, Any]:
    """The sampling fields of a request to the vLLM worker."""
    req: dict[str, Any] = {"temperature": sampling.temperature, "seed": sampling.seed}
    if not sampling.greedy:
        req |= {"top_p": sampling.top_p, "top_k": sampling.top_k}
    return req


class HFMethod:
    """``model.generate`` with extra keyword arguments (prompt lookup, assistant model)."""

    def __init__(self, name: str, model: Any, pad_token_id: int | None, **extra: Any):
        self.name, self.model, self.pad_token_id, self.extra = name, model, pad_token_id, extra

    def generate(
        self, ids: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig, streamer: Any
    ) -> dict[str, Any]:
        ids = ids.to(self.model.device)  # [1, n]
        if not sampling.greedy:
            torch.manual_seed(sampling.seed)
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_token_id,
            streamer=streamer,
            **hf_kwargs(sampling),
            **self.extra,
        )
        return {"tokens": out[0, ids.shape[1] :].tolist()}


class SelfspecMethod:
    """``selfspec.generate`` with or without a drafter; ``tree`` and ``acceptance`` are passed as
    given (they only matter with a drafter)."""

    def __init__(
        self,
        name: str,
        model: Any,
        drafter: Any,
        tree: Any = "static",
        acceptance: str = "exact",
        verify: str = "exact",
        lookup: Any = None,
        candidates: str = "auto",
    ):
        self.name, self.model, self.drafter = name, model, drafter
        self.tree, self.acceptance, self.verify, self.lookup = tree, acceptance, verify, lookup
        self.candidates = candidates

    def generate(
        self, ids: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig, streamer: Any
    ) -> dict[str, Any]:
        import selfspec

        if not sampling.greedy:
            torch.manual_seed(sampling.seed)
        result = selfspec.generate(
            self.model,
            ids,
            drafter=self.drafter,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            tree=self.tree,
            acceptance=self.acceptance,
            verify=self.verify,
            candidates=self.candidates,
            **({"lookup": self.lookup} if self.lookup is not None else {}),
            **selfspec_kwargs(sampling),
        )
        s = result.stats
        return {
            "lookup_proposed": s.lookup_proposed,
            "lookup_accepted": s.lookup_accepted,
            "tokens": result.sequences[0, ids.shape[1] :].tolist(),
            "prefill_s": s.prefill_s,
            "steps": s.steps,
            "accepted_hist": list(s.accepted_hist),
            "accepted_by_depth": list(s.accepted_by_depth),
            "tree_nodes": s.tree_nodes,
        }


class VLLMMethod:
    """A vLLM engine in its own process (``selfspec.eval.vllm.Worker``), loaded once."""

    def __init__(self, name: str, worker: Any):
        self.name, self.worker = name, worker

    def generate(
        self, ids: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig, streamer: Any
    ) -> dict[str, Any]:
        from selfspec.eval.vllm import hist_from_counts

        out = self.worker.generate(ids.reshape(-1).tolist(), max_new_tokens, vllm_request(sampling))
        drafts = out["drafts"]
        return {
            "tokens": out["tokens"],
            # no speculation: one token per forward, as HF's streamer counts them
            "accepted_hist": hist_from_counts(drafts, out["per_pos"]) if drafts else [0, len(out["tokens"])],
            "accepted_by_depth": [n / drafts for n in out["per_pos"]] if drafts else [],
            "engine_s": out["seconds"],
        }

    def close(self) -> None:
        self.worker.close()


def vllm_methods(names: list[str], settings: dict[str, Any]) -> dict[str, VLLMMethod]:
    """Start one vLLM worker per vllm method. ``settings``: python (or None), model, dtype, out
    (a directory for the export and the workers' logs), drafter (name/dir), k (or None)."""
    from pathlib import Path

    from selfspec.eval import vllm

    python = vllm.vllm_python(settings.get("python"))
    model = vllm.model_source(settings["model"])
    out_dir = Path(settings["out"])
    made: dict[str, VLLMMethod] = {}
    try:
        for name in names:
            spec = None
            if name == "vllm+drafter":
                spec, k = vllm.export_drafter(
                    settings["drafter"], settings["model"], out_dir / "vllm-drafter"
                )
                spec["num_speculative_tokens"] = settings.get("k") or k
            log = out_dir / f"{name.replace('+', '-')}.log"
            made[name] = VLLMMethod(name, vllm.Worker(python, model, settings["dtype"], spec, log))
    except BaseException:
        for m in made.values():
            m.close()
        raise
    return made


def build_methods(
    names: list[str],
    model: Any,
    tokenizer: Any,
    drafter: Any = None,
    assistant: Any = None,
    pld_tokens: int = 10,
    tree: Any = "static",
    acceptance: str = "exact",
    verify: str = "exact",
    lookup: Any = None,
    vllm: dict[str, Any] | None = None,
    candidates: str = "auto",
) -> dict[str, Any]:
    """name -> method object, in the order given. ``tree``/``acceptance``/``verify``/``candidates`` apply to the
    drafter methods; ``lookup`` (a ``selfspec.lookup.Lookup``, default settings if None) to the
    lookup methods; ``vllm`` (see ``vllm_methods``) to the vllm methods."""
    from selfspec.lookup import Lookup

    lookup = lookup or Lookup()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    wanted = [n for n in names if n in VLLM_METHODS]
    engines = vllm_methods(wanted, vllm or {}) if wanted else {}
    out: dict[str, Any] = {}
    for name in names:
        if name in engines:
            out[name] = engines[name]
        elif name == "hf":
            out[name] = HFMethod(name, model, pad)
        elif name == "pld":
            out[name] = HFMethod(name, model, pad, prompt_lookup_num_tokens=pld_tokens)
        elif name == "assisted":
            if assistant is None:
                raise ValueError("method 'assisted' needs --assistant MODEL")
            out[name] = HFMethod(name, model, pad, assistant_model=assistant)
        elif name == "engine":
            out[name] = SelfspecMethod(name, model, None)
        elif name == "lookup":
            out[name] = SelfspecMethod(name, model, None, acceptance=acceptance, verify=verify, lookup=lookup)
        elif name in NEEDS_DRAFTER:
            if drafter is None:
                raise ValueError(
                    f"method '{name}' needs a drafter; pass --drafter DIR or drop it from --methods"
                )
            extra = lookup if name == "selfspec+lookup" else None
            out[name] = SelfspecMethod(
                name, model, drafter, tree, acceptance, verify, lookup=extra, candidates=candidates
            )
        else:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return out


def check_same_tokenizer(target_tok: Any, assistant_tok: Any, assistant_name: str) -> None:
    """HF assisted generation passes token ids between the models: their vocabularies must agree."""
    a, t = assistant_tok.get_vocab(), target_tok.get_vocab()
    if a == t:
        return
    differ = sum(1 for tok, i in t.items() if a.get(tok) != i) + sum(1 for tok in a if tok not in t)
    raise ValueError(
        f"--assistant {assistant_name} has a different tokenizer from the target "
        f"(vocabulary {len(a)} vs {len(t)} tokens, {differ} entries differ); assisted generation "
        "needs the same vocabulary: pick an assistant of the target's model family"
    )


@torch.inference_mode()
def diagnose_mismatch(
    model: Any, prompt: torch.Tensor, reference: list[int], other: list[int]
) -> dict[str, Any] | None:
    """Where ``other`` first leaves the greedy ``reference`` continuation, and whether the target
    was nearly tied there.

    One target forward over prompt + reference gives the logits that chose each reference token.
    ``margin`` is the target's top-1 minus top-2 logit at the first differing position; ``gap``
    the logit difference between the reference token and the other method's token there. A tiny
    margin with the other token as runner-up is a float near-tie (different kernels, different
    rounding); a large margin means the method did not follow the target's argmax: a bug.
    Returns None when the sequences are equal."""
    position = first_difference(reference, other)
    if position is None:
        return None
    info: dict[str, Any] = {
        "position": position,
        "ref_token": reference[position] if position < len(reference) else None,
        "token": other[position] if position < len(other) else None,
        "margin": None,
        "gap": None,
        "runner_up": None,
    }
    if position >= len(reference):
        return info  # the reference stopped (EOS) where the other went on: no logits to read
    seq = torch.cat([prompt.reshape(-1).cpu(), torch.tensor(reference)])[None].to(model.device)  # [1, P+N]
    logits = model(seq).logits[0, prompt.numel() + position - 1].float()  # [V] chose reference[position]
    top = logits.topk(2)
    info["margin"] = float(top.values[0] - top.values[1])
    info["runner_up"] = int(top.indices[1])
    if info["token"] is not None:
        info["gap"] = float(logits[reference[position]] - logits[info["token"]])
    return info


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where two token lists differ (a length difference counts)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# Largest top-2 logit margin still called a float near-tie, per dtype: a few times the logit
# error that reordered reductions make in that precision (fp32 ~1e-4, bf16 ~1e-1 on small models).
NEAR_TIE = {"float64": 1e-8, "float32": 1e-2, "float16": 0.1, "bfloat16": 0.5}


def verdict(info: dict[str, Any], dtype: str) -> str:
    """'near-tie' when the other method's token scored within NEAR_TIE[dtype] of the reference's
    (the target's top logit), exact ties included, whichever of them topk lists first; 'suspect'
    otherwise (worth a bug report); 'length' when only EOS placement differs past the end of the
    reference."""
    if info["margin"] is None:
        return "length"
    tied = info["gap"] is not None and info["gap"] <= NEAR_TIE.get(dtype, 1e-2)
    return "near-tie" if tied else "suspect"

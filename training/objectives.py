"""What each drafter kind is trained to do, as ``nn.Module`` objectives over packed batches.

A ``Pack`` is several cached sequences laid end to end (``batch_tokens`` rows); attention never
crosses a sequence. The target is frozen and absent: its hidden states come from the feature
cache, and its next-token distribution at row t is ``softmax(lm_head(h_t))``, recomputed here from
the cached state through the frozen rows of ``lm_head`` (the draft vocabulary's, when reduced).

Medusa: head k reads h_t and is scored by cross-entropy on token t+2+k (the target's own greedy
token, the data being self-distilled), weighted ``decay**k``.

EAGLE: the layer reads (h_t, x_{t+1}) and must output h_{t+1}: smooth-L1 regression on the feature
(EAGLE-1 layout only; EAGLE-3 reads fc(fused target layers) and learns from tokens alone)
plus soft cross-entropy of ``lm_head(output)`` against the target's distribution at t+1, with
uniform noise on the input features (EAGLE's augmentation). Training-time test (EAGLE-3, in a
simplified form): the layer is unrolled ``unroll`` steps; at step i the input at row t is the
step-(i-1) prediction made at row t-1 (detached) with the true token x_{t+1}, and row t attends to
what the matching draft-tree node would see at inference: the teacher-forced rows up to t-i (the
committed prefix) and its own chain at rows t-i+1..t of steps 1..i. The earlier steps' inputs are
computed without gradients through a drafter KV store (one block each), then all steps run in one
differentiable forward.

Block (parallel drafting): after every row t come the drafter's ``block_depths - 1`` depth rows,
at positions pos_t + 1 .. ; depth row j of anchor t sees the teacher-forced rows up to t and the
depth rows of t before it, exactly what it sees at inference after a committed prefix ending at
t, and is scored (soft cross-entropy, weight ``step_decay**j``) against the target's distribution
of token t+2+j. All depths of all anchors run in one forward, with the same input noise as EAGLE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from selfspec.drafters.base import TrainableBlock, TrainableHeads, TrainableStep, VocabProjection


@dataclass(frozen=True)
class Pack:
    hidden: torch.Tensor  # [L, H] target hidden state at each row (h_t)
    tokens: torch.Tensor  # [L] int64 token at each row (x_t)
    seq: torch.Tensor  # [L] int64 sequence index within the pack
    pos: torch.Tensor  # [L] int64 position within its sequence
    length: torch.Tensor  # [L] int64 length of the row's sequence (as packed)
    prompt_len: torch.Tensor  # [L] int64 prompt length of the row's sequence
    fused: torch.Tensor | None = None  # [L, k*H] the fused target layers (EAGLE-3's input), when cached

    def to(self, device: torch.device) -> Pack:
        fields = (self.hidden, self.tokens, self.seq, self.pos, self.length, self.prompt_len)
        return Pack(*(t.to(device) for t in fields), None if self.fused is None else self.fused.to(device))

    def drafter_input(self, drafter: nn.Module) -> torch.Tensor:
        """What the drafter's root step reads: the last hidden state, or the fused layers (EAGLE-3)."""
        if tuple(drafter.feature_layers) == (-1,):
            return self.hidden
        if self.fused is None:
            raise ValueError(
                f"a {drafter.kind} drafter reads target layers {list(drafter.feature_layers)}, but these "
                "features were cached without them; capture them (the pipeline does for eagle3)"
            )
        return self.fused

    @property
    def rows(self) -> int:
        return int(self.tokens.shape[0])


def shifted(x: torch.Tensor, k: int, fill: float = 0) -> torch.Tensor:
    """Row t of the result is row t+k of ``x`` (``fill`` past the end). Callers mask rows whose
    t+k leaves the sequence."""
    if k == 0:
        return x
    pad = x.new_full((k, *x.shape[1:]), fill)
    return torch.cat([x[k:], pad])


def unroll_rows(pack: Pack, i: int, blocks: int) -> torch.Tensor:
    """``[L, blocks * L]`` bool: what the rows of unrolled step i attend to in steps 0..blocks-1.

    Row t of step i (a depth-i draft node whose committed prefix ends at row t-i) sees step 0 at
    rows s <= t - i and step j (1 <= j <= i) at row s == t - (i - j), always within its sequence."""
    rows = torch.arange(pack.rows, device=pack.seq.device)
    same = pack.seq[:, None] == pack.seq[None, :]  # [L, L]
    diff = rows[:, None] - rows[None, :]  # t - s
    parts = [
        same & (diff >= i) if j == 0 else same & (diff == i - j) if j <= i else torch.zeros_like(same)
        for j in range(blocks)
    ]
    return torch.cat(parts, dim=1)


def unroll_mask(pack: Pack, steps: int) -> torch.Tensor:
    """``[steps * L, steps * L]`` bool attention of the whole unrolled layer (step 0 = causal)."""
    return torch.cat([unroll_rows(pack, i, steps) for i in range(steps)], dim=0)


def block_mask(pack: Pack, depths: int) -> torch.Tensor:
    """``[depths * L, depths * L]`` bool attention of a block drafter's training forward: block 0
    holds the teacher-forced rows (causal within a sequence); row t of block j >= 1, the depth
    row j of anchor t, sees block-0 rows s <= t of its sequence and row t of blocks 1..j."""
    rows = torch.arange(pack.rows, device=pack.seq.device)
    causal = (pack.seq[:, None] == pack.seq[None, :]) & (rows[:, None] >= rows[None, :])  # [L, L]
    own = torch.eye(pack.rows, dtype=torch.bool, device=pack.seq.device)
    none = torch.zeros_like(causal)
    return torch.cat(
        [
            torch.cat([causal if i == 0 else own if 0 < i <= j else none for i in range(depths)], 1)
            for j in range(depths)
        ]
    )


def block_forward(drafter: TrainableBlock, pack: Pack, root: torch.Tensor, next_tokens: torch.Tensor):
    """All depth states of every anchor row in one forward: ``[block_depths, L, H]``; ``root`` is
    the lifted state of each row (with noise in training)."""
    k, n = drafter.block_depths, pack.rows
    rows = drafter.depth_input()  # [k - 1, W]
    x = torch.cat([drafter.context_input(root, next_tokens), *(r.expand(n, -1) for r in rows)])
    positions = torch.cat([pack.pos + j for j in range(k)])
    return drafter.step(x, positions, mask=block_mask(pack, k)).view(k, n, -1)


@torch.no_grad()
def unroll_no_grad(
    drafter: TrainableStep, pack: Pack, hidden: torch.Tensor, next_tokens: torch.Tensor, steps: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run the EAGLE layer ``steps`` unrolled steps without gradients, one block at a time through a
    drafter KV store. Returns the input features of steps 0..steps (``[L, H]`` each; step 0 is
    ``hidden``) and the outputs of steps 0..steps-1."""
    n = pack.rows
    store = drafter.begin(max(steps, 1) * n)
    inputs, outputs = [hidden], []  # hidden: the root step's state (EAGLE-3: already lifted by fc)
    for i in range(steps):
        x = drafter.step_input(inputs[i], next_tokens)
        out = drafter.step(x, pack.pos, store, offset=i * n, mask=unroll_rows(pack, i, i + 1))  # [L, H]
        prev = torch.cat(
            [out.new_zeros(1, out.shape[1]), out[:-1]]
        )  # row t <- the prediction made at row t-1
        inputs.append(prev * (pack.pos > 0)[:, None].to(prev.dtype))
        outputs.append(out)
    return inputs, outputs


class TargetReadout(VocabProjection):
    """The frozen target's logits over the draft vocabulary, ``[N, H] -> [N, Vd]`` in fp32: the
    drafter's own read-out without its LoRA (the same weights and row gather, one owner)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h.to(self.proj.weight.dtype)).float()


def draft_labels(tokens: torch.Tensor, target_to_draft: torch.Tensor | None) -> torch.Tensor:
    """Target token ids -> draft vocabulary indices (-100, ignored, where not in it)."""
    return tokens if target_to_draft is None else target_to_draft[tokens]


class MedusaObjective(nn.Module):
    def __init__(self, drafter: TrainableHeads, decay: float, target_to_draft: torch.Tensor | None):
        super().__init__()
        self.drafter, self.decay = drafter, decay
        self.register_buffer("t2d", target_to_draft, persistent=False)

    def forward(self, pack: Pack) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = self.drafter
        heads = d.depth_states(pack.hidden.to(next(d.parameters()).dtype))  # [L, K, H]
        loss, total, metrics = 0.0, 0.0, {}
        for k in range(heads.shape[1]):
            ahead = 2 + k
            labels = draft_labels(shifted(pack.tokens, ahead), self.t2d)
            valid = (pack.pos + ahead < pack.length) & (pack.pos + ahead >= pack.prompt_len) & (labels >= 0)
            logits = d.draft_logits(heads[valid, k]).float()  # [n, Vd]
            ce = F.cross_entropy(logits, labels[valid], reduction="sum")
            n = valid.sum()
            w = self.decay**k
            loss = loss + w * ce / n.clamp(min=1)
            total += w
            metrics[f"head{k}/loss_sum"] = ce.detach()
            metrics[f"head{k}/correct"] = (logits.argmax(-1) == labels[valid]).sum()
            metrics[f"head{k}/count"] = n
        return loss / total, metrics


class EagleObjective(nn.Module):
    def __init__(
        self,
        drafter: TrainableStep,
        readout: TargetReadout,
        unroll: int,
        feature_weight: float,
        token_weight: float,
        step_decay: float,
        loss_on_prompt: bool,
    ):
        super().__init__()
        self.drafter, self.readout = drafter, readout
        self.unroll, self.step_decay = unroll, step_decay
        self.feature_weight, self.token_weight = feature_weight, token_weight
        self.loss_on_prompt = loss_on_prompt

    def forward(self, pack: Pack, noise: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d, k, n = self.drafter, self.unroll, pack.rows
        dtype = next(d.parameters()).dtype
        hidden = pack.hidden.to(dtype)
        next_tokens = shifted(pack.tokens, 1)
        target_h = shifted(hidden, 1)  # h_{t+1}
        with torch.no_grad():
            target_p = self.readout(target_h).softmax(-1)  # [L, Vd] the target's distribution at t+1
        root = d.lift(
            pack.drafter_input(d).to(dtype) + noise.to(dtype)
        )  # EAGLE-3: fc(fused) keeps its gradient
        inputs, _ = unroll_no_grad(d, pack, root.detach(), next_tokens, k - 1)
        inputs[0] = root
        x = d.step_input(torch.cat(inputs), next_tokens.repeat(k))
        out = d.step(x, pack.pos.repeat(k), mask=unroll_mask(pack, k)).view(k, n, -1)  # [k, L, H]
        has_next = pack.pos + 1 < pack.length
        in_reply = (pack.pos + 2 >= pack.prompt_len) | self.loss_on_prompt
        loss, total, metrics = 0.0, 0.0, {}
        for i in range(k):
            valid = has_next & in_reply & (pack.pos >= i)
            cnt = valid.sum()
            if d.regresses_features:
                feat = (
                    F.smooth_l1_loss(out[i][valid].float(), target_h[valid].float(), reduction="none")
                    .mean(-1)
                    .sum()
                )
            else:  # EAGLE-3: its output is a state of its own, scored through the tokens only
                feat = out.new_zeros((), dtype=torch.float32)
            logp = d.draft_logits(out[i][valid]).float().log_softmax(-1)
            tok = -(target_p[valid] * logp).sum()
            w = self.step_decay**i
            loss = loss + w * (self.feature_weight * feat + self.token_weight * tok) / cnt.clamp(min=1)
            total += w
            metrics[f"step{i}/feature_loss_sum"] = feat.detach()
            metrics[f"step{i}/token_loss_sum"] = tok.detach()
            metrics[f"step{i}/correct"] = (logp.argmax(-1) == target_p[valid].argmax(-1)).sum()
            metrics[f"step{i}/count"] = cnt
        return loss / total, metrics


class BlockObjective(nn.Module):
    def __init__(
        self,
        drafter: TrainableBlock,
        readout: TargetReadout,
        token_weight: float,
        step_decay: float,
        loss_on_prompt: bool,
    ):
        super().__init__()
        self.drafter, self.readout = drafter, readout
        self.token_weight, self.step_decay, self.loss_on_prompt = token_weight, step_decay, loss_on_prompt

    def forward(self, pack: Pack, noise: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = self.drafter
        dtype = next(d.parameters()).dtype
        hidden = pack.hidden.to(dtype)
        root = d.lift(pack.drafter_input(d).to(dtype) + noise.to(dtype))
        out = block_forward(d, pack, root, shifted(pack.tokens, 1))  # [k, L, H]
        loss, total, metrics = 0.0, 0.0, {}
        for j in range(d.block_depths):
            ahead = 1 + j  # the target's state at t+1+j gives its distribution of token t+2+j
            valid = (pack.pos + ahead < pack.length) & (
                (pack.pos + ahead + 1 >= pack.prompt_len) | self.loss_on_prompt
            )
            cnt = valid.sum()
            with torch.no_grad():
                target_p = self.readout(shifted(hidden, ahead)[valid]).softmax(-1)  # [n, Vd]
            logp = d.draft_logits(out[j][valid]).float().log_softmax(-1)
            tok = -(target_p * logp).sum()
            w = self.step_decay**j
            loss = loss + w * self.token_weight * tok / cnt.clamp(min=1)
            total += w
            metrics[f"depth{j}/token_loss_sum"] = tok.detach()
            metrics[f"depth{j}/correct"] = (logp.argmax(-1) == target_p.argmax(-1)).sum()
            metrics[f"depth{j}/count"] = cnt
        return loss / total, metrics

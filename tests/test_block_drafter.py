"""The block drafter (every depth in one forward): what inference computes is what training
scores, its trees take depth d's candidates by rank, it trains, calibrates, and export refuses it."""

import pytest
import torch

import selfspec
from selfspec.training.calibration import CalibrationConfig, calibrate
from selfspec.training.exporter import BLOCK_REFUSAL, check_format
from selfspec.training.objectives import Pack, block_forward, block_mask, shifted
from tests.helpers import make_tiny, propose_once, randomized
from tests.test_training_trainer import greedy_sequences, trainer

torch.set_num_threads(1)


def _pack(ids: torch.Tensor, hidden: torch.Tensor) -> Pack:
    n = ids.numel()
    return Pack(
        hidden=hidden,
        tokens=ids,
        seq=torch.zeros(n, dtype=torch.long),
        pos=torch.arange(n),
        length=torch.full((n,), n),
        prompt_len=torch.zeros(n, dtype=torch.long),
    )


def test_block_mask_gives_each_depth_row_its_prefix_and_its_anchors_rows():
    pack = Pack(
        hidden=torch.zeros(5, 4),
        tokens=torch.zeros(5, dtype=torch.long),
        seq=torch.tensor([0, 0, 0, 1, 1]),
        pos=torch.tensor([0, 1, 2, 0, 1]),
        length=torch.tensor([3, 3, 3, 2, 2]),
        prompt_len=torch.zeros(5, dtype=torch.long),
    )
    m = block_mask(pack, 3).int()
    assert m[:5, :5].tolist() == [  # teacher-forced rows: causal within each sequence
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert m[:5, 5:].sum() == 0  # context rows never see depth rows
    # depth row 2 of anchor 1: context rows 0..1, depth rows 1 and 2 of anchor 1
    assert m[10 + 1].tolist() == [1, 1, 0, 0, 0] + [0, 1, 0, 0, 0] + [0, 1, 0, 0, 0]
    # depth row 1 of anchor 4 (sequence 1): context rows 3..4, itself
    assert m[5 + 4].tolist() == [0, 0, 0, 1, 1] + [0, 0, 0, 0, 1] + [0, 0, 0, 0, 0]


def test_incremental_drafting_computes_what_training_scores():
    """Branch oracle: the depth states propose() computes over its KV cache, call after call (a
    prompt, then accepted paths of different lengths), equal one teacher-forced training forward
    over the whole sequence at the same anchors."""
    model = make_tiny("llama")  # fp64
    drafter = randomized(selfspec.new_drafter("block", model, block_depths=4), seed=4, std=0.2)
    ids = torch.randint(0, 256, (14,), generator=torch.Generator().manual_seed(6))
    feats = selfspec.target_features(model, ids[None])
    fused = torch.cat([feats.layers[i][0] for i in drafter.feature_layers], -1)  # [14, 3H]
    nxt = shifted(ids, 1)
    state, got = drafter.begin(64), []
    with torch.no_grad():
        for lo, hi in [(0, 6), (6, 7), (7, 10), (10, 13)]:  # rows committed by each call
            got.append(drafter.block_states(state, fused[lo:hi], nxt[lo:hi]))
        full = block_forward(drafter, _pack(ids, feats.hidden[0]), drafter.lift(fused), nxt)  # [4, 14, H]
    for states, anchor in zip(got, [5, 6, 9, 12]):
        torch.testing.assert_close(states, full[:, anchor], atol=1e-10, rtol=1e-10)


def test_static_and_dynamic_trees_take_each_depths_candidates_by_rank(tiny_models):
    model = tiny_models("llama")
    drafter = randomized(selfspec.new_drafter("block", model, block_depths=3, tree_nodes=10), seed=7)
    prompt = torch.tensor([4, 8, 15, 16, 23])
    draft = propose_once(model, drafter, prompt)
    state = drafter.begin(64)
    from selfspec.hf import StoreCache, new_store, selfspec_attention, target_forward

    with torch.inference_mode(), selfspec_attention(model):
        out = target_forward(
            model, StoreCache(new_store(model, 64)), prompt, feature_layers=drafter.feature_layers
        )
        nxt = torch.cat([prompt[1:], out.logits[-1].argmax()[None]])
        top = drafter.top_candidates(drafter.block_states(state, out.hidden, nxt), 10)[1]  # [3, 10]
    tree = draft.tree
    for node in range(1, tree.size):
        assert int(draft.tokens[node]) == int(top[tree.depths[node] - 1, tree.ranks[node]])


def test_a_few_steps_lower_the_loss_and_calibration_installs_a_tree(tmp_path):
    peaked = make_tiny("llama", dtype=torch.float32, seed=2)
    with torch.no_grad():
        peaked.get_output_embeddings().weight.mul_(40)
    layers = selfspec.new_drafter("block", peaked).config.feature_layers
    seqs = greedy_sequences(peaked, layers)
    t = trainer(peaked, seqs, tmp_path, kind="block", steps=24, block_depths=3)
    losses = [float(t.train_step()["loss"]) for _ in range(24)]
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4, losses
    cal = calibrate(
        t.drafter, peaked, seqs[:4], CalibrationConfig(tree_nodes=6, depth=5, top_k=4, batch_tokens=96)
    )
    assert cal.acceptance.shape == (3, 4)  # measured to the drafter's 3 depths, not 5
    assert t.drafter.tree.size == 6 and t.drafter.tree.max_depth <= 3
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    out = selfspec.generate(peaked, ids, drafter=t.drafter, max_new_tokens=24, eos_token_id=[])
    ref = peaked.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("fmt", ["eagle", "eagle3", "medusa"])
def test_export_refuses_block_drafters(fmt):
    with pytest.raises(ValueError, match="kind block") as e:
        check_format("block", fmt)
    assert str(e.value) == BLOCK_REFUSAL

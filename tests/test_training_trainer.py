"""Trainers: losses go down, unrolled training matches inference drafting, checkpoints resume
bit-identically, seeds reproduce, calibration installs a tree, LoRA read-outs round-trip, W&B."""

import os
import re

import pytest
import torch

import selfspec
from selfspec.tracking import Run
from selfspec.training.calibration import CalibrationConfig, calibrate
from selfspec.training.features import Sequence
from selfspec.training.objectives import Pack, shifted, unroll_mask, unroll_no_grad
from selfspec.training.trainer import TrainConfig, Trainer, collate, trainable_state
from tests.helpers import make_tiny, propose_once, randomized

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def target():
    return make_tiny("llama", dtype=torch.float32, seed=2)


def greedy_sequences(target, layers=()):
    """The target's own greedy continuations of random prompts, with its hidden states (and the
    hidden states of ``layers``, for drafters that fuse several)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(12):
        prompt = torch.randint(0, 256, (6,), generator=g)
        ids = target.generate(
            prompt[None],
            max_new_tokens=26,
            do_sample=False,
            pad_token_id=0,
            attention_mask=torch.ones(1, 6, dtype=torch.long),
        )[0]
        feats = selfspec.target_features(target, ids[None])
        out.append(
            Sequence(
                id=f"s:{i}",
                ids=ids,
                hidden=feats.hidden[0].half(),
                prompt_len=6,
                layers=tuple(feats.layers[j][0].half() for j in layers),
            )
        )
    return out


@pytest.fixture(scope="module")
def sequences(target):
    return greedy_sequences(target)


@pytest.fixture(scope="module")
def peaked():
    """A tiny target whose next-token distributions are far from uniform (a random tiny model's are
    nearly flat, which leaves a token-only objective like EAGLE-3's nothing to learn)."""
    model = make_tiny("llama", dtype=torch.float32, seed=2)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)
    return model


@pytest.fixture(scope="module")
def sequences3(peaked):
    """The peaked target's sequences with the target layers an EAGLE-3 drafter fuses."""
    return greedy_sequences(peaked, selfspec.new_drafter("eagle3", peaked).config.feature_layers)


def config(kind, **kw):
    base = dict(
        kind=kind,
        steps=8,
        batch_tokens=96,
        lr=3e-3,
        warmup_steps=2,
        log_every=4,
        checkpoint_every=4,
        max_param_fraction=0,
        tau_prompts=0,
        medusa_heads=3,
        unroll=2,
    )
    return TrainConfig(**{**base, **kw})


def trainer(target, sequences, tmp_path, **kw):
    kind = kw.pop("kind", "eagle")
    return Trainer(target, sequences, config(kind, **kw), tmp_path, wandb_mode="disabled")


# ------------------------------------------------------------------------------- learning
@pytest.mark.parametrize(
    "kind, extra",
    [
        ("medusa", {"lr": 2e-2}),
        ("eagle", {}),
        ("eagle", {"unroll": 3}),
        ("eagle", {"draft_vocab_size": 64, "lora_rank": 4}),
    ],
)
def test_a_few_steps_lower_the_loss(target, sequences, tmp_path, kind, extra):
    t = trainer(target, sequences, tmp_path, kind=kind, steps=24, **extra)
    losses = [float(t.train_step()["loss"]) for _ in range(24)]
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4, losses


@pytest.mark.parametrize("extra", [{}, {"draft_vocab_size": 64}])
def test_eagle3_a_few_steps_lower_the_loss(peaked, sequences3, tmp_path, extra):
    t = trainer(peaked, sequences3, tmp_path, kind="eagle3", steps=24, **extra)
    fc = t.drafter.fc.weight.detach().clone()
    losses = [float(t.train_step()["loss"]) for _ in range(24)]
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4, losses
    assert not torch.equal(fc, t.drafter.fc.weight)  # the fusion layer learns too


def test_eagle3_without_fused_features_is_refused(target, sequences, tmp_path):
    t = trainer(target, sequences, tmp_path, kind="eagle3")
    with pytest.raises(ValueError, match=r"reads target layers \[2, 1, 0\].*cached without them"):
        t.train_step()


def test_target_stays_frozen(target, sequences, tmp_path):
    before = {k: v.clone() for k, v in target.state_dict().items()}
    t = trainer(target, sequences, tmp_path, draft_vocab_size=64, lora_rank=4)
    for _ in range(3):
        t.train_step()
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


# ------------------------------------------------------------------ training-time test
def test_unroll_mask_gives_each_node_its_prefix_and_chain():
    pack = Pack(
        hidden=torch.zeros(5, 4),
        tokens=torch.zeros(5, dtype=torch.long),
        seq=torch.tensor([0, 0, 0, 1, 1]),
        pos=torch.tensor([0, 1, 2, 0, 1]),
        length=torch.tensor([3, 3, 3, 2, 2]),
        prompt_len=torch.zeros(5, dtype=torch.long),
    )
    m = unroll_mask(pack, 2).int()
    # step 1, row 2 (sequence 0): step-0 rows <= 1, step-1 row 2 only
    assert m[5 + 2].tolist() == [1, 1, 0, 0, 0, 0, 0, 1, 0, 0]
    # step 1, row 3 (first of sequence 1): nothing of step 0, itself in step 1
    assert m[5 + 3].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    assert m[:5, 5:].sum() == 0  # step 0 never sees later steps


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_unrolled_training_matches_inference_drafting(kind):
    """Step i of the unrolled layer at row p+i computes exactly the depth-(i+1) feature that
    propose() computes for a chain whose tokens are the drafter's own top-1 choices."""
    model = make_tiny("llama")  # fp64
    drafter = randomized(selfspec.new_drafter(kind, model), seed=4, std=0.2)
    prompt = torch.tensor([5, 9, 2, 7, 3])
    tree = selfspec.chain(3)
    from selfspec.hf import StoreCache, new_store, selfspec_attention, target_forward

    with torch.inference_mode(), selfspec_attention(model):
        cache = StoreCache(new_store(model, 64))
        out = target_forward(model, cache, prompt, feature_layers=drafter.feature_layers)
        bonus = out.logits[-1].argmax()[None]
        draft = drafter.propose(drafter.begin(64), out.hidden, torch.cat([prompt[1:], bonus]), tree)
    ids = torch.cat([prompt, draft.tokens])  # prompt, bonus, d1, d2, d3
    hidden = torch.cat(
        [out.hidden, torch.zeros(4, out.hidden.shape[1], dtype=out.hidden.dtype)]
    )  # rows > p unused
    n, p = ids.numel(), prompt.numel() - 1
    pack = Pack(
        hidden=hidden,
        tokens=ids,
        seq=torch.zeros(n, dtype=torch.long),
        pos=torch.arange(n),
        length=torch.full((n,), n),
        prompt_len=torch.zeros(n, dtype=torch.long),
    )
    with torch.no_grad():
        _, outputs = unroll_no_grad(drafter, pack, drafter.lift(hidden), shifted(ids, 1), 3)
    for i in range(3):
        assert int(drafter.lm_head(outputs[i][p + i : p + i + 1]).argmax()) == int(draft.tokens[i + 1])


def test_blockwise_no_grad_unroll_equals_the_one_pass_forward(target, sequences):
    drafter = randomized(selfspec.new_drafter("eagle", target), seed=1, std=0.1)
    pack = collate(sequences, [0, 1, 2], 200)
    nxt = shifted(pack.tokens, 1)
    inputs, outputs = unroll_no_grad(drafter, pack, pack.hidden.float(), nxt, 3)
    x = drafter.step_input(torch.cat(inputs[:3]), nxt.repeat(3))
    full = drafter.step(x, pack.pos.repeat(3), mask=unroll_mask(pack, 3)).view(3, pack.rows, -1)
    for i in range(3):
        torch.testing.assert_close(full[i], outputs[i], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize(
    "kind, extra", [("medusa", {}), ("eagle", {"lora_rank": 4, "lora_dropout": 0.1, "draft_vocab_size": 64})]
)
def test_kill_and_resume_is_bit_identical(target, sequences, tmp_path, kind, extra):
    straight = trainer(target, sequences, tmp_path / "a", kind=kind, **extra)
    straight.train()
    killed = trainer(target, sequences, tmp_path / "b", kind=kind, **extra)
    for _ in range(4):
        killed.train_step()
    killed.save_checkpoint()  # what the loop does at checkpoint_every=4
    killed.train_step()  # progress after the checkpoint is lost with the kill
    del killed
    resumed = trainer(target, sequences, tmp_path / "b", kind=kind, **extra)
    assert resumed.load_checkpoint() and resumed.step == 4
    resumed.train()
    a, b = trainable_state(straight.drafter), trainable_state(resumed.drafter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.optimizer.state_dict()["state"].keys() == resumed.optimizer.state_dict()["state"].keys()


def test_resume_refuses_changed_settings(target, sequences, tmp_path):
    t = trainer(target, sequences, tmp_path, steps=4)
    t.train()
    other = trainer(target, sequences, tmp_path, steps=8, lr=1e-2)
    with pytest.raises(ValueError, match="trained with lr=0.003, not 0.01"):
        other.load_checkpoint()
    longer = trainer(target, sequences, tmp_path, steps=8)  # more steps is a valid resume
    assert longer.load_checkpoint() and longer.step == 4


def test_checkpoints_are_pruned_and_atomic(target, sequences, tmp_path):
    trainer(target, sequences, tmp_path, steps=12, keep_checkpoints=2).train()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-0000008", "step-0000012"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-0000012"


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_same_seed_same_result(target, sequences, tmp_path, kind):
    runs = [trainer(target, sequences, tmp_path / str(i), kind=kind, seed=s) for i, s in enumerate([1, 1, 2])]
    for r in runs:
        r.train()
    a, b, c = (trainable_state(r.drafter) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------- calibration, LoRA, W&B
def test_calibration_installs_the_best_tree(target, sequences, tmp_path):
    t = trainer(target, sequences, tmp_path, steps=6)
    t.train()
    cal = calibrate(
        t.drafter, target, sequences[:4], CalibrationConfig(tree_nodes=6, depth=3, top_k=4, batch_tokens=96)
    )
    assert cal.acceptance.shape == (3, 4) and bool((cal.acceptance.sum(-1) <= 1 + 1e-9).all())
    assert len(cal.paths) == 5 and t.drafter.config.tree == cal.paths and t.drafter.tree.size == 6
    # tree="auto" reads the measured acceptance from the saved config, not a prior
    assert torch.tensor(t.drafter.config.acceptance, dtype=torch.float64).allclose(cal.acceptance, atol=1e-6)
    t.drafter.save_pretrained(tmp_path / "d")
    loaded = selfspec.load_drafter(tmp_path / "d", target)
    assert (
        loaded.tree.paths() == t.drafter.tree.paths()
        and loaded.config.acceptance == t.drafter.config.acceptance
    )


@pytest.mark.parametrize("vocab", [0, 64])
def test_lora_readout_save_load_gives_same_proposals(target, sequences, tmp_path, vocab):
    t = trainer(target, sequences, tmp_path, steps=3, lora_rank=4, draft_vocab_size=vocab, lr=5e-2)
    t.train()
    lora = [n for n, p in t.drafter.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for n, p in t.drafter.named_parameters() if "lora_B" in n)
    t.drafter.save_pretrained(tmp_path / "d")
    files = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors"} <= set(
        files
    )
    loaded = selfspec.load_drafter(tmp_path / "d", target)
    prompt = sequences[0].ids[:8]
    a = propose_once(target, t.drafter.eval(), prompt)
    b = propose_once(target, loaded, prompt)
    assert torch.equal(a.tokens, b.tokens)
    assert loaded.num_parameters_own() == t.drafter.num_parameters_own()


def test_parameter_budget_is_enforced(target, sequences, tmp_path):
    with pytest.raises(ValueError, match=r"owns .* parameters, .* of the target's .* \(limit 5%\)"):
        trainer(target, sequences, tmp_path, max_param_fraction=0.05)


def test_wandb_offline_writes_locally_and_disabled_does_nothing(target, sequences, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = Trainer(target, sequences, config("medusa", steps=4), tmp_path / "w", wandb_mode="offline")
    t.train()
    hint = t.tracker.finish()
    assert hint.startswith("wandb sync ") and str(tmp_path / "wb") in hint
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    off = Run("disabled", "p", tmp_path, {}, job_type="train", name="t")
    assert off.run is None and off.finish() is None
    with pytest.raises(ValueError, match="unknown W&B mode 'cloud'"):
        Run("cloud", "p", tmp_path, {}, job_type="train", name="t")


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(kind="lstm"), "unknown drafter kind 'lstm'"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(lr=-1.0), "lr must be a positive number"),
        (dict(head_decay=1.5), r"head_decay must be in \[0, 1\]"),
        (dict(noise=-0.1), "noise must be >= 0"),
        (dict(feature_weight=0.0, token_weight=0.0), "nothing to learn"),
        (dict(draft_vocab_size=-1), "draft_vocab_size must be >= 0"),
    ],
)
def test_bad_train_config(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw)


def test_draft_vocab_larger_than_target_is_refused(target, sequences, tmp_path):
    with pytest.raises(ValueError, match=r"draft_vocab_size must be in \[0, vocab_size=256\]"):
        trainer(target, sequences, tmp_path, draft_vocab_size=1000)


def test_wandb_offline_needs_no_network_and_a_resumed_job_continues_its_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_ERROR_REPORTING", raising=False)
    first = Run("offline", "p", tmp_path / "job", {"a": 1}, job_type="train", name="t")
    assert os.environ["WANDB_ERROR_REPORTING"] == "false" and os.environ["WANDB_MODE"] == "offline"
    run_id = first.run_id
    first.log({"loss": 1.0}, step=1)
    first.finish()
    resumed = Run("offline", "p", tmp_path / "job", {"a": 1}, job_type="train", name="t", resume=True)
    fresh = Run("offline", "p", tmp_path / "job2", {"a": 1}, job_type="train", name="t", resume=True)
    assert resumed.run_id == run_id and fresh.run_id != run_id
    fresh_id = fresh.run_id
    resumed.finish()
    fresh.finish()
    assert (tmp_path / "job" / "wandb_run_id").read_text().strip() == run_id
    ids = [
        re.fullmatch(r"offline-run-\d+_\d+-([0-9a-f]+)(-\d+)?", p.name)
        for p in (tmp_path / "wb" / "wandb").glob("offline-run-*")
    ]
    assert sorted(m.group(1) for m in ids) == sorted([run_id, run_id, fresh_id])  # two local parts of one run

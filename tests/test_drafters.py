"""Drafters: creation, proposals, save/load round trip, and refusals with clear messages."""

import json

import pytest
import torch

import selfspec
from selfspec.drafters import EagleDrafter, MedusaDrafter
from tests.helpers import make_tiny, propose_once, randomized


@pytest.mark.parametrize("kind, cls", [("medusa", MedusaDrafter), ("eagle", EagleDrafter)])
def test_new_drafter_shapes_and_size(tiny_models, kind, cls):
    model = tiny_models("llama")
    drafter = selfspec.new_drafter(kind, model)
    assert isinstance(drafter, cls)
    names = [n for n, _ in drafter.named_parameters()]
    assert not any("embed" in n or "lm_head" in n for n in names)  # shared modules are not owned
    assert next(drafter.parameters()).dtype == model.dtype
    draft = propose_once(model, randomized(drafter), torch.tensor([1, 2, 3, 4]))
    assert draft.tokens.shape == (drafter.tree.size,)
    assert int(draft.tokens.min()) >= 0 and int(draft.tokens.max()) < model.config.vocab_size


@pytest.mark.parametrize("kind", ["medusa", "eagle", "eagle3", "block"])
def test_save_load_gives_same_proposals(tiny_models, tmp_path, kind):
    model = tiny_models("qwen2")
    drafter = randomized(selfspec.new_drafter(kind, model, tree_nodes=12), seed=5)
    drafter.save_pretrained(tmp_path / "d")
    loaded = selfspec.load_drafter(tmp_path / "d", model)
    assert type(loaded) is type(drafter) and loaded.config == drafter.config
    prompt = torch.tensor([9, 8, 7, 6, 5])
    a, b = propose_once(model, drafter, prompt), propose_once(model, loaded, prompt)
    assert torch.equal(a.tokens, b.tokens)
    for (n1, p1), (n2, p2) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_config_written_with_the_old_layer_name_loads(tiny_models, tmp_path):
    """EAGLE-3 drafters saved before the rename wrote ``fuse_layers``; they keep loading."""
    model = tiny_models("llama")
    drafter = randomized(selfspec.new_drafter("eagle3", model, feature_layers=[1, 0, 2]), seed=4)
    drafter.save_pretrained(tmp_path / "d")
    path = tmp_path / "d" / "config.json"
    meta = json.loads(path.read_text())
    meta["fuse_layers"] = meta.pop("feature_layers")
    path.write_text(json.dumps(meta))
    loaded = selfspec.load_drafter(tmp_path / "d", model)
    assert loaded.feature_layers == (1, 0, 2) and loaded.config == drafter.config


def test_save_replaces_atomically(tiny_models, tmp_path):
    model = tiny_models("llama")
    first = randomized(selfspec.new_drafter("medusa", model), seed=1)
    second = randomized(selfspec.new_drafter("medusa", model), seed=2)
    first.save_pretrained(tmp_path / "d")
    second.save_pretrained(tmp_path / "d")
    loaded = selfspec.load_drafter(tmp_path / "d", model)
    assert torch.equal(loaded.heads[0][0].linear.weight, second.heads[0][0].linear.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp dirs left behind


@pytest.mark.parametrize(
    "other, field",
    [
        (dict(hidden_size=32), "hidden_size"),
        (dict(vocab_size=300), "vocab_size"),
    ],
)
def test_mismatched_target_is_refused(tmp_path, other, field):
    model = make_tiny("llama")
    selfspec.new_drafter("eagle", model).save_pretrained(tmp_path / "d")
    config = model.config.to_dict()
    config.update(other)
    other_model = type(model)(type(model.config).from_dict(config)).double()
    with pytest.raises(ValueError, match=rf"{field}=.*but the target has {field}="):
        selfspec.load_drafter(tmp_path / "d", other_model)


def test_other_architecture_is_refused(tiny_models, tmp_path):
    selfspec.new_drafter("medusa", tiny_models("llama")).save_pretrained(tmp_path / "d")
    with pytest.raises(
        ValueError,
        match="target_architecture='LlamaForCausalLM' but the target has target_architecture='Qwen2ForCausalLM'",
    ):
        selfspec.load_drafter(tmp_path / "d", tiny_models("qwen2"))


def test_missing_and_corrupt_files(tiny_models, tmp_path):
    model = tiny_models("llama")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        selfspec.load_drafter(tmp_path / "nope", model)
    d = tmp_path / "d"
    selfspec.new_drafter("medusa", model).save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        selfspec.load_drafter(d, model)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        selfspec.load_drafter(d, model)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        selfspec.load_drafter(d, model)
    (d / "config.json").write_text(json.dumps({"kind": "wizard", "hidden_size": 64, "vocab_size": 256}))
    with pytest.raises(ValueError, match="unknown kind 'wizard'"):
        selfspec.load_drafter(d, model)


def test_weights_that_do_not_fit_config(tiny_models, tmp_path):
    model = tiny_models("llama")
    selfspec.new_drafter("medusa", model, num_heads=2).save_pretrained(tmp_path / "a")
    selfspec.new_drafter("medusa", model, num_heads=3).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").replace(tmp_path / "b" / "model.safetensors")
    with pytest.raises(ValueError, match="does not match the drafter"):
        selfspec.load_drafter(tmp_path / "b", model)


@pytest.mark.parametrize(
    "kind, options, message",
    [
        ("wizard", {}, "unknown drafter kind"),
        ("medusa", {"heads": 3}, "unknown medusa drafter option"),
        ("medusa", {"num_heads": 0}, "num_heads and num_layers must be >= 1"),
        ("eagle", {"num_heads": 3, "num_kv_heads": 2}, "multiple of num_kv_heads"),
        ("eagle", {"tree": [[0, 1]]}, "needs its parent"),
        ("block", {"block_depths": 0}, "block_depths must be >= 1"),
    ],
)
def test_bad_drafter_options(tiny_models, kind, options, message):
    with pytest.raises(ValueError, match=message):
        selfspec.new_drafter(kind, tiny_models("llama"), **options)


def test_medusa_tree_deeper_than_heads_is_refused(tiny_models):
    model = tiny_models("llama")
    drafter = selfspec.new_drafter("medusa", model, num_heads=2)
    with pytest.raises(ValueError, match="exceeds the 2 Medusa heads"):
        selfspec.generate(
            model, torch.tensor([[1, 2]]), drafter=drafter, tree=selfspec.chain(3), max_new_tokens=4
        )


def test_untrained_medusa_heads_start_as_identity(tiny_models):
    """Zero-initialised residual blocks: every head reproduces the target's own next token."""
    model = tiny_models("llama")
    draft = propose_once(model, selfspec.new_drafter("medusa", model), torch.tensor([3, 1, 4, 1, 5]))
    top1 = draft.tokens[draft.tree.ranks == 0]
    assert bool((top1 == draft.tokens[0]).all())


def test_each_kind_offers_the_training_protocol_its_objective_uses(tiny_models):
    """Training reads a drafter only through TrainableHeads / TrainableStep / TrainableBlock (and
    the base's read-out); each kind offers exactly one of them."""
    from selfspec.drafters import KINDS, TrainableBlock, TrainableHeads, TrainableStep

    model = tiny_models("llama")
    want = {
        "medusa": TrainableHeads,
        "eagle": TrainableStep,
        "eagle3": TrainableStep,
        "block": TrainableBlock,
    }
    assert set(want) == set(KINDS)
    for kind, protocol in want.items():
        drafter = selfspec.new_drafter(kind, model)
        offered = [p for p in (TrainableHeads, TrainableStep, TrainableBlock) if isinstance(drafter, p)]
        assert offered == [protocol], kind

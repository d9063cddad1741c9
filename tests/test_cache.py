"""KV store invariants: after commit, the cache equals the one a plain decode of the kept tokens builds."""

import pytest
import torch

import selfspec
from selfspec.cache import KVStore
from selfspec.hf import StoreCache, TreeMask, new_store, selfspec_attention, target_forward
from selfspec.tree import build_tree


def test_write_and_overflow():
    store = KVStore(num_layers=2, num_kv_heads=1, head_dim=4, max_len=5, dtype=torch.float32, device="cpu")
    k = torch.ones(1, 1, 3, 4)
    keys, values = store.write(1, k, 2 * k)
    assert keys.shape == (1, 1, 3, 4) and values[0, 0, 2, 0] == 2
    store.commit(torch.arange(3))
    assert store.length == 3
    with pytest.raises(RuntimeError, match="KV cache overflow"):
        store.write(0, torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4))


@pytest.mark.parametrize("path", [[0], [0, 1, 2], [0, 2], [0, 2, 5], [0, 3, 4, 6]])
def test_commit_moves_rows_for_all_layers(path):
    store = KVStore(num_layers=3, num_kv_heads=2, head_dim=4, max_len=16, dtype=torch.float32, device="cpu")
    store.kv.copy_(torch.randn_like(store.kv))
    store.length = 4
    before = store.kv.clone()
    store.commit(torch.tensor(path))
    assert store.length == 4 + len(path)
    for i, node in enumerate(path):
        assert torch.equal(store.kv[:, :, :, :, 4 + i], before[:, :, :, :, 4 + node])
    assert torch.equal(store.kv[:, :, :, :, :4], before[:, :, :, :, :4])  # the prefix is untouched


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tree_step_commit_equals_plain_decode_cache(tiny_models, arch):
    """Verify a tree, keep a path that skips nodes, and compare the cache with one built by
    feeding the kept tokens one by one."""
    model = tiny_models(arch)
    prompt = torch.tensor([5, 17, 99, 3, 42])
    tree = build_tree([(0,), (1,), (2,), (1, 0), (1, 1), (1, 1, 0), (2, 0)])
    tokens = torch.tensor([7, 11, 13, 19, 23, 29, 31, 37])
    path = tree.ancestor_mask[6].nonzero().flatten()  # root -> (1,) -> (1, 1) -> (1, 1, 0): nodes 0, 2, 5, 6
    with torch.inference_mode(), selfspec_attention(model):
        cache = StoreCache(new_store(model, 32))
        target_forward(model, cache, prompt)
        cache.store.commit(torch.arange(5))
        verify = target_forward(model, cache, tokens, tree.depths, TreeMask(tree.ancestor_mask, "torch"))
        cache.store.commit(path)

        plain = StoreCache(new_store(model, 32))
        target_forward(model, plain, prompt)
        plain.store.commit(torch.arange(5))
        for tok in tokens[path]:
            step = target_forward(model, plain, tok[None])
            plain.store.commit(torch.arange(1))
    n = cache.store.length
    assert n == plain.store.length == 5 + len(path)
    torch.testing.assert_close(cache.store.kv[..., :n, :], plain.store.kv[..., :n, :], rtol=1e-10, atol=1e-10)
    # and the tree node's logits equal the plain decode's at the same token
    torch.testing.assert_close(verify.logits[6], step.logits[0], rtol=1e-10, atol=1e-10)


def test_truncate():
    store = KVStore(1, 1, 2, 8, torch.float32, "cpu")
    store.commit(torch.arange(5))
    store.truncate(2)
    assert store.length == 2
    with pytest.raises(ValueError):
        store.truncate(3)


def test_store_sized_from_model(tiny_models):
    model = tiny_models("llama")
    store = new_store(model, 10)
    assert store.kv.shape == (2, 2, 1, 2, 10, 16) and store.kv.dtype == model.dtype
    assert selfspec.generate  # public API importable alongside

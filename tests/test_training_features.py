"""Feature capture: the exact hidden state generate() hands drafters, bounded, resumable."""

import pytest
import torch

import selfspec
from selfspec.training.features import FeatureConfig, capture, load
from tests.helpers import make_tiny

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", dtype=torch.float32, seed=1)


def items(n=6, length=10):
    g = torch.Generator().manual_seed(0)
    return [(f"s:{i}", torch.randint(0, 256, (length + i,), generator=g).tolist(), 3) for i in range(n)]


def test_capture_stores_the_last_hidden_state_in_fp16(model, tmp_path):
    report = capture(model, items(), tmp_path, FeatureConfig(batch_tokens=40))
    seqs = load(tmp_path)
    assert sorted(s.id for s in seqs) == [f"s:{i}" for i in range(6)]
    for s in seqs:
        ref = selfspec.target_features(model, s.ids[None]).hidden[0]
        assert s.hidden.dtype == torch.float16 and s.hidden.shape == (s.ids.numel(), 64) and s.prompt_len == 3
        torch.testing.assert_close(s.hidden.float(), ref, atol=2e-3, rtol=2e-3)  # fp16 storage rounding
    assert report.tokens == sum(len(i[1]) for i in items()) and report.sequences == 6
    assert report.bytes_on_disk == sum(p.stat().st_size for p in tmp_path.glob("shard-*"))
    assert report.bytes_on_disk < report.tokens * 64 * 2 * 1.2  # ~2 bytes per value, plus ids and index


def test_token_budget_and_truncation_bound_the_cache(model, tmp_path):
    report = capture(model, items(), tmp_path, FeatureConfig(max_tokens=40, max_seq_len=12))
    assert report.tokens <= 40 and report.dropped_over_budget > 0 and report.truncated > 0
    assert all(s.ids.numel() <= 12 for s in load(tmp_path))


def test_resume_captures_only_what_is_missing(model, tmp_path):
    cfg = FeatureConfig(shard_tokens=20)
    capture(model, items(3), tmp_path, cfg)
    report = capture(model, items(6), tmp_path, cfg)
    assert report.cached_tokens == sum(len(i[1]) for i in items(3)) and report.sequences == 6
    assert len({s.id for s in load(tmp_path)}) == 6


def test_feature_layers_for_fusion(model, tmp_path):
    capture(model, items(2), tmp_path, FeatureConfig(feature_layers=[0, 1]))
    s = load(tmp_path, feature_layers=[0, 1])[0]
    ref = selfspec.target_features(model, s.ids[None]).layers
    assert len(s.layers) == 2
    torch.testing.assert_close(s.layers[1].float(), ref[1][0], atol=2e-3, rtol=2e-3)


def test_cache_written_with_the_old_layer_name_is_reused(model, tmp_path):
    import json

    capture(model, items(2), tmp_path, FeatureConfig(feature_layers=[1]))
    path = tmp_path / "features.json"
    settings = json.loads(path.read_text())
    settings["extra_layers"] = settings.pop("feature_layers")  # as written before the rename
    path.write_text(json.dumps(settings))
    report = capture(model, items(2), tmp_path, FeatureConfig(feature_layers=[1]))
    assert report.cached_tokens == sum(len(i[1]) for i in items(2))
    with pytest.raises(ValueError, match="captured with"):
        capture(model, items(2), tmp_path, FeatureConfig(feature_layers=[0]))


def test_a_cache_with_more_layers_serves_a_run_asking_for_fewer(model, tmp_path):
    # An EAGLE-3 run's cache (fused layers) reused by an EAGLE-1 run (the last state only): shards
    # added later keep every cached layer, so the cache stays whole for either kind.
    capture(model, items(2), tmp_path, FeatureConfig(feature_layers=[0, 1]))
    report = capture(model, items(4), tmp_path, FeatureConfig(feature_layers=[]))
    assert report.cached_tokens == sum(len(i[1]) for i in items(2)) and report.sequences == 4
    for s in load(tmp_path, feature_layers=[0, 1]):  # the new shards hold both layers too
        ref = selfspec.target_features(model, s.ids[None]).layers
        torch.testing.assert_close(s.layers[0].float(), ref[0][0], atol=2e-3, rtol=2e-3)
    assert [len(s.layers) for s in load(tmp_path, feature_layers=[1])] == [1] * 4
    with pytest.raises(ValueError, match="captured with"):  # a layer the cache lacks
        capture(model, items(4), tmp_path, FeatureConfig(feature_layers=[2]))


def test_other_settings_are_refused(model, tmp_path):
    capture(model, items(2), tmp_path, FeatureConfig())
    with pytest.raises(ValueError, match="captured with"):
        capture(model, items(2), tmp_path, FeatureConfig(dtype="float32"))


def test_empty_cache_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no cached features"):
        load(tmp_path)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(dtype="int8"), "feature dtype must be one of"),
        (dict(max_tokens=0), "max_tokens must be >= 2"),
    ],
)
def test_bad_feature_config(kw, message):
    with pytest.raises(ValueError, match=message):
        FeatureConfig(**kw)

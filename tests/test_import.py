"""Import gives the same logits as the source model (tiny HF folder, and the real embedded GGUF)."""
import pytest
import torch

from flexigpt.model import importer as mi
from helpers import save_tiny_model_dir


def test_hf_folder_import_roundtrip(tmp_path, tiny_llama, tokens):
    src = mi.resolve_source(str(save_tiny_model_dir(tmp_path / "src", tiny_llama)))
    assert src.kind == "hf_dir"
    model, tok = mi.load_source(src)
    mi.save_plain(model, tok, tmp_path / "out")
    back, _ = mi.load_plain(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(tiny_llama(tokens).logits, back(tokens).logits)
    assert mi.model_stats(back)["num_blocks"] == 6


def test_rebuild_plain_keeps_tied_embeddings(tiny_llama, tokens):
    plain = mi.rebuild_plain(tiny_llama)
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(tiny_llama(tokens).logits, plain(tokens).logits)


def test_hub_id_refused_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(mi.FlexiError, match="HF_HUB_OFFLINE"):
        mi.resolve_source("HuggingFaceTB/SmolLM2-135M")


@pytest.mark.e2e
def test_embedded_gguf_import_gives_identical_logits(tmp_path):
    """The rebuilt plain model (and its saved copy) reproduce the GGUF-loaded model's logits exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = mi.resolve_source("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(src.path.parent, gguf_file=src.path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.path.parent, gguf_file=src.path.name,
                                                      dtype=torch.float32).eval()
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = gguf_model(ids).logits
        plain = mi.rebuild_plain(gguf_model)
        assert torch.equal(plain(ids).logits, ref)
        mi.save_plain(plain, tok, tmp_path / "out")
        back, _ = mi.load_plain(tmp_path / "out")
        assert torch.equal(back(ids).logits, ref)
    assert mi.model_stats(back) == {"params": 134515008, "num_blocks": 30, "hidden_size": 576}

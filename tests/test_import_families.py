"""``import_model`` across model families: every GGUF family transformers' GGUF loader reads (tiny files
written by ``gguf_tiny``) and HF folders of every supported family give the logits of loading the same
source directly with transformers; unknown, encoder-decoder and GGUF-unloadable sources are refused
before any weights are read."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from flexigpt.errors import FlexiError
from flexigpt.model import importer as mi
from families import BY_NAME, DEPTH, FAMILIES, VOCAB, make_model
from helpers import WORDS
from gguf_tiny import BLOCKS, GGUF_ARCH, WRITABLE, tiny_model, vocab_size, write_foreign_gguf, write_tiny_gguf

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "the quick brown fox jumps over the lazy dog in the hat"
CLOSE = dict(rtol=1e-5, atol=1e-6)  # float32 on one thread: the same weights give the same logits


def ids_batch(vocab: int) -> torch.Tensor:
    """Two rows of random token ids (padding-free, so no attention mask is involved)."""
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(1))


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---------------------------------------------------------------------------------------------
# GGUF sources
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    """One tiny GGUF per writable family, each alone in its folder (transformers loads folder + file name)."""
    root = tmp_path_factory.mktemp("gguf")
    for model_type in WRITABLE:
        write_tiny_gguf(model_type, root / model_type / f"tiny-{model_type}.gguf")
    return root


def gguf_path(gguf_dir: Path, model_type: str) -> Path:
    return gguf_dir / model_type / f"tiny-{model_type}.gguf"


def load_gguf_direct(path: Path) -> tuple[Any, Any]:
    """The reference: transformers' own GGUF load of the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("model_type", WRITABLE)
def test_tiny_gguf_loads_as_the_model_it_was_written_from(gguf_dir, model_type):
    """The writer itself: transformers reads the file back into the random model it came from."""
    model, tok = load_gguf_direct(gguf_path(gguf_dir, model_type))
    ids = ids_batch(vocab_size(model_type))
    got = logits(model, ids)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, logits(tiny_model(model_type), ids), **CLOSE)
    ids_text = tok(TEXT)["input_ids"]
    assert tok.decode(ids_text, skip_special_tokens=True) == TEXT and max(ids_text) < vocab_size(model_type)


@pytest.fixture(scope="module")
def gguf_imports(gguf_dir, tmp_path_factory) -> dict[str, tuple[Path, dict | BaseException]]:
    """``import_model`` of every tiny GGUF, once: model_type -> (out folder, metrics or the error raised)."""
    out_root = tmp_path_factory.mktemp("gguf_imported")
    done: dict[str, tuple[Path, dict | BaseException]] = {}
    for model_type in WRITABLE:
        out = out_root / model_type
        try:
            done[model_type] = (out, mi.import_model(mi.ModelSettings(source=str(gguf_path(gguf_dir, model_type)),
                                                                      dtype="float32"), out))
        except Exception as e:  # noqa: BLE001  (reported by the test of that family)
            done[model_type] = (out, e)
    return done


def imported(results: dict[str, tuple[Path, dict | BaseException]], key: str) -> tuple[Path, dict]:
    out, metrics = results[key]
    if isinstance(metrics, BaseException):
        raise metrics
    return out, metrics


@pytest.mark.parametrize("model_type", WRITABLE)
def test_gguf_import_gives_the_logits_of_transformers_gguf_load(gguf_dir, gguf_imports, model_type):
    from gguf import GGUFReader

    path = gguf_path(gguf_dir, model_type)
    out, metrics = imported(gguf_imports, model_type)
    ref, ref_tok = load_gguf_direct(path)
    back, tok = mi.load_plain(out)
    ids = ids_batch(vocab_size(model_type))
    torch.testing.assert_close(logits(back, ids), logits(ref, ids), **CLOSE)
    assert tok(TEXT)["input_ids"] == ref_tok(TEXT)["input_ids"]  # the tokenizer survives the import too
    arch = GGUF_ARCH[model_type][0]
    assert metrics["num_blocks"] == int(GGUFReader(str(path)).fields[f"{arch}.block_count"].contents()) == BLOCKS
    assert metrics["source_kind"] == "gguf" and metrics["source_sha256"]


# ---------------------------------------------------------------------------------------------
# HF folder sources
# ---------------------------------------------------------------------------------------------
def test_every_gguf_family_has_a_tiny_gguf_writer():
    """A family the table marks GGUF-loadable is covered above (multimodal Gemma 3 GGUFs load as gemma3_text)."""
    gguf_types = {f.model_types[0] for f in FAMILIES if f.gguf} - {"gemma3"}
    assert gguf_types <= set(WRITABLE), f"no tiny GGUF writer for {sorted(gguf_types - set(WRITABLE))}"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from helpers import make_tokenizer

    return make_tokenizer()  # 120 word-level tokens, below every tiny model's vocab


@pytest.fixture(scope="module")
def hf_imports(tmp_path_factory, tokenizer) -> dict[str, tuple[Path, dict | BaseException]]:
    """A saved tiny HF folder per family of ``tests/families.py`` and its ``import_model``:
    family -> (src folder, metrics or error)."""
    root = tmp_path_factory.mktemp("hf")
    done: dict[str, tuple[Path, dict | BaseException]] = {}
    for name, fam in BY_NAME.items():
        family = name
        src = root / "src" / family
        make_model(fam).save_pretrained(src, safe_serialization=True)
        tokenizer.save_pretrained(src)
        try:
            metrics = mi.import_model(mi.ModelSettings(source=str(src), dtype="float32"), root / "out" / family)
            done[family] = (src, metrics)
        except Exception as e:  # noqa: BLE001  (reported by the test of that family)
            done[family] = (src, e)
    return done


@pytest.mark.parametrize("family", list(BY_NAME))
def test_hf_folder_import_gives_the_logits_of_transformers_load(hf_imports, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, metrics = imported(hf_imports, family)
    out = src.parent.parent / "out" / family
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    back, tok = mi.load_plain(out)
    assert type(back) is type(ref)
    ids = ids_batch(VOCAB)
    torch.testing.assert_close(logits(back, ids), logits(ref, ids), **CLOSE)
    words = " ".join(WORDS)  # the tokenizer is transformers' load of the folder's (qwen2 swaps in its own class)
    assert tok(words)["input_ids"] == AutoTokenizer.from_pretrained(src)(words)["input_ids"]
    assert metrics["num_blocks"] == DEPTH and metrics["source_kind"] == "hf_dir"


# ---------------------------------------------------------------------------------------------
# refused sources: before any weights are read
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_weight_loads(monkeypatch):
    """Fail the test if the importer gets as far as loading weights."""
    def refuse(*a, **k):
        pytest.fail("import_model loaded weights of a source it should have refused first")

    monkeypatch.setattr(mi, "load_source", refuse)
    monkeypatch.setattr(mi, "rebuild_plain", refuse)


def fake_hf_folder(path: Path, config: dict, tokenizer: Any) -> Path:
    """config.json + a safetensors file whose header is valid but whose data is garbage, + a tokenizer."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    (path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\xff" * 64)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("config", [
    {"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 128},
    {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    {"model_type": "t5", "is_encoder_decoder": True, "d_model": 64, "num_layers": 2, "num_heads": 4},
    {"model_type": "bart", "is_encoder_decoder": True, "d_model": 64, "encoder_layers": 2},
], ids=lambda c: c["model_type"])
def test_unsupported_hf_folder_refused_before_weights(tmp_path, tokenizer, no_weight_loads, config):
    src = fake_hf_folder(tmp_path / "src", config, tokenizer)
    with pytest.raises(FlexiError) as err:
        mi.import_model(mi.ModelSettings(source=str(src)), tmp_path / "out")
    assert err.value.param == "model.source" and repr(config["model_type"]) in err.value.problem
    if config.get("is_encoder_decoder") or config["model_type"] == "bert":
        assert "encoder" in err.value.problem
    assert not (tmp_path / "out").exists()


def test_real_t5_folder_refused_before_weights(tmp_path, tokenizer, no_weight_loads):
    """A genuine transformers T5 config (as save_pretrained writes it), not a hand-written dict."""
    from transformers import T5Config

    src = tmp_path / "src"
    T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4).save_pretrained(src)
    fake_hf_folder(tmp_path / "tmp", {}, tokenizer)
    for f in (tmp_path / "tmp").iterdir():
        if f.name != "config.json":
            f.rename(src / f.name)
    with pytest.raises(FlexiError, match="encoder-decoder") as err:
        mi.import_model(mi.ModelSettings(source=str(src)), tmp_path / "out")
    assert err.value.param == "model.source"


@pytest.mark.parametrize("architecture, says", [
    ("opt", "GGUF loader"),       # a family flexigpt supports, but not as GGUF in transformers
    ("gptneox", "GGUF loader"),   # llama.cpp's name for gpt_neox (supported from HF folders only)
    ("mamba", "not supported"),   # transformers reads mamba GGUFs, but flexigpt has no Arch for it
    ("bert", "encoder"),
])
def test_gguf_of_unloadable_architecture_refused_before_weights(tmp_path, no_weight_loads, architecture, says):
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    assert (architecture in GGUF_SUPPORTED_ARCHITECTURES) == (architecture == "mamba")
    path = write_foreign_gguf(tmp_path / f"tiny-{architecture}.gguf", architecture)
    with pytest.raises(FlexiError, match=says) as err:
        mi.import_model(mi.ModelSettings(source=str(path)), tmp_path / "out")
    assert err.value.param == "model.source"
    assert not (tmp_path / "out").exists()


def test_blocks_that_cannot_be_found_stop_before_the_weights(tmp_path, tokenizer, monkeypatch, no_weight_loads):
    """A seam whose block path is wrong for the model is caught on the meta-device skeleton, not by a later stage."""
    from flexigpt.model import arch as arch_mod
    from flexigpt.model import importer

    class WrongLlama(arch_mod.LlamaArch):
        blocks_path = "model.blocks"  # Llama keeps them at model.layers

    folder = tmp_path / "llama"
    make_model(BY_NAME["llama"]).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr(arch_mod, "arch_for_config", lambda config: WrongLlama)
    with pytest.raises(FlexiError) as e:
        importer.import_model(importer.ModelSettings(source=str(folder)), tmp_path / "out")
    assert e.value.param == "model.source" and "model.blocks" in e.value.problem and "arch.py" in e.value.fix
    assert not (tmp_path / "out").exists()

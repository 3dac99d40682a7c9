"""A model larger than memory, run one block at a time from its safetensors shards.

Scoring (``score_importance``) and base selection (``prune``) never hold the whole model. A
:class:`StreamedModel` keeps only the embeddings, final norm and head in memory, plus a structure-
only (meta-device) copy of the model; each block's tensors are read from the shards when that
block runs and dropped after. Calibration runs *layer-wise*, as SliceGPT and NVIDIA ModelOpt do:
every batch passes block ``i`` before block ``i + 1`` is read, so each block is read once per pass
and memory holds one block, the calibration set's hidden states at one block boundary and one
batch's intermediate activations (:meth:`StreamedModel.memory_estimate`).

Why not accelerate's disk offloading (``device_map`` with ``offload_folder``): its hooks load a
module's weights around every call, i.e. every block once per *batch*, and they run whole forward
passes, so a layer-wise order cannot be expressed. We use accelerate for the meta skeleton
(``init_empty_weights``) and safetensors' ``safe_open`` for reading single tensors.

The arguments the backbone gives each block (rotary embeddings, masks, per-layer attention type)
are not rebuilt here: they are captured from the model's own forward, with identity stand-ins in
place of the blocks (:meth:`StreamedModel.block_inputs`). So the blocks see exactly what they see in
a full forward, and results equal the in-memory path bit for bit (tests/test_stream.py).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexigpt.config import Settings, setting
from flexigpt.errors import FlexiError
from flexigpt.model.arch import LAYER_TYPE, Arch, arch_for_config

GIB = 1 << 30
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def hidden_of(x: Any) -> torch.Tensor:
    """A block's hidden-state output: the tensor itself, or ``[0]`` of a tuple/list."""
    return x[0] if isinstance(x, (tuple, list)) else x


@dataclass(frozen=True)
class StreamSettings(Settings):
    """Memory cap of the streamed stages (params ``streaming.*``: score_importance and prune)."""

    SECTION = "streaming"
    memory_limit_gb: float | None = setting(None, "GiB the stage may use for weights + activations; checked "
                                            "before any weights load; null = no cap", type=float, nullable=True)

    def check(self) -> None:
        if self.memory_limit_gb is not None and not self.memory_limit_gb > 0:
            raise FlexiError("streaming.memory_limit_gb", f"must be > 0, got {self.memory_limit_gb}",
                             "set a size in GiB, e.g. 16, or null for no cap")


class ShardedCheckpoint:
    """Which shard holds each tensor of a HF safetensors folder; reads tensors on demand."""

    def __init__(self, folder: str | os.PathLike, param: str = "paths.base_model") -> None:
        from safetensors import safe_open

        self.folder, self.param = Path(folder), param
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                assert isinstance(weight_map, dict) and weight_map
            except (ValueError, KeyError, TypeError, AssertionError):
                raise FlexiError(param, f"{index} is not a safetensors index (no 'weight_map')",
                                 "re-run the import_model stage (`dvc repro -f import_model`)") from None
        elif (self.folder / SINGLE).is_file():
            weight_map = None
        else:
            raise FlexiError(param, f"no {SINGLE} or {INDEX} in {self.folder}",
                             "run the import_model stage first (`dvc repro import_model`)")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise FlexiError(param, f"{index} names {len(missing)} shard(s) that are not in {self.folder}: "
                             f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}",
                             "restore the missing shards, or re-run import_model (`dvc repro -f import_model`)")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.file_of: dict[str, str] = {}
        self.stored: dict[str, str] = {}  # model name -> stored name, where transformers renames on load (set_renames)
        for f in files:  # headers only: a few KB per shard
            try:
                with safe_open(str(self.folder / f), "pt") as h:
                    for k in h.keys():
                        self.shapes[k] = tuple(h.get_slice(k).get_shape())
                        self.file_of[k] = f
            except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
                raise FlexiError(param, f"{self.folder / f} is not a readable safetensors file ({type(e).__name__})",
                                 "re-run the import_model stage (`dvc repro -f import_model`)") from None

    def set_renames(self, model: nn.Module) -> None:
        """Read tensors by the model's names: transformers 5 renames some families' stored keys on load
        (GPT-NeoX ``embed_out`` -> ``lm_head``, multimodal Gemma 3 ``language_model.model`` ->
        ``model.language_model``); apply the same renames to the stored names."""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            renames = [t for t in get_model_conversion_mapping(model) if type(t).__name__ == "WeightRenaming"]
        except Exception:  # noqa: BLE001  (older transformers: stored names are the model's names)
            return
        for k in self.file_of:
            name = k
            for t in renames:
                name = t.rename_source_key(name)[0]
            if name != k:
                self.stored[name] = k

    def _file(self, n: str) -> str | None:
        return self.file_of.get(self.stored.get(n, n))

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (floating ones cast to ``dtype``), each shard opened once."""
        from safetensors import safe_open

        absent = [n for n in names if self._file(n) is None]
        if absent:
            raise FlexiError(self.param, f"the checkpoint in {self.folder} has no tensor {absent[0]!r}"
                             f"{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}",
                             "re-run the import_model stage, which writes the names transformers expects")
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self._file(n), []).append(n)
        for f, ns in by_file.items():
            with safe_open(str(self.folder / f), "pt") as h:
                for n in ns:
                    t = h.get_tensor(self.stored.get(n, n))
                    out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def nbytes(self, names: list[str], dtype: torch.dtype) -> int:
        size = torch.finfo(dtype).bits // 8
        shapes = {n: self.shapes.get(self.stored.get(n, n)) for n in names}
        return sum(int(torch.Size(s).numel()) * size for s in shapes.values() if s is not None)


class _StandIn(nn.Module):
    """Identity in a block's place: records what the backbone passes to that position."""

    def __init__(self, sink: dict[int, tuple], pos: int, like: nn.Module, as_tuple: bool,
                 inject: torch.Tensor | None = None) -> None:
        super().__init__()
        self.sink, self.pos, self.as_tuple, self.inject = sink, pos, as_tuple, inject
        if hasattr(like, LAYER_TYPE):  # set_blocks rebuilds config.layer_types from these tags
            setattr(self, LAYER_TYPE, getattr(like, LAYER_TYPE))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.sink[self.pos] = (hidden_states, args, kwargs)
        h = self.inject if self.inject is not None else hidden_states
        return (h,) if self.as_tuple else h


class StreamedModel:
    """A causal LM read from an HF folder block by block (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, param: str = "paths.base_model") -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder, self.device, self.dtype, self.param = Path(folder), torch.device(device), dtype, param
        if not (self.folder / "config.json").is_file():
            raise FlexiError(param, f"no model at {self.folder} (config.json missing)",
                             "run the import_model stage first (`dvc repro import_model`)")
        config = AutoConfig.from_pretrained(self.folder, trust_remote_code=False)
        self.arch_cls: type[Arch] = arch_for_config(config)
        self.ckpt = ShardedCheckpoint(self.folder, param)  # shards checked before anything is allocated
        with init_empty_weights():  # parameters on the meta device: structure, shapes, no memory
            self.skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        self.skeleton.tie_weights()
        self.ckpt.set_renames(self.skeleton)
        self.arch = self.arch_cls(self.skeleton)
        self.blocks: list[nn.Module] = list(self.arch.blocks())
        self._loaded = False

    # -- structure (no weights read) ---------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_names(self, i: int) -> list[str]:
        """Checkpoint names of block ``i``'s stored tensors (parameters and persistent buffers)."""
        return [f"{self.arch.blocks_path}.{i}.{k}" for k in self.blocks[i].state_dict()]

    def outer_names(self) -> list[str]:
        """Checkpoint names of everything outside the blocks (embeddings, final norm, head)."""
        prefix = self.arch.blocks_path + "."
        return [k for k in self.skeleton.state_dict() if not k.startswith(prefix)
                and not (k == f"{self.arch.head_path}.weight" and self._tied_head())]

    def _tied_head(self) -> bool:
        return self.arch.head().weight is self.arch.embeddings().weight

    def param_counts(self) -> tuple[int, list[int]]:
        """Unique parameters of the whole model and of each block (tied tensors once)."""
        return sum(p.numel() for p in self.skeleton.parameters()), \
            [sum(p.numel() for p in b.parameters()) for b in self.blocks]

    def memory_estimate(self, tokens: int, batch_tokens: int) -> dict[str, int]:
        """Bytes at the peak of a layer-wise pass over ``tokens`` calibration tokens in batches of ``batch_tokens``.

        Outer weights + the largest block + hidden states at one boundary (input and output copy)
        + one batch's intermediates (the widest of attention, MLP and head activations, x3 for
        the temporaries around a matmul).
        """
        cfg = self.skeleton.config
        facts = self.arch_cls.facts(cfg)
        size = torch.finfo(self.dtype).bits // 8
        widest = max(facts.hidden_size, facts.attention_width,
                     int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * facts.hidden_size))
        return {"outer_weights": self.ckpt.nbytes(self.outer_names(), self.dtype),
                "largest_block": max(self.ckpt.nbytes(self.block_names(i), self.dtype) for i in range(self.num_blocks)),
                "boundary_hidden_states": 2 * tokens * facts.hidden_size * 4,
                "batch_activations": 3 * batch_tokens * widest * 4}

    def check_memory(self, limit_gb: float | None, tokens: int, batch_tokens: int, outer: bool = True) -> dict[str, int]:
        """The estimate; a clear error before any weights load when it exceeds ``limit_gb``
        (``outer=False``: a pass that never loads the embeddings and head, such as base selection)."""
        est = self.memory_estimate(tokens, batch_tokens)
        if not outer:
            est["outer_weights"] = 0
        need = sum(est.values())
        if limit_gb is not None and need > limit_gb * GIB:
            parts = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.2f}" for k, v in est.items())
            raise FlexiError("streaming.memory_limit_gb", f"{limit_gb:g} GiB is too small: one block needs "
                             f"{est['largest_block'] / GIB:.2f} GiB and the pass {need / GIB:.2f} GiB in all ({parts})",
                             f"raise it to at least {need / GIB:.2f}, or lower importance.batch_size / n_sequences")
        return est

    # -- weights -------------------------------------------------------------------------------------
    def load_outer(self) -> None:
        """Read the embeddings, final norm and head onto the device (once)."""
        if self._loaded:
            return
        sd = {k: v.to(self.device) for k, v in self.ckpt.read(self.outer_names(), self.dtype).items()}
        self.skeleton.load_state_dict(sd, strict=False, assign=True)
        self.skeleton.tie_weights()
        prefix = self.arch.blocks_path + "."
        for name, m in self.skeleton.named_modules():  # non-persistent buffers (e.g. rotary) follow
            if name != self.arch.blocks_path and not name.startswith(prefix):
                for b, buf in m._buffers.items():
                    if buf is not None and not buf.is_meta:
                        m._buffers[b] = buf.to(self.device)
        left = [n for n, t in [*self.skeleton.named_parameters(), *self.skeleton.named_buffers()]
                if t.is_meta and not n.startswith(prefix)]
        if left:
            raise FlexiError(self.param, f"the checkpoint in {self.folder} has no tensor {left[0]!r}",
                             "re-run the import_model stage (`dvc repro -f import_model`)")
        self._loaded = True

    def weights(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s adaptable linear weights (out x in), read from the shards (as ``Arch.weights``;
        GPT-2's Conv1D stores in x out, so those are transposed)."""
        names = {n: f"{self.arch.blocks_path}.{i}.{n}.weight" for n in self.arch.linear_names}
        sd = self.ckpt.read(list(names.values()), self.dtype)
        mods = self.arch.linears(i)
        return {n: sd[k].T if self.arch.stores_in_by_out(mods[n]) else sd[k] for n, k in names.items()}

    @contextmanager
    def block(self, i: int) -> Iterator[nn.Module]:
        """Block ``i`` with its weights on the device; they are dropped again on exit."""
        b = self.blocks[i]
        sd = self.ckpt.read(self.block_names(i), self.dtype)
        b.load_state_dict({k.split(f"{self.arch.blocks_path}.{i}.", 1)[1]: v for k, v in sd.items()},
                          strict=True, assign=True)
        del sd
        b.to(self.device)
        try:
            yield b
        finally:
            _drop_weights(b)

    # -- running -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _backbone(self, ids: torch.Tensor, order: list[int], inject: torch.Tensor | None = None,
                  as_tuple: bool | None = None) -> tuple[dict[int, tuple], Any]:
        """The backbone's forward with identity stand-ins for the blocks of ``order``: what each
        position receives, and the output (``inject`` replaces position 0's output when given)."""
        sink: dict[int, tuple] = {}
        as_tuple = self._as_tuple if as_tuple is None else as_tuple
        self.arch.set_blocks([_StandIn(sink, p, self.blocks[i], as_tuple, inject if p == 0 else None)
                              for p, i in enumerate(order)])
        try:
            out = self.arch.backbone()(input_ids=ids.to(self.device), use_cache=False)
        finally:
            self.arch.set_blocks(self.blocks)
        return sink, out

    def _probe(self, ids: torch.Tensor) -> None:
        """Learn whether the backbone passes a block's output on as a tensor or as ``[0]`` of a tuple."""
        if self._as_tuple is not None:
            return
        if self.num_blocks < 2:
            self._as_tuple = False
            return
        for as_tuple in (False, True):
            sink, _ = self._backbone(ids[:1], [0, 1], as_tuple=as_tuple)
            if 1 in sink and sink[1][0].shape == sink[0][0].shape:
                self._as_tuple = as_tuple
                return
        raise FlexiError("model.source", f"cannot stream {self.skeleton.config.model_type!r}: its backbone does not "
                         "hand a block's output to the next block", "report this model family")

    _as_tuple: bool | None = None

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, *, batch_size: int, dtype: str = "float32", order: list[int] | None = None,
            on_block: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
            progress: bool = True, desc: str = "blocks") -> list[torch.Tensor]:
        """A layer-wise pass of ``ids`` through the blocks of ``order`` (default: all, in order).

        Every batch passes a block before the next block is read. ``on_block(i, x_in, x_out)`` sees
        each block's input and output hidden states per batch. Returns the hidden state after the
        last block, per batch (before the final norm).
        """
        from tqdm.auto import tqdm

        from flexigpt.model.forward import compute_context, iter_batches

        order = list(range(self.num_blocks)) if order is None else list(order)
        self.load_outer()
        with compute_context(dtype, self.device):
            self._probe(ids)
            hs, calls = [], []
            for b in iter_batches(ids, batch_size):
                sink, _ = self._backbone(b, order)
                hs.append(sink[0][0])
                calls.append([sink[p][1:] for p in range(len(order))])
            for p, i in enumerate(tqdm(order, desc=desc, disable=not progress, leave=False)):
                with self.block(i) as blk:
                    for k, h in enumerate(hs):
                        args, kwargs = calls[k][p]
                        out = hidden_of(blk(h, *args, **kwargs))
                        if on_block is not None:
                            on_block(i, h, out)
                        hs[k] = out
        return hs

    @torch.inference_mode()
    def finish(self, ids: torch.Tensor, h: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
        """The backbone's output (its own final norm and whatever else it applies) for ``h`` after the
        last block: ``h`` is injected at position 0 of an all-identity backbone."""
        from flexigpt.model.forward import compute_context

        with compute_context(dtype, self.device):
            _, out = self._backbone(ids, list(range(self.num_blocks)), inject=h)
        return out.last_hidden_state

    def head(self) -> nn.Module:
        self.load_outer()
        return self.arch.head()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's own head path on :meth:`finish`'s output (``Arch.logits``: soft-caps where the family does)."""
        self.load_outer()
        return self.arch.logits(h)


def _drop_weights(block: nn.Module) -> None:
    """Free a block's stored tensors (back to the meta device); non-persistent buffers, which no
    checkpoint holds, go back to the CPU for the next read."""
    for m in block.modules():
        for n, p in m._parameters.items():
            if p is not None:
                m._parameters[n] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        for n, b in m._buffers.items():
            if b is not None:
                m._buffers[n] = b.to("cpu") if n in m._non_persistent_buffers_set else b.to("meta")

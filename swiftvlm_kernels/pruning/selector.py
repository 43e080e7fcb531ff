"""ALVTS' selectors (docs/semantics.md "ALVTS"): per selecting layer l, a rank-R query-key form applied
to the layer's normed input x = input_layernorm(h) (what its q_proj / k_proj see): one head, no RoPE,

    q~ = x Wq~,  k~ = x Wk~   (Wq~, Wk~ [d, R], fp32),  importance S = t2v * v2v of
    attention_importance(q~, k~, vis_start, n_vis, R ** -0.5, key_mask) over every row.

`Selector` holds the (Wq~, Wk~) pairs of the layers it covers. Until a calibrated one is given, the
default (`Selector.from_layers`) is a truncated SVD of each layer's summed per-head form

    M = sum_h W_Q,h^T W_K,g(h)   [d, d]   (W_Q,h: head h's rows of q_proj.weight, [D, d]; GQA:
                                           g(h) = h // (H / Hkv)),

so that x M x'^T = sum_h <q_h, k_g(h)> (no RoPE, no bias) ~ (x Wq~)(x' Wk~)^T with
Wq~ = U_R Sigma_R^(1/2), Wk~ = V_R Sigma_R^(1/2). At R = rank(M) the form is exact.

Calibration (fitting Wq~, Wk~ to the layer's real attention, whose target attention_importance gives
from the layer's own queries and keys) is a separate step that produces a Selector through the same
constructor; `Selector.record` holds what it wants to keep (the JSON record's "calibration" entry).

Files (`save` / `load`): a directory with `selector.json` (the record: format, version, rank,
hidden_size, layers, init, calibration) and `selector.safetensors` (fp32 `layers.<l>.wq` / `.wk`,
[hidden_size, rank] each). Loading validates the JSON and every tensor's name, dtype and shape from the
safetensors header before reading a tensor, and refuses non-finite weights; nothing is unpickled.
Every problem is a ValueError naming the file.
"""
from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

FORMAT = "swiftvlm-alvts-selector"
VERSION = 1
DEFAULT_RANK = 128
RECORD, TENSORS = "selector.json", "selector.safetensors"
_RECORD_KEYS = {"format", "version", "rank", "hidden_size", "layers", "init", "calibration"}
_MAX_RECORD_BYTES = 16 * 2 ** 20


class Selector:
    """Per-layer low-rank selectors: weights {layer (1-indexed): (Wq~, Wk~)}, each [d, R] (stored fp32),
    the same d and R for every layer, 1 <= R <= d. record: JSON-serialisable facts about how it was
    made ("init", and a calibration's own "calibration" entry)."""

    def __init__(self, weights: Mapping[int, tuple[Tensor, Tensor]], *, record: Optional[Mapping] = None):
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError("weights: expected a non-empty mapping {layer: (Wq, Wk)}")
        for layer in weights:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
                raise ValueError(f"weights: expected 1-indexed int layers, got {layer!r}")
        shape = None
        self.weights: dict[int, tuple[Tensor, Tensor]] = {}
        for layer in sorted(weights):
            pair = weights[layer]
            if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(w, Tensor) for w in pair):
                raise ValueError(f"weights[{layer}]: expected a pair of tensors (Wq, Wk)")
            for name, w in zip(("Wq", "Wk"), pair):
                if w.dim() != 2 or not w.is_floating_point() or (shape is not None and tuple(w.shape) != shape):
                    like = f" of shape {list(shape)} (as the other layers')" if shape else ""
                    raise ValueError(f"weights[{layer}] {name}: expected a float tensor [d, R]{like}, got "
                                     f"{list(w.shape)} {w.dtype}")
                shape = tuple(w.shape)
            self.weights[layer] = (pair[0].detach().float(), pair[1].detach().float())
        assert shape is not None
        self.hidden_size, self.rank = shape
        if not 1 <= self.rank <= self.hidden_size:
            raise ValueError(f"weights: expected a rank R in [1, d = {self.hidden_size}], got {self.rank}")
        self.record: dict = dict(record or {})
        self._projections: dict = {}

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.weights)

    @property
    def scale(self) -> float:
        """The selector's softmax scale, R ** -0.5."""
        return self.rank ** -0.5

    def projection(self, layer: int, like: Tensor) -> Tensor:
        """[d, 2R] = [Wq~ | Wk~] of `layer` in like's dtype and device (made once): x @ it gives the
        selector's queries and keys of x in one matmul."""
        key = (layer, like.dtype, like.device)
        if key not in self._projections:
            wq, wk = self.weights[layer]
            self._projections[key] = torch.cat([wq, wk], 1).to(dtype=like.dtype, device=like.device)
        return self._projections[key]

    def check_covers(self, layers: Sequence[int], hidden_size: int, where: str = "selector") -> None:
        """ValueError unless the selector has every layer of `layers` at this hidden size."""
        missing = [layer for layer in layers if layer not in self.weights]
        if missing:
            raise ValueError(f"{where}: no weights for the selecting layers {missing} (it has layers "
                             f"{list(self.layers)})")
        if self.hidden_size != hidden_size:
            raise ValueError(f"{where}: made for hidden size {self.hidden_size}, the model's is {hidden_size}")

    # -- the default: a truncated SVD of each layer's query-key form --------------------------------

    @classmethod
    def from_layers(cls, decoder_layers: Sequence, layers: Sequence[int], rank: Optional[int] = None) -> "Selector":
        """The SVD selector of `layers` (1-indexed) of a decoder laid out like transformers' LLaMA
        (`self_attn.q_proj.weight` [H D, d], `self_attn.k_proj.weight` [Hkv D, d], `self_attn.head_dim`):
        rank R = min(rank, d), default rank 128. Biases are left out (the form of the weights)."""
        weights = {layer: svd_form(decoder_layers[layer - 1].self_attn, rank) for layer in layers}
        return cls(weights, record={"init": "svd"})

    # -- files ----------------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the directory `path` (created if needed): selector.json and selector.safetensors."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        record = {"format": FORMAT, "version": VERSION, "rank": self.rank, "hidden_size": self.hidden_size,
                  "layers": list(self.layers), "init": self.record.get("init"),
                  "calibration": self.record.get("calibration")}
        tensors = {}
        for layer, (wq, wk) in self.weights.items():
            tensors[f"layers.{layer}.wq"] = wq.cpu().contiguous()
            tensors[f"layers.{layer}.wk"] = wk.cpu().contiguous()
        save_file(tensors, str(path / TENSORS), metadata={"format": FORMAT})
        (path / RECORD).write_text(json.dumps(record, indent=1))
        return path

    @classmethod
    def load(cls, path) -> "Selector":
        """Read a directory written by `save` (see the module docstring). ValueError naming the file
        for anything malformed; FileNotFoundError for a missing directory or file."""
        path = Path(path)
        record_file, tensor_file = path / RECORD, path / TENSORS
        for f in (record_file, tensor_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: not found (a selector directory holds {RECORD} and {TENSORS})")
        record = _read_record(record_file)
        rank, d, layers = record["rank"], record["hidden_size"], record["layers"]
        want = {f"layers.{layer}.{name}": [d, rank] for layer in layers for name in ("wq", "wk")}
        from safetensors import safe_open

        try:
            handle = safe_open(str(tensor_file), framework="pt")
            keys = set(handle.keys())
        except Exception as e:  # a corrupt or non-safetensors file
            raise ValueError(f"{tensor_file}: not a readable safetensors file ({e})") from None
        if keys != set(want):
            extra, missing = sorted(keys - set(want)), sorted(set(want) - keys)
            raise ValueError(f"{tensor_file}: expected exactly the tensors of layers {layers} ({len(want)}: "
                             f"layers.<l>.wq / .wk); missing {missing[:4]}, unexpected {extra[:4]}")
        for key, shape in want.items():  # from the header: nothing is read yet
            got = handle.get_slice(key)
            if got.get_dtype() != "F32" or list(got.get_shape()) != shape:
                raise ValueError(f"{tensor_file}: tensor {key}: expected F32 of shape {shape} (hidden_size, rank "
                                 f"of {RECORD}), got {got.get_dtype()} of shape {list(got.get_shape())}")
        weights = {}
        for layer in layers:
            pair = tuple(handle.get_tensor(f"layers.{layer}.{name}") for name in ("wq", "wk"))
            if not all(bool(torch.isfinite(w).all()) for w in pair):
                raise ValueError(f"{tensor_file}: layer {layer}: expected finite weights")
            weights[layer] = pair
        return cls(weights, record={"init": record.get("init"), "calibration": record.get("calibration")})


def _read_record(path: Path) -> dict:
    """selector.json, validated (ValueError naming the file)."""
    if path.stat().st_size > _MAX_RECORD_BYTES:
        raise ValueError(f"{path}: larger than {_MAX_RECORD_BYTES} bytes; expected a selector record")
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON selector record ({e})") from None

    def fail(why):
        raise ValueError(f"{path}: {why}")

    if not isinstance(record, dict):
        fail(f"expected a JSON object, got a JSON {type(record).__name__}")
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        fail(f"expected format {FORMAT!r} version {VERSION}, got {record.get('format')!r} version "
             f"{record.get('version')!r}")
    unknown = sorted(set(record) - _RECORD_KEYS)
    if unknown:
        fail(f"unexpected entries {unknown}; expected only {sorted(_RECORD_KEYS)}")

    def integer(name, low, high=None):
        value = record.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            fail(f"{name}: expected an int in [{low}, {high if high is not None else 'inf'}], got {value!r}")
        return value

    d = integer("hidden_size", 1, 2 ** 20)
    integer("rank", 1, d)
    layers = record.get("layers")
    if not isinstance(layers, list) or not layers or len(layers) > 10_000 or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in layers) or layers != sorted(set(layers)):
        fail(f"layers: expected a non-empty, strictly increasing list of 1-indexed layers, got {str(layers)[:80]}")
    if record.get("init") is not None and not isinstance(record["init"], str):
        fail(f"init: expected a string or null, got {record['init']!r}")
    return record


def svd_form(attn, rank: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """(Wq~, Wk~) fp32 [d, R] of one attention module (q_proj, k_proj, head_dim): the rank-R truncated
    SVD of M = sum_h W_Q,h^T W_K,g(h), computed in float64, R = min(rank or 128, d)."""
    wq, wk, D = attn.q_proj.weight.detach(), attn.k_proj.weight.detach(), int(attn.head_dim)
    d = wq.shape[1]
    H, Hkv = wq.shape[0] // D, wk.shape[0] // D
    if H * D != wq.shape[0] or Hkv * D != wk.shape[0] or Hkv < 1 or H % Hkv:
        raise ValueError(f"q_proj / k_proj: expected [H * {D}, d] and [Hkv * {D}, d] with H % Hkv == 0, got "
                         f"{list(wq.shape)} and {list(wk.shape)}")
    R = min(DEFAULT_RANK if rank is None else rank, d)
    k_rows = wk.double().view(Hkv, D, d).repeat_interleave(H // Hkv, 0).reshape(H * D, d)  # W_K,g(h) per head h
    form = wq.double().T @ k_rows  # [d, d] = sum_h W_Q,h^T W_K,g(h)
    U, S, Vh = torch.linalg.svd(form, full_matrices=False)
    root = S[:R].sqrt()
    return (U[:, :R] * root).float(), (Vh[:R].T * root).float()


# The default selectors, made once per decoder and rank: {first decoder layer: {(rank, layers): (stamp,
# Selector)}}; the stamp notices new or changed q_proj / k_proj weights (their identity and version).
_DEFAULTS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _stamp(decoder_layers, layers) -> tuple:
    out = []
    for layer in layers:
        attn = decoder_layers[layer - 1].self_attn
        for w in (attn.q_proj.weight, attn.k_proj.weight):
            out.append((id(w), w._version, w.device, w.dtype))
    return tuple(out)


def default_selector(decoder_layers: Sequence, layers: Sequence[int], rank: Optional[int] = None) -> Selector:
    """`Selector.from_layers(decoder_layers, layers, rank)`, made once per decoder, rank and layers (again
    when those layers' q_proj / k_proj weights change)."""
    cache = _DEFAULTS.setdefault(decoder_layers[0], {})
    key, stamp = (rank, tuple(layers)), _stamp(decoder_layers, layers)
    if key not in cache or cache[key][0] != stamp:
        cache[key] = (stamp, Selector.from_layers(decoder_layers, layers, rank))
    return cache[key][1]


def selector_for(pruning, plan, decoder_layers: Sequence, hidden_size: int) -> Optional[Selector]:
    """The selector an ALVTS plan runs with: the method's own (`ALVTS(selector=...)`), else the default
    SVD selector at the method's rank; None for a plan of another method (or no plan)."""
    if plan is None or plan.method != "alvts":
        return None
    selector = getattr(pruning, "selector", None)
    if selector is None:
        selector = default_selector(decoder_layers, plan.layers, getattr(pruning, "rank", None))
    selector.check_covers(plan.layers, hidden_size, "pruning: ALVTS(selector=...)")
    return selector


def selector_inputs(selector: Selector, layer_no: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """The selector's queries and keys of layer `layer_no` on its normed input x [B, n, d]: one matmul,
    then views [B, 1, n, R] each (one head)."""
    qk = x @ selector.projection(layer_no, x)
    R = selector.rank
    return qk[..., :R].unsqueeze(1), qk[..., R:].unsqueeze(1)


__all__ = ["Selector", "svd_form", "default_selector", "selector_for", "selector_inputs", "DEFAULT_RANK", "FORMAT",
           "VERSION"]

"""Sweep every model type ``transformers`` can build from a config through ``check_gradients``.

For each model type in ``CONFIG_MAPPING_NAMES`` that an auto-model mapping names a class for
(a class with a head and a loss first: causal LM, masked LM, seq2seq LM, sequence / image /
audio classification, CTC, speech seq2seq, image-text-to-text; else the base model; else any
other auto mapping), the sweep builds the default config shrunk to about 4 layers x 64 wide
(sub-configs too, recursively), initialises the model randomly with a fixed seed (no
download, never ``from_pretrained``), feeds a batch of 2 dummy inputs for the model's
``main_input_name`` (``input_ids``, ``pixel_values``, ``input_values`` or ``input_features``;
labels where the head takes them), runs one bare forward and backward, then
``check_gradients(model, batch)`` with default settings. Every model runs under a timeout
and every exception is caught and recorded, so the sweep never stops.

Run it from the repository root (one torch thread; a full run takes tens of minutes)::

    OMP_NUM_THREADS=1 python benchmarks/sweep_transformers.py --json /tmp/sweep.json
    python benchmarks/sweep_transformers.py --only bert,gpt2,vit   # a few types
    python benchmarks/sweep_transformers.py --offset 100 --limit 50  # a slice

It prints one line per model type, then a table of verdicts and the totals: attempted, built
and ran, checked, failed, and the failures grouped by problem kind and by a coarse cause
inferred from the layer names and the config (an unfed modality tower, an optional-input
parameter, LayerDrop or MoE routing, the relative rule on a short group, dead, nonfinite).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import itertools
import json
import logging
import os
import re
import select
import signal
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeGuard

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from pytest_gradcheck import Report, check_gradients

torch.set_num_threads(1)

SEED = 0
BATCH = 2
SEQ = 16
LAYERS = 4
WIDTH = 64
FFN = 128
HEADS = 4
HEAD_DIM = WIDTH // HEADS
VOCAB = 512
IMAGE = 64
MAX_POSITIONS = 512
SHRINK_LEVELS = (0, 1, 2)
MAX_CLASSES = 3
"""How many model classes to try per model type (each at every shrink level)."""
MAX_PARAMS = 50_000_000
"""Refuse to build a model whose shrunk config still has more parameters than this."""

# Auto-model mappings in order of preference: a class with a head and a loss first.
HEAD_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_CTC_MAPPING_NAMES",
)
BASE_MAPPING = "MODEL_MAPPING_NAMES"

# Config attributes and what they shrink to (only when present and larger).
_LAYER_KEYS = frozenset(
    {
        "num_hidden_layers",
        "num_layers",
        "n_layer",
        "n_layers",
        "encoder_layers",
        "decoder_layers",
        "num_encoder_layers",
        "num_decoder_layers",
        "decoder_num_hidden_layers",
        "encoder_num_hidden_layers",
        "depth",
    }
)
_WIDTH_KEYS = frozenset(
    {
        "hidden_size",
        "d_model",
        "n_embd",
        "embed_dim",
        "dim",
        "hidden_dim",
        "word_embed_proj_dim",
        "embedding_size",
        "projection_dim",
        "d_embed",
        "out_hidden_size",
        "emb_dim",
        "d_latents",
        "entity_emb_size",
        "hidden_size_per_layer_input",
    }
)
_FFN_KEYS = frozenset(
    {
        "intermediate_size",
        "ffn_dim",
        "d_ff",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "n_inner",
        "d_inner",
        "decoder_intermediate_size",
    }
)
_HEAD_KEYS = frozenset(
    {
        "num_attention_heads",
        "n_head",
        "n_heads",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "num_heads",
        "decoder_num_attention_heads",
    }
)
_KV_HEAD_KEYS = frozenset({"num_key_value_heads", "num_kv_heads", "n_kv_heads"})
_HEAD_DIM_KEYS = frozenset({"head_dim", "d_kv", "attention_head_dim", "kv_channels"})
_POSITION_KEYS = frozenset({"max_position_embeddings", "n_positions"})
_CAPS: Mapping[str, int] = {
    # mixture of experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "moe_intermediate_size": WIDTH,
    "shared_expert_intermediate_size": WIDTH,
    # multi-head latent attention
    "kv_lora_rank": 32,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": HEAD_DIM,
    # audio and video
    "num_conv_pos_embeddings": 16,
    "max_source_positions": 64,
    "num_frames": 4,
    "n_groups": 1,
}
_SERIALIZED = ("out_features", "out_indices", "per_layer_config")
"""Keys read from ``config.to_dict()`` when ``vars(config)`` keeps them private."""
_EXPERT_KEYS = frozenset(
    {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}
)
_SHAPE_CAPS = frozenset(
    {"moe_intermediate_size", "shared_expert_intermediate_size", "kv_lora_rank", "q_lora_rank"}
    | {"qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"}
)
"""Caps that are widths: level 2 keeps them."""
_WIDTH_LIST_KEYS = frozenset(
    {"hidden_sizes", "embed_dims", "dims", "conv_dim", "neck_hidden_sizes", "embed_dim"}
)
_HEAD_LIST_KEYS = frozenset({"num_heads", "num_attention_heads", "heads"})
_DEPTH_LIST_KEYS = frozenset({"depths", "num_layers", "layers", "num_hidden_layers"})

# Forward() parameters that are housekeeping, not inputs a sample batch should carry.
_HOUSEKEEPING = frozenset(
    {
        "self",
        "args",
        "kwargs",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "use_cache",
        "past_key_values",
        "cache_position",
        "position_ids",
        "attention_mask",
        "head_mask",
        "decoder_head_mask",
        "cross_attn_head_mask",
        "inputs_embeds",
        "decoder_inputs_embeds",
        "encoder_outputs",
        "token_type_ids",
        "labels",
        "logits_to_keep",
        "decoder_attention_mask",
        "decoder_position_ids",
        "return_loss",
        "interpolate_pos_encoding",
    }
)
_MODALITY = ("vision", "visual", "audio", "image", "pixel", "speech", "video", "vqgan", "vqvae")
_PROJECTOR = ("multi_modal", "projector", "mm_", "connector", "resampler", "perceiver", "qformer")
_OFF_PATH = (
    r"pooler|post_layernorm|final_layer_norm|\.pool|\.norm\b|layernorm|auxiliary|(^|\.)head(\.|$)"
)
_OPTIONAL = ("mask_token", "global", "cls_token", "token_type", "position_ids")


class SweepTimeout(Exception):
    """Raised by the per-model alarm."""


@dataclass
class Record:
    """What happened to one model type."""

    type: str
    cls: str = ""
    built: bool = False
    ran: bool = False
    checked: bool = False
    ok: bool | None = None
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    causes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    """The batch's keys."""
    unfed: list[str] = field(default_factory=list)
    """forward() parameters (housekeeping aside) that the batch did not give."""
    random: list[str] = field(default_factory=list)
    """Sources of randomness in the forward: LayerDrop, MoE routing."""
    diagnosis: list[str] = field(default_factory=list)
    """The check's diagnosis lines (where a NaN was born), first lines only."""
    params: int = 0
    level: int | None = None
    """The shrink level that built and ran (see :func:`shrink_overrides`)."""
    seconds: float = 0.0
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["class"] = data.pop("cls")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        data = dict(data)
        data["cls"] = data.pop("class")
        data["problems"] = [tuple(p) for p in data["problems"]]
        return cls(**data)


# --------------------------------------------------------------------------- model classes


def model_types() -> list[str]:
    """Every model type transformers has a config for, sorted."""
    from transformers.models.auto.configuration_auto import (  # type: ignore[attr-defined]
        CONFIG_MAPPING_NAMES,
    )

    return sorted(CONFIG_MAPPING_NAMES)


def pick_classes(model_type: str) -> list[tuple[str, str]]:
    """``(mapping name, class name)`` pairs to try, best first: the classes with a head and a
    loss, then the base model, then any other auto mapping's class. Empty when no auto
    mapping names one.

    A head whose ``main_input_name`` differs from the base model's (Whisper's decoder-only
    causal LM next to its speech seq2seq model) goes after the heads that keep it.
    """
    from transformers.models.auto import modeling_auto

    def named(mapping: str) -> str | None:
        found = getattr(modeling_auto, mapping, {}).get(model_type)
        if isinstance(found, (list, tuple)):
            found = found[0] if found else None
        return str(found) if found else None

    base = named(BASE_MAPPING)
    main = _main_input(base) if base else None
    heads = [(m, c) for m in HEAD_MAPPINGS if (c := named(m))]
    keeping = [h for h in heads if main is None or _main_input(h[1]) in (main, None)]
    picked = keeping + [h for h in heads if h not in keeping]
    if base:
        picked.append((BASE_MAPPING, base))
    if not picked:
        others = sorted(
            name
            for name in dir(modeling_auto)
            if name.startswith("MODEL_FOR_") and name.endswith("_MAPPING_NAMES")
        )
        picked = [(m, c) for m in others if (c := named(m))][:1]
    unique: dict[str, tuple[str, str]] = {}
    for mapping, name in picked:
        unique.setdefault(name, (mapping, name))
    return list(unique.values())[:MAX_CLASSES]


def _main_input(class_name: str) -> str | None:
    try:
        return str(_resolve_class(class_name).main_input_name)  # type: ignore[attr-defined]
    except Exception:
        return None


def _resolve_class(name: str) -> type[nn.Module]:
    import transformers

    found = getattr(transformers, name)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise TypeError(f"{name} is not a torch module class")
    return found


# --------------------------------------------------------------------------- config shrinking


def _cap(value: Any, limit: int) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    return min(value, limit)


def _power_of_two_at_most(value: int, limit: int) -> int:
    top = max(1, min(value, limit))
    return 1 << (top.bit_length() - 1)


def _list_of_ints(value: Any) -> TypeGuard[list[int] | tuple[int, ...]]:
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def _token_ids(key: str, value: Any, vocab: int, remap: dict[int, int]) -> Any:
    """Special token ids at or above the new vocabulary move to its top, the same old id to
    the same new one."""

    def move(token: Any) -> Any:
        if isinstance(token, bool) or not isinstance(token, int) or token < vocab:
            return token
        if token not in remap:
            remap[token] = vocab - 1 - len(remap)
        return remap[token]

    if isinstance(value, (list, tuple)):
        return type(value)(move(v) for v in value)
    return move(value)


def _is_token_id_key(key: str) -> bool:
    return key.endswith(("token_id", "token_ids", "token_index", "_token"))


def shrink_overrides(
    config: Any, level: int = 0, remap: dict[int, int] | None = None
) -> dict[str, Any]:
    """Keyword overrides that shrink ``config`` (an instantiated default) to about
    4 layers x 64 wide; sub-configs become shrunk dicts.

    ``level`` 0 shrinks everything; 1 keeps the image size and frame count; 2 also keeps the
    widths and heads (layers, vocabulary, positions and experts only), for architectures whose
    shapes are tied together in ways the generic rules miss. ``remap`` (shared with the
    sub-configs) moves special token ids at or above the new vocabulary to its top, the same
    old id to the same new one everywhere.
    """
    remap = {} if remap is None else remap
    from transformers import PreTrainedConfig

    values = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    with contextlib.suppress(Exception):  # properties kept privately (backbone outputs...)
        serial = config.to_dict()
        values.update({k: serial[k] for k in _SERIALIZED if k in serial and k not in values})
    out: dict[str, Any] = {}
    old_layers: dict[int, int] = {}  # an original layer count -> the new one
    for key, value in values.items():
        if getattr(value, "model_type", None) == "timm_backbone":  # no timm: a ResNet instead
            from transformers import ResNetConfig

            indices = list(getattr(value, "out_indices", None) or [1, 2, 3, 4])
            value = ResNetConfig(out_indices=indices)  # type: ignore[call-arg]
        if isinstance(value, PreTrainedConfig):
            sub = value.to_dict()
            sub.update(shrink_overrides(value, level, remap))
            out[key] = sub
        elif key in ("use_timm_backbone", "use_pretrained_backbone") and value is True:
            out[key] = False  # no timm, no download
        elif key == "prediction_length" and value is None:
            out[key] = 8  # time-series models demand one
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            new = value
            if key in _LAYER_KEYS:
                new = min(value, LAYERS)
                if new != value:
                    old_layers[value] = new
            elif key in _POSITION_KEYS:
                new = min(value, MAX_POSITIONS)
            elif "vocab" in key:  # vocab_size, entity_vocab_size, per-layer vocabularies...
                new = min(value, VOCAB)
            elif level < 2 and key in _WIDTH_KEYS:
                new = min(value, WIDTH)
            elif level < 2 and key in _FFN_KEYS:
                new = min(value, FFN)
            elif level < 2 and key in _HEAD_KEYS:
                new = _power_of_two_at_most(value, HEADS)
            elif level < 2 and key in _HEAD_DIM_KEYS:
                new = min(value, HEAD_DIM)
            elif level < 1 and key in ("image_size", "num_frames"):
                new = min(value, IMAGE if key == "image_size" else _CAPS[key])
            elif key in _CAPS and (level < 2 or key not in _SHAPE_CAPS):
                new = min(value, _CAPS[key])
            if new != value:
                out[key] = new
        elif _list_of_ints(value):
            if level < 2 and key in _WIDTH_LIST_KEYS:
                new_list = [max(16, min(v, WIDTH) // 16 * 16) if v >= 16 else v for v in value]
            elif level < 2 and key in _HEAD_LIST_KEYS:
                new_list = [_power_of_two_at_most(v, HEADS) for v in value]
            elif key in _DEPTH_LIST_KEYS:
                new_list = [min(v, 1) for v in value]
            elif level < 1 and key == "image_size" and len(value) == 2:
                new_list = [min(v, IMAGE) for v in value]
            else:
                continue
            if new_list != list(value):
                out[key] = type(value)(new_list)
    # Heads: key/value heads divide the (new) query heads; MHA models stay MHA.
    heads = next((out[k] for k in _HEAD_KEYS if isinstance(out.get(k), int)), None)
    if "qk_rope_head_dim" in out and isinstance(values.get("head_dim"), int):
        out["head_dim"] = out["qk_rope_head_dim"]  # multi-head latent attention ropes head_dim
    for key in _KV_HEAD_KEYS:
        kv = values.get(key)
        if kv is None and key in values and heads is not None:
            out[key] = heads  # None breaks some models' grouped-query arithmetic
        elif isinstance(kv, int) and not isinstance(kv, bool) and heads is not None:
            original_heads = next(
                (values[k] for k in _HEAD_KEYS if isinstance(values.get(k), int)), heads
            )
            out[key] = heads if kv >= original_heads else max(1, heads // 2)
    # Per-layer lists (layer_types, sliding-window flags...) follow the layer count, keeping
    # one of each kind of layer (a hybrid keeps an attention layer).
    for key, value in values.items():
        if key in out or not isinstance(value, (list, tuple)) or key in _DEPTH_LIST_KEYS:
            continue
        if len(value) in old_layers:
            out[key] = type(value)(_keep_kinds(list(value), old_layers[len(value)]))
    if len(old_layers) == 1:
        (old, new), *_ = old_layers.items()
        out.update(_layer_indexes(values, out, old, new))
    # Derived shapes the generic caps break.
    ssm_heads = out.get("num_heads", values.get("num_heads"))
    hidden, expand = out.get("hidden_size"), values.get("expand")
    mamba = isinstance(values.get("head_dim"), int)  # Mamba-2: hidden * expand = heads * head_dim
    if mamba and isinstance(expand, int) and isinstance(hidden, int) and isinstance(ssm_heads, int):
        out["head_dim"] = hidden * expand // ssm_heads
    rope = values.get("rope_parameters")
    head_dim = out.get("head_dim")
    if head_dim is None and isinstance(hidden, int):
        query_heads = next((out[k] for k in _HEAD_KEYS if isinstance(out.get(k), int)), None)
        head_dim = hidden // query_heads if query_heads else None
    if values.get("head_dim", 0) is None and head_dim:
        out["head_dim"] = head_dim  # None breaks some models' attention scaling
    hidden_default = "mrope_section" in getattr(type(config), "ignore_keys_at_rope_validation", ())
    if isinstance(rope, dict) and head_dim and level < 2:
        section = rope.get("mrope_section")
        if _list_of_ints(section) or hidden_default:  # multimodal RoPE splits head_dim / 2
            section = section if _list_of_ints(section) else [2, 3, 3]
            out["rope_parameters"] = {**rope, "mrope_section": _split(section, head_dim // 2)}
    if values.get("use_cache") is True:
        out["use_cache"] = False  # training: no cache (hybrids without attention layers fail on it)
    # Special token ids stay inside the shrunk vocabulary.
    vocab = out.get("vocab_size", values.get("vocab_size"))
    text = out.get("text_config")
    if vocab is None and isinstance(text, dict):  # a composite: the text model's vocabulary
        vocab = text.get("vocab_size")
    if isinstance(vocab, int) and vocab > 0:
        for key, value in values.items():
            if _is_token_id_key(key) and key not in out:
                moved = _token_ids(key, value, vocab, remap)
                if moved != value:
                    out[key] = moved
    return out


def _keep_kinds(value: list[Any], new: int) -> list[Any]:
    """The first ``new`` entries of a per-layer list, with the last ones replaced so that
    every kind of entry in the full list appears (when there are no more kinds than layers)."""
    head = value[:new]
    kinds = list(dict.fromkeys(v for v in value if isinstance(v, (str, bool, int))))
    missing = [k for k in kinds if k not in head]
    if missing and len(kinds) <= new:
        slots = [i for i in range(new - 1, -1, -1) if head.count(head[i]) > 1]
        for slot, kind in zip(slots, missing, strict=False):
            head[slot] = kind
    return head


def _layer_indexes(
    values: Mapping[str, Any], out: Mapping[str, Any], old: int, new: int
) -> dict[str, Any]:
    """Layer indexes (deepstack taps, backbone stages, per-layer overrides, hybrid layer
    offsets) mapped from ``old`` layers to ``new``."""
    moved: dict[str, Any] = {}
    for key, value in values.items():
        if key in out:
            continue
        if "index" in key and _list_of_ints(value) and all(0 <= v < old for v in value):
            moved[key] = type(value)(v * new // old for v in value)
        elif key.endswith("_layer_offset") and isinstance(value, int) and value >= new:
            moved[key] = new - 1
        elif key.endswith("_layer_period") and isinstance(value, int) and value > new:
            moved[key] = new
        elif key == "per_layer_config" and isinstance(value, dict):
            layers: dict[Any, Any] = {}
            for index, item in value.items():
                number = int(index) if str(index).isdigit() else -1
                if 0 <= number < old:
                    layers.setdefault(number * new // old, _cap_head_dim(item))
            moved[key] = layers
    # Backbone outputs: the last stages, as many as there were (stage names follow depth).
    indices, features = values.get("out_indices"), values.get("out_features")
    stages: list[int] | None = None
    if _list_of_ints(indices) and max(indices) > new:
        stages = list(indices)
    elif isinstance(features, (list, tuple)) and all(
        isinstance(f, str) and re.fullmatch(r"stage\d+", f) for f in features
    ):
        numbers = [int(f[5:]) for f in features]
        stages = numbers if numbers and max(numbers) > new else None
    names = values.get("stage_names")
    if isinstance(names, (list, tuple)) and len(names) == old + 1:
        moved["stage_names"] = ["stem", *(f"stage{i}" for i in range(1, new + 1))]
    if stages:
        count = min(len(stages), new)
        kept = list(range(new - count + 1, new + 1))
        if indices is not None:
            moved["out_indices"] = kept
        if features is not None:
            moved["out_features"] = [f"stage{i}" for i in kept]
    return moved


def _cap_head_dim(item: Any) -> Any:
    if isinstance(item, dict) and isinstance(item.get("head_dim"), int):
        return {**item, "head_dim": min(item["head_dim"], 2 * HEAD_DIM)}
    return item


def _split(section: Sequence[int], total: int) -> list[int]:
    """``section`` rescaled to sum to ``total`` (multimodal RoPE's per-axis split)."""
    scaled = [max(1, v * total // max(1, sum(section))) for v in section]
    scaled[-1] += total - sum(scaled)
    return scaled


def shrink_config(model_type: str, level: int = 0) -> Any:
    """The default config of ``model_type``, shrunk (see :func:`shrink_overrides`)."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    return config_class(**shrink_overrides(config_class(), level))


# --------------------------------------------------------------------------- inputs


def _sub(config: Any, *names: str) -> Iterator[Any]:
    yield config
    for name in names:
        sub = getattr(config, name, None)
        if sub is not None:
            yield sub


def _first(config: Any, key: str, default: Any, *subs: str) -> Any:
    for part in _sub(config, *subs):
        value = getattr(part, key, None)
        if value is not None:
            return value
    return default


def _text_vocab(config: Any) -> int:
    vocab = _first(config, "vocab_size", VOCAB, "text_config", "decoder", "decoder_config")
    return int(vocab) if isinstance(vocab, int) and vocab > 0 else VOCAB


def _has_vocab(config: Any) -> bool:
    return isinstance(getattr(config, "vocab_size", None), int)


def _ids(config: Any, seq: int = SEQ) -> torch.Tensor:
    vocab = _text_vocab(config)
    specials = {
        int(v)
        for part in _sub(config, "text_config")
        for k, v in vars(part).items()
        if _is_token_id_key(k) and isinstance(v, int) and not isinstance(v, bool)
    }
    low = 4 if vocab > 64 else 0
    high = vocab - 40 if vocab > 100 else vocab
    ids = torch.randint(low, max(low + 1, high), (BATCH, seq))
    for token in specials:  # a special token in the ids can demand an input we do not give
        ids[ids == token] = low
    return ids


def _labels(head: str, config: Any, ids: torch.Tensor | None) -> torch.Tensor | None:
    if head in (
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
        "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
        "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    ):
        return ids
    if head in (
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    ):
        labels = int(getattr(config, "num_labels", 2) or 2)
        return torch.arange(BATCH) % labels
    if head == "MODEL_FOR_CTC_MAPPING_NAMES":
        return torch.randint(1, max(2, _text_vocab(config)), (BATCH, 2))
    if head == "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES":
        return _ids(config, 8)
    return None


def candidate_batches(model: nn.Module, config: Any, head: str) -> Iterator[dict[str, Any]]:
    """Dummy batches for the model's main input, most complete first."""
    name = getattr(model, "main_input_name", "input_ids")
    mains: list[torch.Tensor] = []
    if name in ("input_ids", "decoder_input_ids") or (name == "inputs" and _has_vocab(config)):
        mains.append(_ids(config))  # Perceiver's "inputs" are token ids for its text heads
    elif name in ("pixel_values", "pixel_values_videos"):
        size = _first(config, "image_size", IMAGE, "vision_config", "backbone_config")
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = int(_first(config, "num_channels", 3, "vision_config", "backbone_config"))
        frames = _first(config, "num_frames", None, "vision_config")
        if name == "pixel_values_videos":
            frames = frames if isinstance(frames, int) else _CAPS["num_frames"]
        else:
            mains.append(torch.randn(BATCH, channels, h, w))
        if isinstance(frames, int):
            mains.append(torch.randn(BATCH, frames, channels, h, w))
            mains.append(torch.randn(BATCH, channels, frames, h, w))
    elif name == "input_values":
        mains.append(torch.randn(BATCH, 8000))
        mains.append(torch.randn(BATCH, 1, 8000))  # codecs: (batch, channels, samples)
        mel = _first(config, "num_mel_bins", None)
        length = _first(config, "max_length", None)
        if isinstance(mel, int):
            mains.append(torch.randn(BATCH, length if isinstance(length, int) else 128, mel))
    elif name == "input_features":
        mel = _first(config, "num_mel_bins", None, "encoder_config", "audio_config")
        feat = _first(config, "feature_size", None, "encoder_config", "audio_config")
        channels = _first(config, "input_feat_per_channel", None)
        source = _first(config, "max_source_positions", None, "encoder_config", "audio_config")
        for bins in (mel, feat, channels):
            if isinstance(bins, int):
                if isinstance(source, int):
                    mains.append(torch.randn(BATCH, bins, 2 * source))
                mains.append(torch.randn(BATCH, 64, bins))
                mains.append(torch.randn(BATCH, bins, 64))
    elif name == "past_values":
        yield from _time_series_batches(model, config)
        return
    else:
        raise NotImplementedError(f"no dummy input for main_input_name {name!r}")
    ids = _ids(config) if name != "input_ids" else None
    for main in mains:
        labels = _labels(head, config, main if main.dtype == torch.long else ids)
        if labels is not None:
            yield {name: main, "labels": labels}
        yield {name: main}
        if getattr(config, "is_encoder_decoder", False):
            yield {name: main, "decoder_input_ids": _ids(config, 8)}
    # Last: the other modality too, for models that need both (CLIP-like dual encoders, BLIP).
    wanted = _forward_parameters(model)
    both: dict[str, Any] = {name: mains[0]} if mains else {}
    if both and name != "input_ids" and "input_ids" in wanted:
        both["input_ids"] = ids
    if both and name != "pixel_values" and "pixel_values" in wanted:
        size = _first(config, "image_size", IMAGE, "vision_config")
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        both["pixel_values"] = torch.randn(BATCH, 3, h, w)
    if len(both) > 1:
        labels = _labels(head, config, both.get("input_ids"))
        if labels is not None:
            yield {**both, "labels": labels}
        yield both


def _time_series_batches(model: nn.Module, config: Any) -> Iterator[dict[str, Any]]:
    """``past_values`` and, where forward takes them, the time features and future values."""
    context = int(getattr(config, "context_length", None) or 32)
    lags = getattr(config, "lags_sequence", None) or [0]
    length = context + max(lags)
    channels = int(
        getattr(config, "input_size", None) or getattr(config, "num_input_channels", None) or 1
    )
    horizon = int(getattr(config, "prediction_length", None) or 8)
    features = int(getattr(config, "num_time_features", None) or 0)
    wanted = _forward_parameters(model)
    for shape in ((BATCH, length, channels), (BATCH, length)):
        future = (BATCH, horizon, *shape[2:])
        batch: dict[str, Any] = {"past_values": torch.randn(shape)}
        extras = {
            "past_time_features": torch.randn(BATCH, length, features),
            "past_observed_mask": torch.ones(shape),
            "future_values": torch.randn(future),
            "future_time_features": torch.randn(BATCH, horizon, features),
        }
        batch.update({k: v for k, v in extras.items() if k in wanted})
        yield batch
        yield {"past_values": batch["past_values"]}


def _forward_parameters(model: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return []


def _loss(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss.reshape(())
    total = torch.zeros(())
    for tensor in _tensors(output):
        if tensor.is_floating_point() and tensor.requires_grad:
            total = total + tensor.float().mean()
    if not total.requires_grad:
        raise RuntimeError("the output has no floating-point tensor that requires grad")
    return total


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _unfed(model: nn.Module, batch: Mapping[str, Any]) -> list[str]:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return []
    return [
        name
        for name, p in params.items()
        if name not in batch
        and name not in _HOUSEKEEPING
        and not name.startswith(("output_", "return_", "use_"))
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


# --------------------------------------------------------------------------- causes


def _randomness(config: Any) -> list[str]:
    found: set[str] = set()
    from transformers import PreTrainedConfig

    def walk(part: Any) -> None:
        for key, value in vars(part).items():
            if isinstance(value, PreTrainedConfig):
                walk(value)
            elif "layerdrop" in key and isinstance(value, float) and value > 0:
                found.add("layerdrop")
            elif key in _EXPERT_KEYS and isinstance(value, int) and value > 1:
                found.add("moe")

    walk(config)
    return sorted(found)


def cause(
    kind: str, layer: str, message: str, random: list[str], unfed: list[str] | None = None
) -> str:
    """A coarse cause for one problem, from its kind, its layer (and parameter) name, the
    model's config (``random``: LayerDrop, MoE) and the forward() inputs the batch left out."""
    low = layer.lower()
    unfed = unfed or []
    if kind == "unused":
        if "moe" in random and re.search(r"expert|router|gate", low):
            return "unused: MoE expert not routed"
        if "layerdrop" in random and re.search(r"layers?\.\d+", low):
            return "unused: LayerDrop skipped a layer"
        if re.search(r"encoder_attn|crossattention|cross_attn|cross_attention", low):
            return "unused: cross-attention without encoder states"
        modality_words = (*_MODALITY, "mm_", "features", "input_values")
        modality_unfed = [u for u in unfed if any(w in u for w in modality_words)]
        if modality_unfed and any(word in low for word in _MODALITY):
            return "unused: modality tower not fed"
        if modality_unfed and any(word in low for word in _PROJECTOR):
            return "unused: multimodal projector not fed"
        if any(_shares_word(u, low) for u in unfed):
            return "unused: optional input not fed"
        if "indexer" in low:
            return "unused: sparse-attention indexer (trained by its own loss)"
        if any(word in low for word in _OPTIONAL):
            return "unused: optional-input parameter (mask/global token)"
        if re.search(_OFF_PATH, low):
            return "unused: pooler/head/final norm off the output's path"
        return "unused: other"
    if kind == "dead":
        if " all 0 values" in message:
            return "dead: zero-size layer"
        if any(_shares_word(u, low) for u in unfed):
            return "dead: optional input not fed"
        if re.search(r"router|gate\.wg|\.gate$", low):
            return "dead: MoE router"
        return "dead"
    if kind in ("vanishing", "exploding"):
        found = re.search(r"nearest the loss \(([^)]+)\)", message)
        if found is None:
            return f"absolute {kind}"
        tags = []
        with contextlib.suppress(ValueError):
            if float(found.group(1)) < 1e-9:
                tags.append("near-zero reference")
        if re.search(r"stem|embed|patch", low):
            tags.append("stem/embedding")
        if random:
            tags.append("random forward")
        return f"relative {kind}" + (f" ({', '.join(tags)})" if tags else "")
    return kind


def _shares_word(name: str, layer: str) -> bool:
    """Whether an input's name and a layer path share a distinctive word (``protein``,
    ``prompt``, ``audio``...)."""
    common = {"input", "inputs", "ids", "mask", "values", "states", "hidden", "attention"}
    words = set(re.split(r"[_.]", name)) - common
    return any(len(w) > 3 and w in layer for w in words)


# --------------------------------------------------------------------------- one model


@contextlib.contextmanager
def _alarm(seconds: int) -> Iterator[None]:
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum: int, frame: FrameType | None) -> None:
        raise SweepTimeout(f"timed out after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings and no transformers logging while building and checking."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _count_params(model_class: type[nn.Module], config: Any, strict: bool) -> int | None:
    """Parameter count of the model built on the meta device. When that fails: None, or with
    ``strict`` (the widths were kept: a real build could take gigabytes) the error."""
    try:
        with torch.device("meta"):
            model = model_class(config)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        if strict:
            raise
        return None


def build_and_check(model_type: str, timeout: int = 60) -> tuple[Record, Report | None]:
    """Build ``model_type`` small, run a bare forward+backward, then check its gradients.

    Never raises for the model's sake: what went wrong is in ``Record.error``.
    """
    record = Record(type=model_type)
    report: Report | None = None
    started = time.perf_counter()
    rng = torch.get_rng_state()
    try:
        with _quiet(), _alarm(timeout):
            report = _build_and_check(record)
    except BaseException as exc:  # the sweep never stops for one model
        if isinstance(exc, KeyboardInterrupt):
            raise
        text = f"{type(exc).__name__}: {exc}".strip()
        record.error = text.splitlines()[0][:300] if text else type(exc).__name__
    finally:
        torch.set_rng_state(rng)
        record.seconds = round(time.perf_counter() - started, 2)
        gc.collect()
    return record, report


def _build_and_check(record: Record) -> Report:
    classes = pick_classes(record.type)
    if not classes:
        raise LookupError("no auto-model class for this config")
    record.cls = classes[0][1]
    errors: list[Exception] = []
    found: tuple[nn.Module, Any, dict[str, Any]] | None = None
    for (head, class_name), level in itertools.product(classes, SHRINK_LEVELS):
        try:
            record.cls = class_name
            found = _build_and_run(record, _resolve_class(class_name), head, level)
        except SweepTimeout:
            raise
        except Exception as exc:
            errors.append(exc)
            continue
        record.level = level
        break
    if found is None:
        record.cls = classes[0][1]
        raise errors[0]  # the first class at the fullest shrink says most
    model, config, batch = found
    record.random = _randomness(config)
    record.inputs = sorted(batch)
    record.unfed = _unfed(model, batch)
    report = check_gradients(model, batch)
    record.checked = True
    record.ok = report.ok
    record.notes = [note.splitlines()[0] for note in report.notes]
    record.diagnosis = [line.splitlines()[0] for line in report.diagnosis if line]
    for problem in report.problems:
        first = problem.message.splitlines()[0] if problem.message else ""
        entry = (problem.kind, problem.layer, first)
        if entry not in record.problems:
            record.problems.append(entry)
            where = f"{problem.layer}.{problem.param}" if problem.param else problem.layer
            record.causes.append(cause(problem.kind, where, first, record.random, record.unfed))
    return report


def _build_and_run(
    record: Record, model_class: type[nn.Module], head: str, level: int
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Build at one shrink level and find a batch that runs forward and backward."""
    record.built = record.ran = False
    config = shrink_config(record.type, level)
    count = _count_params(model_class, config, strict=level == SHRINK_LEVELS[-1])
    if count is not None and count > MAX_PARAMS:
        raise MemoryError(f"{count / 1e6:.0f}M parameters after shrinking (limit {MAX_PARAMS})")
    torch.manual_seed(SEED)
    model = model_class(config)
    model.train()
    record.built = True
    record.params = sum(p.numel() for p in model.parameters())
    failure: Exception | None = None
    for candidate in candidate_batches(model, config, head):
        try:
            torch.manual_seed(SEED)
            _loss(model(**candidate)).backward()  # type: ignore[no-untyped-call]
        except SweepTimeout:
            raise
        except Exception as exc:
            failure = failure or exc
            continue
        finally:
            model.zero_grad(set_to_none=True)
        record.ran = True
        return model, config, candidate
    raise failure or RuntimeError("no dummy batch")


def build_and_check_isolated(model_type: str, timeout: int = 60, memory_gb: float = 6.0) -> Record:
    """:func:`build_and_check` in a forked child: a crash, a hang in native code or a model
    that eats the machine's memory (the child's address space is capped ``memory_gb`` above
    the parent's) costs that model only. Falls back to in-process where fork is missing."""
    if not hasattr(os, "fork"):
        return build_and_check(model_type, timeout)[0]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read)
        code = 0
        try:
            _cap_memory(memory_gb)
            record = build_and_check(model_type, timeout)[0]
            with os.fdopen(write, "w") as out:
                json.dump(record.to_json(), out)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout + 30
    killed = False
    with os.fdopen(read, "rb") as pipe:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([pipe], [], [], max(0.0, left))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            chunk = os.read(pipe.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    try:
        return Record.from_json(json.loads(b"".join(chunks)))
    except ValueError:
        if killed:
            why = f"killed after {timeout + 30} s"
        elif os.WIFSIGNALED(status):
            why = f"the child died of signal {os.WTERMSIG(status)}"
        else:
            why = f"the child exited with status {os.WEXITSTATUS(status)} and no record"
        return Record(type=model_type, cls=_first_class(model_type), error=f"Crash: {why}")


def _first_class(model_type: str) -> str:
    try:
        classes = pick_classes(model_type)
    except Exception:
        return ""
    return classes[0][1] if classes else ""


def _warm_up() -> None:
    """Import what every model needs once, before forking, so no child imports it again."""
    with _quiet(), contextlib.suppress(Exception):
        import transformers
        from transformers import modeling_utils  # noqa: F401

        import pytest_gradcheck.engine  # noqa: F401

        torch.manual_seed(SEED)
        config = transformers.BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
        )
        model = transformers.BertForMaskedLM(config)
        ids = torch.randint(0, 64, (BATCH, 4))
        check_gradients(model, {"input_ids": ids, "labels": ids})


def _cap_memory(memory_gb: float) -> None:
    """Cap this process's address space at its current size plus ``memory_gb``."""
    try:
        import resource

        with open("/proc/self/status") as status:
            kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
        limit = kb * 1024 + int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, OSError, StopIteration, ValueError):
        pass


# --------------------------------------------------------------------------- summary


def summarize(records: list[Record]) -> str:
    attempted = [r for r in records if r.cls]
    ran = [r for r in records if r.ran]
    checked = [r for r in records if r.checked]
    failed = [r for r in checked if not r.ok]
    lines = ["", "| type | class | verdict | kinds | error |", "|---|---|---|---|---|"]
    for r in records:
        if r.checked:
            verdict = "healthy" if r.ok else "unhealthy"
        elif r.ran:
            verdict = "check error"
        elif r.built:
            verdict = "run error"
        elif r.cls:
            verdict = "build error"
        else:
            verdict = "no class"
        kinds = ", ".join(sorted({k for k, _, _ in r.problems})) or "-"
        error = r.error.replace("|", "/")[:80] or "-"
        lines.append(f"| {r.type} | {r.cls or '-'} | {verdict} | {kinds} | {error} |")
    lines.append("")
    lines.append(
        f"model types: {len(records)}; attempted (a class found): {len(attempted)}; "
        f"built and ran: {len(ran)}; checked: {len(checked)}; "
        f"failed (unhealthy): {len(failed)}; healthy: {len(checked) - len(failed)}"
    )
    by_kind = Counter(k for r in failed for k in {p[0] for p in r.problems})
    by_cause = Counter(c for r in failed for c in set(r.causes))
    lines.append("failed models by kind: " + _counts(by_kind))
    lines.append("failed models by cause: " + _counts(by_cause))
    errors = Counter(r.error.split(":")[0] for r in records if r.error and r.cls)
    lines.append("errors by exception type: " + _counts(errors))
    return "\n".join(lines)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counter.most_common()) or "-"


def _line(record: Record) -> str:
    if record.checked:
        shown = dict.fromkeys((k, layer) for k, layer, _ in record.problems)
        what = (
            "healthy"
            if record.ok
            else "UNHEALTHY " + "; ".join(f"{k} {layer}" for k, layer in list(shown)[:3])
        )
    else:
        what = f"error {record.error[:120]}"
    return f"{record.type:<36} {record.cls[:40]:<40} {record.seconds:>6.1f}s  {what}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", help="comma-separated model types (default: every one)")
    parser.add_argument("--offset", type=int, default=0, help="skip this many model types")
    parser.add_argument("--limit", type=int, default=None, help="run at most this many")
    parser.add_argument("--json", type=Path, help="write one record per model type here")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per model (60)")
    parser.add_argument("--quiet", action="store_true", help="no table of verdicts")
    parser.add_argument(
        "--memory-gb", type=float, default=6.0, help="memory cap per model, GiB above the sweep's"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="no fork per model (a crash ends the sweep)"
    )
    parser.add_argument(
        "--failure-text",
        action="store_true",
        help="print each failing model's failure text, as a test would show it (in process)",
    )
    args = parser.parse_args(argv)
    types = model_types()
    if args.only:
        wanted = [t.strip() for t in args.only.split(",") if t.strip()]
        unknown = sorted(set(wanted) - set(types))
        if unknown:
            parser.error(f"unknown model type(s): {', '.join(unknown)}")
        types = wanted
    types = types[args.offset :]
    if args.limit is not None:
        types = types[: args.limit]
    if not args.in_process:
        _warm_up()
    records: list[Record] = []
    for model_type in types:
        if args.in_process or args.failure_text:
            record, report = build_and_check(model_type, args.timeout)
            if args.failure_text and report is not None and not report.ok:
                text = report.format_failure()
                print(f"{text}\n({len(text.splitlines())} lines)\n")
        else:
            record = build_and_check_isolated(model_type, args.timeout, args.memory_gb)
        records.append(record)
        print(_line(record), flush=True)
        if args.json:
            args.json.write_text(json.dumps([r.to_json() for r in records], indent=1))
    summary = summarize(records)
    if args.quiet:
        summary = "\n".join(summary.splitlines()[len(records) + 4 :])
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

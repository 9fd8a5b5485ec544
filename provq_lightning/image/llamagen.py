"""LlamaGen VQ checkpoints (VQ-8, VQ-16) as ``ImageTokenizer`` weights.

LlamaGen's ``VQModel`` (``tokenizer/tokenizer_image/vq_model.py``) and ``ImageTokenizer`` are the
same network: VQGAN encoder/decoder with attention at the lowest resolution, 1x1
``quant_conv`` / ``post_quant_conv``, an l2-normalised codebook. Only the names differ, and the
attention: LlamaGen has three 1x1 convs ``q``, ``k``, ``v``, provq one fused ``qkv`` conv whose
output channels are q, k, v in that order, so the three are stacked along dim 0. Every tensor is
mapped by name and checked by shape; a missing, unknown or misshapen key is a ``ProvqError``
naming it.

Which weights: LlamaGen's ``vq_train.py`` saves ``{"model", "optimizer", "discriminator",
"optimizer_disc", "steps", "args"}`` and, with ``--ema``, ``"ema"``; the released
``vq_ds16_c2i.pt`` / ``vq_ds8_c2i.pt`` hold ``"model"``. ``"model"`` is the default because it is
what LlamaGen's own sampling and code-extraction scripts load; ``weights="ema"`` (config prefix
``llamagen-ema:``) loads the EMA instead. LlamaGen's ``quantize.codebook_used`` buffer (a rolling
log of recent code ids, a usage statistic) has no counterpart and is dropped. The
discriminator (LlamaGen's ``NLayerDiscriminator.main.<i>`` is provq's
``PatchDiscriminator.net.<i>``) is loaded when the checkpoint has one and the model uses a GAN.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from provq_lightning.errors import ProvqError
from provq_lightning.runs.safe_load import load_weights_only
from provq_lightning.runs.state_keys import numbered_blocks, required_tensor

# Config syntax of ``ImageTokenizer(init_from=...)``: prefix -> checkpoint entry.
INIT_FROM_PREFIXES = {"llamagen": "model", "llamagen-ema": "ema"}
DROPPED_KEYS = frozenset({"quantize.codebook_used"})
# LlamaGen hard-codes these (Normalize() uses 32 groups; vq_train.py never passes
# codebook_l2_norm, so it is always True; its quantizer has no linear map).
FIXED_ARGS = {"norm_groups": 32, "l2_normalize": True, "linear_codebook": False}
ARCH_ARGS = ("ch", "ch_mult", "num_res_blocks", "z_channels", "num_codes", "code_dim")

# Name segments that differ; everything else (conv_in, mid, norm1, conv1, ...) is shared.
_RENAME = {
    "conv_blocks": "levels",
    "res": "blocks",
    "nin_shortcut": "shortcut",
    "proj_out": "proj",
    "downsample": "down",
    "upsample": "up",
    "quantize": "quantizer",
}
_BACK = {v: k for k, v in _RENAME.items()}
_QKV = ("q", "k", "v")


def parse_init_from(spec: str) -> tuple[Path, str]:
    """``llamagen:PATH`` -> (PATH, "model"); ``llamagen-ema:PATH`` -> (PATH, "ema")."""
    prefix, sep, path = spec.partition(":")
    if not sep or prefix not in INIT_FROM_PREFIXES or not path:
        raise ProvqError(
            f"model.init_args.init_from: {spec!r} is not understood; use llamagen:PATH (the "
            "checkpoint's 'model' weights) or llamagen-ema:PATH (its 'ema' weights)"
        )
    return Path(path), INIT_FROM_PREFIXES[prefix]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A LlamaGen checkpoint, loaded with ``weights_only=True`` (a file from the internet)."""
    path = Path(path)
    if not path.is_file():
        raise ProvqError(f"LlamaGen checkpoint {path} not found; pass the .pt file written by "
                         "LlamaGen (e.g. vq_ds16_c2i.pt)")
    # vq_train.py stores its argparse.Namespace under "args": a plain attribute bag.
    payload = load_weights_only(path, "LlamaGen checkpoint", allowed_globals=[argparse.Namespace])
    if not isinstance(payload, dict):
        raise ProvqError(f"LlamaGen checkpoint {path} holds a {type(payload).__name__}, not a "
                         "dict with a 'model' entry; pass a LlamaGen vq_train.py checkpoint")
    return payload


def select_weights(payload: dict[str, Any], path: Path, weights: str) -> dict[str, torch.Tensor]:
    """The ``weights`` entry ("model" or "ema") of a loaded checkpoint, as a state dict."""
    if weights not in ("model", "ema"):
        raise ProvqError(f"weights={weights!r} is not allowed; use 'model' or 'ema'")
    state = payload.get(weights)
    if not isinstance(state, dict) or not state:
        entries = ", ".join(sorted(map(str, payload))) or "nothing"
        hint = ("it was trained without --ema: load 'model'" if weights == "ema" else
                "is it a LlamaGen tokenizer checkpoint?")
        raise ProvqError(f"LlamaGen checkpoint {path} has no {weights!r} state dict (it holds "
                         f"{entries}); {hint}")
    return state


def _need(state: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    return required_tensor(state, key, f"LlamaGen checkpoint {path}", "a LlamaGen VQModel state "
                           "dict (tokenizer/tokenizer_image/vq_model.py)")


def infer_architecture(state: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """``ImageTokenizer`` shape arguments of a LlamaGen state dict (VQ-8, VQ-16, any width)."""
    ch = _need(state, "encoder.conv_in.weight", path).shape[0]
    levels = numbered_blocks(state, "encoder.conv_blocks.")
    ch_mult = [
        _need(state, f"encoder.conv_blocks.{i}.res.0.conv1.weight", path).shape[0] // ch
        for i in range(levels)
    ]
    num_codes, code_dim = _need(state, "quantize.embedding.weight", path).shape
    return {
        "ch": int(ch),
        "ch_mult": ch_mult,
        "num_res_blocks": numbered_blocks(state, "encoder.conv_blocks.0.res."),
        "z_channels": int(_need(state, "encoder.conv_out.weight", path).shape[0]),
        "num_codes": int(num_codes),
        "code_dim": int(code_dim),
    }


def check_architecture(hparams: Any, arch: dict[str, Any], path: Path, where: str) -> None:
    """Refuse model arguments that LlamaGen's network cannot have, naming the argument."""
    for key, want in {**arch, **FIXED_ARGS}.items():
        have = hparams[key]
        same = list(have) == list(want) if key == "ch_mult" else have == want
        if not same:
            raise ProvqError(f"{where}{key} is {have!r} but LlamaGen checkpoint {path} needs "
                             f"{want!r}; set {key}: {want!r}")


def provq_name(key: str) -> tuple[str, int | None]:
    """provq's name for a LlamaGen generator key, and the q/k/v slot of attention weights."""
    slot = None
    parts = []
    for part in key.split("."):
        if part in _QKV:
            slot, part = _QKV.index(part), "qkv"
        parts.append(_RENAME.get(part, part))
    return ".".join(parts), slot


def llamagen_name(name: str) -> str:
    """LlamaGen's name for a provq key (for messages; ``qkv`` becomes ``q|k|v``)."""
    return ".".join("q|k|v" if p == "qkv" else _BACK.get(p, p) for p in name.split("."))


def map_generator(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """LlamaGen generator state -> provq names; also the q/k/v keys whose siblings are missing
    and each provq name's LlamaGen key (for messages)."""
    mapped: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    attention: dict[str, list[torch.Tensor | None]] = {}
    for key, value in state.items():
        if key in DROPPED_KEYS:
            continue
        name, slot = provq_name(key)
        original[name] = key if slot is None else llamagen_name(name)
        if slot is None:
            mapped[name] = value
        else:
            attention.setdefault(name, [None, None, None])[slot] = value
    incomplete = []
    for name, parts in attention.items():
        if any(p is None for p in parts):
            stem = llamagen_name(name).replace("q|k|v", "{}")
            incomplete += [stem.format(q) for q, p in zip(_QKV, parts, strict=True) if p is None]
            continue
        mapped[name] = torch.cat(parts, dim=0)
    return mapped, incomplete, original


def _names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_mapped(
    module: nn.Module,
    mapped: dict[str, torch.Tensor],
    path: Path,
    what: str,
    incomplete: list[str] | None = None,
    original: dict[str, str] | None = None,
) -> None:
    """Copy ``mapped`` into ``module`` after checking that the key sets and shapes agree."""
    target = module.state_dict()
    original = original or {}
    unknown = sorted(original.get(k, k) for k in mapped if k not in target)
    if unknown:
        raise ProvqError(f"LlamaGen checkpoint {path}: unknown {what} key(s) {_names(unknown)} "
                         "(no parameter of this model); pass a LlamaGen VQ-8/VQ-16 checkpoint")
    missing = sorted(set(incomplete or ())) + sorted(
        f"{original.get(k, llamagen_name(k))} (provq {k})" for k in target if k not in mapped
    )
    if missing:
        raise ProvqError(f"LlamaGen checkpoint {path}: missing {what} key(s) {_names(missing)}; "
                         "the checkpoint is incomplete or from another architecture")
    for name, value in mapped.items():
        if tuple(value.shape) != tuple(target[name].shape):
            raise ProvqError(
                f"LlamaGen checkpoint {path}: {original.get(name, llamagen_name(name))} has "
                f"shape {tuple(value.shape)} but the model's {name} is "
                f"{tuple(target[name].shape)}; build the model with the checkpoint's shape "
                "(ImageTokenizer.from_llamagen reads it from the file)"
            )
    module.load_state_dict(mapped, strict=True)


def load_into(model: Any, payload: dict[str, Any], path: Path, weights: str = "model",
              where: str = "") -> None:
    """Load a read LlamaGen checkpoint into an ``ImageTokenizer`` whose shape matches it."""
    state = select_weights(payload, path, weights)
    check_architecture(model.hparams, infer_architecture(state, path), path, where)
    mapped, incomplete, original = map_generator(state)
    with torch.no_grad():
        load_mapped(model.generator(), mapped, path, f"{weights!r}", incomplete, original)
        if model.ema is not None:  # provq's own EMA starts at the loaded weights
            model.ema.restart(model.generator())
        disc = payload.get("discriminator")
        if model.loss.discriminator is not None and isinstance(disc, dict) and disc:
            renamed = {_disc_name(k): v for k, v in disc.items()}
            original = {_disc_name(k): k for k in disc}
            load_mapped(model.loss.discriminator, renamed, path, "'discriminator'", None,
                        original)


def build(cls: type, path: Path, weights: str, overrides: dict[str, Any]) -> Any:
    """``cls`` (an ``ImageTokenizer``) in the checkpoint's shape holding its ``weights``, in
    eval mode; ``overrides`` set the other arguments (``ImageTokenizer.from_llamagen``)."""
    payload = read_checkpoint(path)
    arch = infer_architecture(select_weights(payload, path, weights), path)
    model = cls(**{**arch, **FIXED_ARGS, **overrides})
    load_into(model, payload, path, weights)
    return model.eval()


def init_from(model: Any, spec: str) -> None:
    """``ImageTokenizer(init_from=spec)``: load ``llamagen:PATH`` or ``llamagen-ema:PATH``."""
    path, weights = parse_init_from(spec)
    load_into(model, read_checkpoint(path), path, weights, where="model.init_args.")


def _disc_name(key: str) -> str:
    # NLayerDiscriminator keeps its layers in ``main``, PatchDiscriminator in ``net``: same order.
    return "net" + key[len("main"):] if key.startswith("main.") else key

"""ESM3 and StructTokenBench structure VQ-VAE checkpoints as ``ProteinTokenizer`` weights.

provq's ``StructureEncoder(esm3=True)`` is ESM3's ``StructureTokenEncoder`` and
``ESM3StructureDecoder`` its ``StructureTokenDecoder`` (``esm/models/vqvae.py``), so their
weights load by name. Every tensor is mapped by name and checked by shape; a missing, unknown or
misshapen key is one ``ProvqError`` line naming it. Files are read with
``torch.load(weights_only=True)`` (``runs.safe_load``).

Formats:

- ESM3 encoder (``esm3_structure_encoder_v0.pth``): a plain state dict. Its network
  (``transformer.blocks.<i>.geom_attn.{s_norm,proj,out_proj,distance_scale_per_head,
  rotation_scale_per_head}``, ``transformer.blocks.<i>.ffn.{0,1,3}``, ``pre_vq_proj``,
  ``relative_positional_embedding``) becomes ``encoder.*`` (``blocks.<i>.attn.{norm,proj,out,
  distance_scale,rotation_scale}``, ``blocks.<i>.mlp.{0,1,3}``, ``proj``, ``rel_pos``);
  ``codebook.embeddings`` is the codebook ``quantizer.embedding.weight``. ``codebook.N`` and
  ``codebook.z_avg`` (the EMA statistics ESM3 trained the codebook with) have no counterpart
  and are dropped.
- ESM3 decoder (``esm3_structure_decoder_v0.pth``): a plain state dict whose names are
  ``decoder.*``'s (``embed``, ``decoder_stack``, ``affine_output_projection``,
  ``pairwise_classification_head``) with the token table (``decoder_head: esm3_tokens``);
  ``plddt_head.*`` (a confidence head provq does not use) is dropped.
- StructTokenBench (and the ProVQ paper's fork): a DeepSpeed ZeRO-2 folder
  ``.../checkpoint/mp_rank_00_model_states.pt`` whose ``module`` holds ``model.encoder.*``
  (ESM3's encoder names), ``model.quantizer.codebook.weight``, for AminoAseed
  ``model.quantizer.linear_proj.*`` (``quantizer.projection``), and ``model.decoder.*``
  (``post_vq_proj`` then ESM3's decoder names; ``decoder_head: esm3``);
  ``model.decoder.plddt_head.*`` and ``model.inverse_folding_head.*`` (an auxiliary sequence
  head) are dropped.

The shape arguments are read from the files (``from_esm3``, ``from_structtokenbench``); from a
config (``init_from: esm3:PATH`` or ``structtokenbench:PATH``) they must match. The attention
heads of the decoder are not in the files: ``decoder_heads`` defaults to width / 64 (ESM3's
1280 / 20 and StructTokenBench's 1024 / 16).

``protein/esm3_convert.py`` writes such a model as a provq run for ``provq-tokenize`` /
``provq-decode``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from provq_lightning.errors import ProvqError
from provq_lightning.runs.safe_load import load_weights_only
from provq_lightning.runs.state_keys import numbered_blocks, required_tensor

INIT_FROM_PREFIXES = ("esm3", "structtokenbench")
DEEPSPEED_FILE = "mp_rank_00_model_states.pt"
HEAD_DIM = 64  # decoder attention head width of ESM3 and StructTokenBench
ESM3_KNN = 16  # ESM3's neighbourhood size (a constant there)

# provq encoder names -> ESM3's (the other direction is read off the model's own keys).
_ENCODER_NAMES = (
    (r"^rel_pos\.", "relative_positional_embedding."),
    (r"^blocks\.(\d+)\.attn\.norm\.", r"transformer.blocks.\1.geom_attn.s_norm."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"transformer.blocks.\1.geom_attn.proj."),
    (r"^blocks\.(\d+)\.attn\.out\.", r"transformer.blocks.\1.geom_attn.out_proj."),
    (r"^blocks\.(\d+)\.attn\.distance_scale$",
     r"transformer.blocks.\1.geom_attn.distance_scale_per_head"),
    (r"^blocks\.(\d+)\.attn\.rotation_scale$",
     r"transformer.blocks.\1.geom_attn.rotation_scale_per_head"),
    (r"^blocks\.(\d+)\.mlp\.", r"transformer.blocks.\1.ffn."),
    (r"^proj\.", "pre_vq_proj."),
)
_QUANTIZER_NAMES = {
    "esm3": {"embedding.weight": "codebook.embeddings"},
    "structtokenbench": {
        "embedding.weight": "model.quantizer.codebook.weight",
        "projection.weight": "model.quantizer.linear_proj.weight",
        "projection.bias": "model.quantizer.linear_proj.bias",
    },
}
# Keys of the files that hold no provq weight (see the module docstring).
_DROPPED = {
    "esm3": ("codebook.N", "codebook.z_avg"),
    "esm3-decoder": ("plddt_head.",),
    "structtokenbench": ("model.decoder.plddt_head.", "model.inverse_folding_head."),
}
_LABEL = {
    "esm3": "ESM3 encoder checkpoint",
    "esm3-decoder": "ESM3 decoder checkpoint",
    "structtokenbench": "StructTokenBench checkpoint",
}


def esm3_encoder_name(key: str) -> str:
    """ESM3's name of a provq encoder key (without the ``encoder.`` prefix)."""
    for pattern, replacement in _ENCODER_NAMES:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return key


def parse_init_from(spec: str) -> tuple[str, Path]:
    """``esm3:PATH`` -> ("esm3", PATH); ``structtokenbench:PATH`` -> ("structtokenbench", PATH)."""
    prefix, sep, path = spec.partition(":")
    if not sep or prefix not in INIT_FROM_PREFIXES or not path:
        raise ProvqError(
            f"model.init_args.init_from: {spec!r} is not understood; use esm3:PATH (ESM3's "
            "structure encoder .pth) or structtokenbench:PATH (a StructTokenBench DeepSpeed "
            "checkpoint folder)"
        )
    return prefix, Path(path)


# -- reading ----------------------------------------------------------------------------------
def _tensors(payload: Any, path: Path, what: str, hint: str) -> dict[str, torch.Tensor]:
    if not isinstance(payload, dict) or not payload:
        raise ProvqError(f"{what} {path} holds a {type(payload).__name__}, not a state dict; "
                         f"{hint}")
    bad = [str(k) for k, v in payload.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ProvqError(f"{what} {path}: entry {bad[0]} is not a tensor, so this is not a state "
                         f"dict; {hint}")
    return payload


def read_esm3(path: str | Path, decoder: bool = False) -> dict[str, torch.Tensor]:
    """An ESM3 structure encoder (or ``decoder``) state dict, read weights-only."""
    path = Path(path)
    what = _LABEL["esm3-decoder" if decoder else "esm3"]
    name = "esm3_structure_decoder_v0.pth" if decoder else "esm3_structure_encoder_v0.pth"
    if not path.is_file():
        raise ProvqError(f"{what} {path} not found; pass the .pth file from ESM3's weights "
                         f"(data/weights/{name})")
    return _tensors(load_weights_only(path, what), path, what, f"pass ESM3's {name}")


def structtokenbench_file(path: str | Path) -> Path:
    """The model-states file of a DeepSpeed checkpoint: ``path`` itself, or
    ``path/checkpoint/mp_rank_00_model_states.pt``, or ``path/mp_rank_00_model_states.pt``."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / "checkpoint" / DEEPSPEED_FILE, path / DEEPSPEED_FILE):
        if candidate.is_file():
            return candidate
    raise ProvqError(
        f"StructTokenBench checkpoint {path} not found: expected the file or a DeepSpeed folder "
        f"holding checkpoint/{DEEPSPEED_FILE}; pass the checkpoint folder StructTokenBench saved"
    )


def read_structtokenbench(path: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The ``module`` state dict of a StructTokenBench DeepSpeed checkpoint, and its file."""
    file = structtokenbench_file(path)
    what = _LABEL["structtokenbench"]
    payload = load_weights_only(file, what)
    if not isinstance(payload, dict) or not isinstance(payload.get("module"), dict):
        held = ", ".join(sorted(map(str, payload))) if isinstance(payload, dict) else "no dict"
        raise ProvqError(f"{what} {file} has no 'module' state dict (it holds {held or 'nothing'});"
                         f" pass the DeepSpeed {DEEPSPEED_FILE} StructTokenBench wrote")
    return _tensors(payload["module"], file, what, "pass a StructTokenBench checkpoint"), file


# -- architecture -----------------------------------------------------------------------------
def _need(state: dict[str, torch.Tensor], key: str, path: Path, what: str) -> torch.Tensor:
    return required_tensor(state, key, f"{what} {path}", "an ESM3-style structure VQ-VAE "
                           "checkpoint (esm/models/vqvae.py)")


def encoder_arguments(state: dict[str, torch.Tensor], prefix: str, path: Path,
                      what: str) -> dict[str, Any]:
    """``ProteinTokenizer`` encoder arguments of ESM3-named encoder weights under ``prefix``."""
    rel = _need(state, f"{prefix}relative_positional_embedding.embedding.weight", path, what)
    proj = _need(state, f"{prefix}transformer.blocks.0.geom_attn.proj.weight", path, what)
    out = _need(state, f"{prefix}pre_vq_proj.weight", path, what)
    if proj.shape[0] % 15:
        raise ProvqError(f"{what} {path}: {prefix}transformer.blocks.0.geom_attn.proj.weight has "
                         f"{proj.shape[0]} rows, not 15 per vector head")
    return {
        "encoder_type": "esm3",
        "encoder_dim": int(rel.shape[1]),
        "encoder_heads": proj.shape[0] // 15,
        "encoder_layers": numbered_blocks(state, f"{prefix}transformer.blocks."),
        "rel_pos_bins": (rel.shape[0] - 2) // 2,
        "code_dim": int(out.shape[0]),
        "knn": ESM3_KNN,
    }


def decoder_arguments(state: dict[str, torch.Tensor], prefix: str, input_key: str, path: Path,
                      what: str) -> dict[str, Any]:
    """``ProteinTokenizer`` decoder arguments of ESM3-named decoder weights under ``prefix``."""
    inp = _need(state, f"{prefix}{input_key}", path, what)
    pair = _need(state, f"{prefix}pairwise_classification_head.downproject.weight", path, what)
    return {
        "decoder_dim": int(inp.shape[0] if input_key.startswith("post_vq_proj") else inp.shape[1]),
        "decoder_layers": numbered_blocks(state, f"{prefix}decoder_stack.blocks."),
        "pair_dim": int(pair.shape[0]),
    }


def esm3_arguments(encoder: dict[str, torch.Tensor], path: Path,
                   decoder: dict[str, torch.Tensor] | None = None,
                   decoder_path: Path | None = None) -> dict[str, Any]:
    """The shape arguments of an ESM3 encoder (and decoder) checkpoint."""
    args = encoder_arguments(encoder, "", path, _LABEL["esm3"])
    codebook = _need(encoder, "codebook.embeddings", path, _LABEL["esm3"])
    args.update(num_codes=int(codebook.shape[0]), variant="vanilla")
    if decoder is not None:
        args.update(decoder_arguments(decoder, "", "embed.weight", decoder_path,
                                      _LABEL["esm3-decoder"]), decoder_head="esm3_tokens")
    return args


def structtokenbench_arguments(module: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """The shape arguments of a StructTokenBench ``module`` state dict."""
    what = _LABEL["structtokenbench"]
    args = encoder_arguments(module, "model.encoder.", path, what)
    codebook = _need(module, "model.quantizer.codebook.weight", path, what)
    args.update(decoder_arguments(module, "model.decoder.", "post_vq_proj.weight", path, what))
    aminoaseed = "model.quantizer.linear_proj.weight" in module
    args.update(num_codes=int(codebook.shape[0]), decoder_head="esm3",
                variant="aminoaseed" if aminoaseed else "vanilla")
    return args


# ESM3 and StructTokenBench compare raw latents with the codes (no l2 normalisation).
FIXED_ARGS = {"l2_normalize": False}


def check_arguments(hparams: Any, args: dict[str, Any], path: Path, what: str) -> None:
    """Refuse model arguments the checkpoint contradicts, naming the argument."""
    for key, want in {**args, **FIXED_ARGS}.items():
        have = hparams[key]
        if have != want:
            raise ProvqError(f"model.init_args.{key} is {have!r} but {what} {path} needs "
                             f"{want!r}; set {key}: {want!r}")


# -- names and loading ------------------------------------------------------------------------
def expected_names(model: torch.nn.Module, kind: str,
                   with_decoder: bool) -> dict[str, str]:
    """provq key -> the file's key for every weight a file of ``kind`` provides."""
    names = {}
    encoder_prefix = "model.encoder." if kind == "structtokenbench" else ""
    for key in model.state_dict():
        part, _, rest = key.partition(".")
        if part == "encoder" and kind != "esm3-decoder":
            names[key] = encoder_prefix + esm3_encoder_name(rest)
        elif part == "quantizer" and kind != "esm3-decoder":
            names[key] = _QUANTIZER_NAMES[kind].get(rest, f"(none for quantizer.{rest})")
        elif part == "decoder" and with_decoder:
            names[key] = ("model.decoder." if kind == "structtokenbench" else "") + rest
    return names


def _names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def map_state(model: torch.nn.Module, state: dict[str, torch.Tensor], kind: str, path: Path,
              with_decoder: bool = True) -> dict[str, torch.Tensor]:
    """The file's tensors under provq's names, after checking names and shapes."""
    what = _LABEL[kind]
    names = expected_names(model, kind, with_decoder)
    wanted = set(names.values())
    dropped = _DROPPED[kind]
    unknown = sorted(k for k in state if k not in wanted and not k.startswith(dropped))
    if unknown:
        hint = ("its decoder needs decoder_head: esm3 (from_structtokenbench sets it)"
                if kind == "structtokenbench" and not with_decoder
                and any(k.startswith("model.decoder.") for k in unknown)
                else "it holds weights this model has no place for (another architecture?)")
        raise ProvqError(f"{what} {path}: unknown key(s) {_names(unknown)}; {hint}")
    missing = sorted(f"{source} (provq {key})" for key, source in names.items()
                     if source not in state)
    if missing:
        raise ProvqError(f"{what} {path}: missing key(s) {_names(missing)}; the checkpoint is "
                         "incomplete or of another architecture")
    target = model.state_dict()
    mapped = {}
    for key, source in names.items():
        value = state[source]
        if tuple(value.shape) != tuple(target[key].shape):
            raise ProvqError(f"{what} {path}: {source} has shape {tuple(value.shape)} but the "
                             f"model's {key} is {tuple(target[key].shape)}; build the model with "
                             "the checkpoint's shape (from_esm3 / from_structtokenbench read it)")
        mapped[key] = value
    return mapped


def load_mapped(model: torch.nn.Module, mapped: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        result = model.load_state_dict(mapped, strict=False)
    if result.unexpected_keys:  # map_state only returns the model's own keys
        raise ProvqError(f"internal: unexpected keys {_names(result.unexpected_keys)}")


def load_esm3(model: Any, encoder: dict[str, torch.Tensor], path: Path,
              decoder: dict[str, torch.Tensor] | None = None,
              decoder_path: Path | None = None) -> None:
    """ESM3 weights into a ``ProteinTokenizer`` of their shape."""
    check_arguments(model.hparams, esm3_arguments(encoder, path, decoder, decoder_path), path,
                    _LABEL["esm3"])
    if decoder is not None and model.hparams.num_codes > 4096:
        raise ProvqError(f"{_LABEL['esm3-decoder']} {decoder_path} reads 4096 codes but the "
                         f"encoder has {model.hparams.num_codes}")
    load_mapped(model, map_state(model, encoder, "esm3", path, with_decoder=False))
    if decoder is not None:
        load_mapped(model, map_state(model, decoder, "esm3-decoder", decoder_path))
    model.codebook_loaded = True


def load_structtokenbench(model: Any, module: dict[str, torch.Tensor], path: Path) -> None:
    """StructTokenBench weights into a ``ProteinTokenizer`` of their shape."""
    check_arguments(model.hparams, structtokenbench_arguments(module, path), path,
                    _LABEL["structtokenbench"])
    load_mapped(model, map_state(model, module, "structtokenbench", path))
    model.codebook_loaded = True


def default_heads(args: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    if "decoder_dim" in args and "decoder_heads" not in overrides:
        return {"decoder_heads": max(args["decoder_dim"] // HEAD_DIM, 1)}
    return {}


def build_esm3(cls: type, encoder_path: str | Path, decoder_path: str | Path | None,
               overrides: dict[str, Any]) -> Any:
    """``cls`` (a ``ProteinTokenizer``) in the checkpoints' shape holding their weights, in eval
    mode; ``overrides`` set the other arguments (``ProteinTokenizer.from_esm3``)."""
    encoder_path = Path(encoder_path)
    encoder = read_esm3(encoder_path)
    decoder = read_esm3(decoder_path, decoder=True) if decoder_path is not None else None
    dpath = Path(decoder_path) if decoder_path is not None else None
    args = esm3_arguments(encoder, encoder_path, decoder, dpath)
    args.update(FIXED_ARGS)
    if decoder is None:  # a fresh decoder of ESM3's kind that trains with the encoder
        args["decoder_head"] = "esm3"
    model = cls(**{**args, **default_heads(args, overrides), **overrides})
    load_esm3(model, encoder, encoder_path, decoder, dpath)
    return model.eval()


def build_structtokenbench(cls: type, path: str | Path, overrides: dict[str, Any]) -> Any:
    """``cls`` in a StructTokenBench checkpoint's shape holding its weights, in eval mode."""
    module, file = read_structtokenbench(path)
    args = {**structtokenbench_arguments(module, file), **FIXED_ARGS}
    model = cls(**{**args, **default_heads(args, overrides), **overrides})
    load_structtokenbench(model, module, file)
    return model.eval()


def init_from(model: Any, spec: str) -> None:
    """``ProteinTokenizer(init_from=spec)``: load ``esm3:PATH`` (encoder and codebook; the
    decoder stays as built) or ``structtokenbench:PATH`` (everything)."""
    kind, path = parse_init_from(spec)
    if kind == "esm3":
        encoder = read_esm3(path)
        check_arguments(model.hparams, esm3_arguments(encoder, path), path, _LABEL["esm3"])
        load_mapped(model, map_state(model, encoder, "esm3", path, with_decoder=False))
        model.codebook_loaded = True
    else:
        module, file = read_structtokenbench(path)
        load_structtokenbench(model, module, file)

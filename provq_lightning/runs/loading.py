"""Loading a finished run: its ``config.yaml``, model with checkpoint weights, and data.

One module for every tool that reads a run back (``provq-tokenize``/``provq-decode``,
``provq-rfid``, the image report): the config is found next to the checkpoint's
``checkpoints/`` folder and built through jsonargparse exactly as ``provq-fit`` built it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule, LightningModule

from provq_lightning.errors import ProvqError
from provq_lightning.runs.checkpoint_check import check_checkpoint_file, load_checkpoint
from provq_lightning.runs.migrations import upgrade_checkpoint
from provq_lightning.tokenizer import missing_contract


def find_config(ckpt: Path) -> Path:
    """``<log_dir>/config.yaml`` for ``<log_dir>/checkpoints/<name>.ckpt``."""
    for folder in (ckpt.parent, ckpt.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise ProvqError(
        f"no config.yaml next to {ckpt} or its parent folder; pass --config (the config.yaml "
        "that provq-fit wrote for this run)"
    )


def read_config(path: Path) -> dict[str, Any]:
    """A config file composed as provq-fit reads it, for tools that need its sections: a
    ``config:`` key names a base file (relative to this one) whose sections this file's keys
    replace; a dotted key (``trainer.logger.init_args.name``) sets one value inside them."""
    cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(cfg, dict):
        raise ProvqError(f"config {path} is not a YAML mapping; pass a provq-fit config")
    base = cfg.pop("config", None)
    merged = read_config(path.parent / base) if isinstance(base, str) else {}
    for key, value in cfg.items():
        *parents, leaf = key.split(".")
        target = merged
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return merged


def instantiate(config: dict[str, Any], key: str, base: type) -> Any:
    """A ``class_path``/``init_args`` section built through jsonargparse, like provq-fit does."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, key)
    parsed = parser.parse_object({key: config[key]})
    return parser.instantiate_classes(parsed)[key]


def load_run(
    ckpt: Path, config: Path | None, data_config: Path | None, device: str
) -> tuple[LightningModule, dict[str, Any]]:
    """The model with the checkpoint's weights (eval mode) and the run's config."""
    # A missing checkpoint is named before its missing config.yaml; a broken one after it.
    config_path = config or (find_config(ckpt) if ckpt.is_file() else None)
    check_checkpoint_file(ckpt)
    config_path = config_path or find_config(ckpt)
    cfg = yaml.safe_load(config_path.read_text())
    if data_config is not None:
        cfg["data"] = yaml.safe_load(data_config.read_text())["data"]
    model = instantiate(cfg, "model", LightningModule)
    missing = missing_contract(type(model))
    if missing:
        raise ProvqError(
            f"model {type(model).__name__} of {config_path} does not implement "
            f"{', '.join(m + '()' for m in missing)}; the tokenizer tools need a "
            "provq_lightning.tokenizer.VQTokenizer subclass with every member of its CONTRACT"
        )
    # Outside the try: its errors name the file. Older formats are upgraded, newer refused.
    state = upgrade_checkpoint(load_checkpoint(ckpt), ckpt)["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        # torch lists every mismatching weight over many lines; the first one is enough here.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else "RuntimeError"
        raise ProvqError(
            f"checkpoint {ckpt} does not fit the model of {config_path} ({detail[:160]}); pass "
            "--config with the config.yaml of the run that wrote this checkpoint"
        ) from None
    return model.to(device).eval(), cfg


def dataloader(cfg: dict[str, Any], split: str) -> Any:
    data = instantiate(cfg, "data", LightningDataModule)
    data.setup({"train": "fit", "val": "validate"}.get(split, split))
    loader = getattr(data, f"{split}_dataloader")()
    return loader, data

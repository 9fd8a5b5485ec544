"""``provq-fit --curriculum.<setting>``: override ProVQ's curriculum without restating callbacks.

The curriculum is a callback (``CurriculumCallback`` in ``trainer.callbacks``), and jsonargparse
can only replace a callback list as a whole. This argument group holds one optional value per
``CurriculumCallback`` setting; each value given (on the command line or as a ``curriculum:``
section of a config) is written into the config's ``CurriculumCallback`` entry, and a config
without one gets one. The group is then emptied again, so the effective values live in one place:
``trainer.callbacks``, which ``--print_config`` and the run's ``config.yaml`` show.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

from provq_lightning.callbacks.curriculum import CurriculumCallback

GROUP = "curriculum"


def curriculum_settings() -> dict[str, tuple[Any, Any]]:
    """``name -> (type, default)`` of every ``CurriculumCallback`` setting."""
    hints = typing.get_type_hints(CurriculumCallback.__init__)
    params = inspect.signature(CurriculumCallback.__init__).parameters
    return {name: (hints[name], p.default) for name, p in params.items() if name != "self"}


def add_curriculum_arguments(parser: LightningArgumentParser) -> None:
    """The ``curriculum`` group: every setting optional, ``None`` meaning "as configured"."""
    group = parser.add_argument_group(
        "Curriculum",
        "ProVQ's curriculum. Each value given overrides the CurriculumCallback in "
        "trainer.callbacks (one is added when the config has none); the others keep the "
        "config's values.",
    )
    for name, (hint, default) in curriculum_settings().items():
        group.add_argument(
            f"--{GROUP}.{name}",
            type=typing.Optional[hint],  # noqa: UP045 - hint is a runtime type object
            default=None,
            help=f"CurriculumCallback {name} (its default: {default!r})",
        )


def _is_curriculum(entry: Any) -> bool:
    class_path = getattr(entry, "class_path", None) if isinstance(entry, Namespace) else None
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False  # jsonargparse names the bad class_path itself, in its own check
    return isinstance(cls, type) and issubclass(cls, CurriculumCallback)


def apply_curriculum_overrides(cfg: Namespace) -> None:
    """Move the values set in ``cfg.curriculum`` into the config's ``CurriculumCallback``.

    ``cfg`` is one subcommand's config (or a whole parse result, whose subcommand is used).
    Idempotent: the group is emptied afterwards.
    """
    if not isinstance(cfg, Namespace):
        return
    subcommand = cfg.get("subcommand")
    if isinstance(subcommand, str) and isinstance(cfg.get(subcommand), Namespace):
        cfg = cfg[subcommand]
    section = cfg.get(GROUP)
    if not isinstance(section, Namespace):
        return
    overrides = {k: v for k, v in vars(section).items() if v is not None}
    if not overrides:
        return
    if cfg.get("trainer") is None:
        cfg["trainer"] = Namespace()
    callbacks = cfg["trainer"].get("callbacks")
    if callbacks is None:
        callbacks = []
    elif not isinstance(callbacks, list):
        callbacks = [callbacks]
    entry = next((c for c in callbacks if _is_curriculum(c)), None)
    if entry is None:
        defaults = {name: default for name, (_, default) in curriculum_settings().items()}
        path = f"{CurriculumCallback.__module__}.{CurriculumCallback.__qualname__}"
        entry = Namespace(class_path=path, init_args=Namespace(**defaults))
        callbacks.append(entry)
    if entry.get("init_args") is None:
        entry["init_args"] = Namespace()
    for name, value in overrides.items():
        entry["init_args"][name] = value
        section[name] = None
    cfg["trainer"]["callbacks"] = callbacks


class ProvqArgumentParser(LightningArgumentParser):
    """Lightning's parser, with the curriculum overrides merged as soon as a parse has them."""

    def _parse_common(self, cfg: Namespace, *args: Any, **kwargs: Any) -> Namespace:
        # jsonargparse prints --print_config inside this method, before its links and checks:
        # merging here makes the printed config the effective one, and the checks see it too.
        # (ProvqCLI merges again before instantiating, should a jsonargparse release rename it.)
        apply_curriculum_overrides(cfg)
        return super()._parse_common(cfg, *args, **kwargs)

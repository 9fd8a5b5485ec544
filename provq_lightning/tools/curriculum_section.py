"""The ``curriculum:`` config section of ``provq-fit``: ProVQ's curriculum in one place.

Every ``CurriculumCallback`` setting is an argument of the section (``--curriculum.warmup_steps``
on the command line, ``curriculum:`` in a config), so ``--print_config`` and a run's
``config.yaml`` show the effective curriculum there and nowhere else. ``provq-fit`` adds the
callback the section describes to the trainer's callbacks.

A section left at ``CurriculumCallback``'s defaults (``kmeans_init`` without warmup, which cannot
run) means the config has no curriculum: no callback, plain hard VQ from step 0, as before the
section existed.

Configs written before the section (every older run's ``config.yaml``) hold the curriculum as a
``CurriculumCallback`` entry of ``trainer.callbacks``; ``provq-fit`` reads them through
:func:`migrate_config`, which moves that entry into the section, so they still resume.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import yaml
from jsonargparse import Namespace, get_loader, set_loader
from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities import rank_zero_info

from provq_lightning.callbacks.curriculum import CurriculumCallback
from provq_lightning.errors import ProvqError

SECTION = "curriculum"
# provq-fit's parser mode: YAML, with configs of the old layout migrated as they are read.
PARSER_MODE = "provq_yaml"


def curriculum_defaults() -> dict[str, Any]:
    """``CurriculumCallback``'s settings at their defaults (the section when none is given)."""
    params = inspect.signature(CurriculumCallback.__init__).parameters
    return {name: p.default for name, p in params.items() if name != "self"}


def add_curriculum_section(parser: LightningArgumentParser) -> None:
    """The ``curriculum`` section: one argument per ``CurriculumCallback`` setting.

    Not ``add_lightning_class_args``: that instantiates the section whatever it holds, and the
    callback's defaults are no runnable curriculum, so a config without one would fail.
    :func:`curriculum_callback` builds the callback instead.
    """
    parser.add_class_arguments(
        CurriculumCallback,
        SECTION,
        fail_untyped=False,
        instantiate=False,
        sub_configs=True,  # `curriculum: path/to/curriculum.yaml` works too
        help="ProVQ's curriculum (CurriculumCallback). Left at these defaults: no curriculum, "
        "plain hard VQ from step 0.",
    )


def curriculum_callback(section: Namespace | dict | None) -> CurriculumCallback | None:
    """The callback the section describes, or None when it is left at the defaults."""
    settings = dict(section.items()) if isinstance(section, Namespace) else dict(section or {})
    if settings == curriculum_defaults() or not settings:
        return None
    return CurriculumCallback(**settings)


def check_one_curriculum(configured: list[Callback]) -> None:
    """Refuse a second curriculum: a CurriculumCallback (or subclass) in trainer.callbacks too."""
    for callback in configured:
        if isinstance(callback, CurriculumCallback):
            raise ProvqError(
                f"trainer.callbacks has a {type(callback).__name__} and the `curriculum:` section "
                "sets one too; a run has one curriculum: drop the section's settings, or the entry"
            )


# -- configs of the old layout -----------------------------------------------------------------
def _is_curriculum_entry(entry: Any) -> bool:
    class_path = entry.get("class_path") if isinstance(entry, dict) else None
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False  # jsonargparse names a bad class_path itself, in its own check
    # A subclass stays a callback of its own: the section builds exactly CurriculumCallback.
    return cls is CurriculumCallback


def migrate_config(config: Any, path: str = "") -> Any:
    """``config`` with a ``CurriculumCallback`` entry of ``trainer.callbacks`` moved into the
    ``curriculum`` section (one log line naming the file); anything else is returned as is.

    Older provq wrote every run's ``config.yaml`` this way, next to an emptied ``curriculum``
    section (all null) whose non-null values, where a config set some, override the entry's, as
    they did then.
    """
    if not isinstance(config, dict):
        return config
    section = config.get(SECTION)
    if isinstance(section, dict) and section and all(v is None for v in section.values()):
        section = None  # the emptied section older provq wrote: it sets nothing
        config = {k: v for k, v in config.items() if k != SECTION}
    trainer = config.get("trainer")
    callbacks = trainer.get("callbacks") if isinstance(trainer, dict) else None
    if not isinstance(callbacks, list):
        return config
    entries = [c for c in callbacks if _is_curriculum_entry(c)]
    if not entries:
        return config
    where = path or "a config"
    if len(entries) > 1:
        raise ProvqError(
            f"{where}: {len(entries)} CurriculumCallback entries in trainer.callbacks; a run has "
            "one curriculum: keep one, as a top-level `curriculum:` section of its settings"
        )
    (entry,) = entries
    settings = dict(entry.get("init_args") or {})
    if isinstance(section, dict):
        settings.update({k: v for k, v in section.items() if v is not None})
    rest = [c for c in callbacks if c is not entry]
    config = {**config, "trainer": {**trainer, "callbacks": rest}, SECTION: settings}
    rank_zero_info(
        f"[provq] {where}: moved the CurriculumCallback of trainer.callbacks into its "
        "`curriculum:` section (the config layout of older provq)"
    )
    return config


def _load_migrated(text: str, path: str = "") -> Any:
    return migrate_config(get_loader("yaml")(text), str(path))  # jsonargparse: the file's name


set_loader(PARSER_MODE, _load_migrated, exceptions=(yaml.YAMLError,))

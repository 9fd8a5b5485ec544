"""The experiment configs that ship with provq, found by name: ``provq-fit --config in1k_16x16``.

The wheel carries ``experiments/`` as ``provq_lightning/experiments`` (a mapped folder in the
repository, see setup.py), so an installed provq trains a shipped config without a checkout. A
``--config`` value that exists relative to the working directory always wins; otherwise
``topodisc_provq``, ``topodisc_provq.yaml``, ``in100/provq`` and
``experiments/in100/provq.yaml`` all name the shipped file. Paths inside a config (data,
``save_dir: runs``) stay relative to the working directory, as they are for a config given by
path; the base a variant names (``config: topodisc_base.yaml``) is found beside the variant,
so ``--config topodisc_provq`` is the whole run.
"""

from __future__ import annotations

import difflib
import re
from importlib.resources import files
from pathlib import Path

from provq_lightning.errors import ProvqError

CONFIG_FLAGS = ("--config", "-c")
# Sweep specs are provq-sweep's input, not provq-fit configs.
_NOT_FIT_CONFIGS = ("sweeps",)
# A config name or path; anything else (an inline YAML string, a URL) is left to jsonargparse.
_NAME = re.compile(r"[\w./-]+")
# Named in the error for an unknown config: one per family.
_EXAMPLES = ("topodisc_provq", "in1k_16x16", "in100/provq", "imagenet_sample_64px",
             "proteins_sample")


def shipped_root() -> Path:
    """The directory of the shipped configs (in a checkout: the repository's ``experiments/``)."""
    return Path(str(files("provq_lightning.experiments")))


def shipped_names() -> list[str]:
    """Every shipped fit config, as ``provq-fit --config`` takes it: ``in100/provq``, ..."""
    root = shipped_root()
    names = [p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")]
    return sorted(n for n in names if n.split("/")[0] not in _NOT_FIT_CONFIGS)


def find_shipped_config(name: str) -> Path | None:
    """The shipped config ``name`` refers to, or None."""
    rel = name.removeprefix("./").removeprefix("experiments/")
    root = shipped_root()
    for candidate in (rel, f"{rel}.yaml"):
        path = root / candidate
        if path.suffix == ".yaml" and path.is_file():
            return path
    return None


def resolve_config(value: str) -> str:
    """``value`` itself when it is a file here (or not a name), else the shipped config's path."""
    if Path(value).exists() or not _NAME.fullmatch(value):
        return value
    found = find_shipped_config(value)
    if found is not None:
        return str(found)
    names = shipped_names()
    # The closest names first (a typo), then a few others, so the line stays one line.
    close = difflib.get_close_matches(value.removesuffix(".yaml"), names, n=3, cutoff=0.6)
    few = close + [n for n in _EXAMPLES if n in names and n not in close][: 5 - len(close)]
    raise ProvqError(
        f"--config {value}: no such file in {Path.cwd()} and no shipped config of that name; "
        f"give a path, or a shipped name: {', '.join(few)}, ... ({len(names)} shipped)"
    )


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config``/``-c`` value that names a shipped config made a path."""
    out: list[str] = []
    expect_value = False
    for arg in argv:
        if expect_value:
            out.append(resolve_config(arg))
            expect_value = False
        elif arg in CONFIG_FLAGS:
            out.append(arg)
            expect_value = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.removeprefix("--config=")))
        else:
            out.append(arg)
    return out

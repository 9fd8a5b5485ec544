"""The pre-flight of ``provq-fit``: everything a fit's config needs from this machine, checked
before anything is built, and reported as one block.

A fit that lacks its GPUs, its data and its pretrained weights used to fail on the first of
them, after seconds to minutes of building, with a traceback; fixing that one showed the next.
Here each need is a small pure check that returns a list of ``Problem`` (what is missing, under
which config key, and the fix), so all of them are found in one go:

- the accelerator: ``trainer.accelerator: gpu`` with ``trainer.devices`` GPUs visible;
- the cluster: ``trainer.num_nodes > 1`` needs a launcher (srun, torchrun); under srun,
  ``--ntasks-per-node`` / ``--nodes`` must equal ``trainer.devices`` / ``trainer.num_nodes``;
  an environment variable a data path names (``$SLURM_TMPDIR/...``) must be set;
- the data, by datamodule class (``DATA_CHECKS``): shard indexes or shard files, image folders,
  structure sources, class lists;
- the model, by model class (``MODEL_CHECKS``): the LPIPS and FID Inception weight files and a
  LlamaGen checkpoint to start from.

A class is matched through its bases, so a subclass of a shipped datamodule or model is checked
as its base is. The checks only look (``stat``); nothing is read, downloaded or built.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provq_lightning.data.paths import (
    REPO_ROOT,
    SHARED_PREFIX,
    experiments_parent,
    resolve_data_path,
)
from provq_lightning.errors import ProvqError

# Where the official weight files come from (the file names are those provq looks for).
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
FID_INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     "pt_inception-2015-12-05-6726825d.pth")
LPIPS_LINEAR_FILE = Path("weights") / "v0.1" / "vgg.pth"  # inside the lpips package
LPIPS_SOURCE = "github.com/richzhang/PerceptualSimilarity (lpips/weights/v0.1/vgg.pth)"
INDEX_NAME = "index.json"  # the shard index provq-make-shards writes (image/shards.py)

_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")
# Variables that tell a process it was started by a multi-node launcher.
_LAUNCHERS = {
    "srun": ("SLURM_NTASKS",),
    "torchrun": ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    "a manual launch": ("MASTER_ADDR", "NODE_RANK"),
    "mpirun": ("OMPI_COMM_WORLD_SIZE",),
    "LSF": ("LSB_JOBID",),
}


@dataclass(frozen=True)
class Problem:
    """One thing a fit needs that is missing: the config key, what is wrong, and the fix."""

    key: str
    missing: str
    fix: str


class PreflightError(ProvqError):
    """The pre-flight found problems; the message lists all of them, one block."""


Check = Callable[[Mapping[str, Any], str], list[Problem]]


# -- the machine ----------------------------------------------------------------------------
def gpus_needed(devices: Any) -> int:
    """Visible GPUs that Lightning's ``devices`` value needs: a count, ``-1``/``"auto"`` (at
    least one), or GPU indices (``[0, 3]``, ``"0,3"``: index 3 must exist). A value it cannot
    read needs none here: Lightning refuses it in its own words."""
    try:
        return _gpus_needed(devices)
    except (TypeError, ValueError):
        return 0


def _gpus_needed(devices: Any) -> int:
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return 1
        if "," not in text and text.isdigit():
            return int(text)
        devices = [int(part) for part in text.split(",") if part.strip()]
    if isinstance(devices, (list, tuple)):
        return max((int(i) for i in devices), default=-1) + 1
    if devices is None or int(devices) == -1:
        return 1
    return int(devices)


def check_accelerator(
    trainer: Mapping[str, Any], visible_gpus: int, cuda_build: str | None, mps: bool = False
) -> list[Problem]:
    """``trainer.accelerator: gpu/cuda`` needs ``trainer.devices`` visible CUDA GPUs."""
    accelerator = trainer.get("accelerator")
    if not isinstance(accelerator, str):
        return []  # "auto", or an accelerator instance: Lightning decides
    accelerator = accelerator.lower()
    if accelerator == "mps" and not mps:
        return [Problem("trainer.accelerator", "mps: no Apple-silicon GPU here",
                        "--trainer.accelerator cpu (or auto)")]
    if accelerator not in ("gpu", "cuda") or (accelerator == "gpu" and mps):
        return []
    devices = trainer.get("devices", "auto")
    needed = gpus_needed(devices)
    if visible_gpus >= needed:
        return []
    asked = f"{accelerator} with trainer.devices {devices}"
    on_cpu = "--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto"
    if visible_gpus == 0:
        why = ("this torch is a CPU-only build" if cuda_build is None
               else f"torch is built for CUDA {cuda_build}, but no CUDA GPU is visible")
        where = f"a machine with {needed} GPU{'s' if needed > 1 else ''}"
        return [Problem("trainer.accelerator", f"{asked}: {why}",
                        f"run on {where} (a GPU node; check CUDA_VISIBLE_DEVICES), or train "
                        f"on the CPU: {on_cpu}")]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    limited = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    return [Problem("trainer.devices", f"{devices} with trainer.accelerator {accelerator}: only "
                    f"{visible_gpus} GPU"
                    f"{'s are' if visible_gpus > 1 else ' is'} visible{limited}",
                    f"--trainer.devices {visible_gpus}, or run where {needed} GPUs are visible")]


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def check_cluster(trainer: Mapping[str, Any], env: Mapping[str, str]) -> list[Problem]:
    """Multi-node fits need a launcher; under srun its task layout must match the trainer's."""
    problems = []
    nodes = _int(trainer.get("num_nodes", 1)) or 1
    interactive = env.get("SLURM_JOB_NAME") in ("bash", "interactive")  # Lightning's rule
    under_srun = "SLURM_NTASKS" in env and not interactive
    launched = any(all(name in env for name in names) for names in _LAUNCHERS.values())
    if nodes > 1 and not launched:
        problems.append(Problem(
            "trainer.num_nodes",
            f"{nodes} nodes, but no multi-node launcher started this process (no SLURM_NTASKS "
            "from srun, no torchrun or MASTER_ADDR/NODE_RANK variables)",
            f"inside an sbatch job with --nodes={nodes} --ntasks-per-node=<trainer.devices>, "
            "start it with `srun provq-fit ...` (docs/cluster.md), or with torchrun on every "
            "node; on one machine: --trainer.num_nodes 1",
        ))
    if not under_srun:
        return problems
    devices = trainer.get("devices")
    per_node = env.get("SLURM_NTASKS_PER_NODE", "")
    if isinstance(devices, int) and devices > 0 and per_node.isdigit() and int(per_node) != devices:
        problems.append(Problem(
            "trainer.devices",
            f"{devices} per node, but srun starts --ntasks-per-node={per_node} tasks per node "
            "(one process per device)",
            f"--trainer.devices {per_node}, or sbatch --ntasks-per-node={devices}",
        ))
    slurm_nodes = env.get("SLURM_NNODES", "")
    if slurm_nodes.isdigit() and int(slurm_nodes) != nodes:
        problems.append(Problem(
            "trainer.num_nodes",
            f"{nodes}, but the SLURM job has --nodes={slurm_nodes}",
            f"--trainer.num_nodes {slurm_nodes} (or \"$SLURM_JOB_NUM_NODES\", as provq-sweep "
            "passes it)",
        ))
    return problems


# -- paths ----------------------------------------------------------------------------------
def unset_variables(text: str, env: Mapping[str, str]) -> list[str]:
    """Names of the ``$NAME`` / ``${NAME}`` variables in ``text`` that ``env`` does not set."""
    names = [a or b for a, b in _VARIABLE.findall(text)]
    return [name for name in dict.fromkeys(names) if name not in env]


def variable_problems(key: str, value: str, env: Mapping[str, str]) -> list[Problem]:
    """A path that names an unset variable: ``os.path.expandvars`` would leave it as text."""
    problems = []
    for name in unset_variables(value, env):
        where = ("run it inside the SLURM job (sbatch and srun set SLURM_* variables)"
                 if name.startswith("SLURM_") else f"export {name}=...")
        problems.append(Problem(key, f"{value!r} names ${name}, which is not set here",
                                f"{where}, or write the path out in {key}"))
    return problems


def _looked(written: str, resolved: Path) -> str:
    """Where a config path was looked for: a relative one in the working directory, then
    under the fallback root (``data.paths.resolve_data_path``'s rule)."""
    path = Path(os.path.expandvars(written)).expanduser()
    if path.is_absolute():
        return str(resolved)
    if path.parts[:3] == SHARED_PREFIX:
        return f"{resolved} (../shared/data is $PROVQ_SHARED_DATA, else <repo>/../shared/data)"
    here = (Path.cwd() / path).resolve()
    return str(resolved) if here == resolved else f"{here} and {resolved}"


def check_path(key: str, value: str, kind: str, fix: str, env: Mapping[str, str],
               root: Path = REPO_ROOT) -> list[Problem]:
    """``value`` (a config path) must exist as a ``kind``: ``folder``, ``file`` or ``path``
    (either), after its variables are expanded."""
    problems = variable_problems(key, value, env)
    if problems:
        return problems
    resolved = resolve_data_path(value, root=root)
    found = {"folder": resolved.is_dir, "file": resolved.is_file, "path": resolved.exists}[kind]
    if found():
        return []
    what = "" if kind == "path" else f"{kind} "
    return [Problem(key, f"{what}{value} not found: looked at {_looked(value, resolved)}", fix)]


# -- data -----------------------------------------------------------------------------------
def _shards_fix(key: str, out_dir: str) -> str:
    split = "val" if "val" in key.rsplit(".", 1)[-1] else "train"
    return (f"write them with `provq-make-shards <ImageNet {split} folder> {out_dir}` (it writes "
            f"the shards and {INDEX_NAME} there; --shard-size sets samples per shard), or give "
            "the shard URLs (brace patterns) with data.init_args.samples_per_shard")


def check_shards(key: str, shards: str | list[str], samples_per_shard: int | None,
                 env: Mapping[str, str]) -> list[Problem]:
    """Webdataset shards as ``ImageNetDataModule`` reads them: an ``index.json``, a folder
    holding one, or URL patterns plus ``samples_per_shard`` (local files must exist)."""
    from provq_lightning.image.shards import expand_urls

    texts = shards if isinstance(shards, list) else [str(shards)]
    problems = [p for text in texts for p in variable_problems(key, text, env)]
    if problems:
        return problems
    root = experiments_parent()
    if isinstance(shards, str) and shards.endswith(".json"):
        index = resolve_data_path(shards, root=root)
        if index.is_file():
            return []
        return [Problem(key, f"shard index {shards} not found: looked at {_looked(shards, index)}",
                        _shards_fix(key, str(Path(shards).parent)))]
    if isinstance(shards, str) and "{" not in shards and "::" not in shards:
        folder = resolve_data_path(shards, root=root)
        if folder.is_dir():
            if (folder / INDEX_NAME).is_file():
                return []
            return [Problem(key, f"shard folder {folder} has no {INDEX_NAME}",
                            _shards_fix(key, shards))]
    if samples_per_shard is None:
        return [Problem(key, f"{shards!r} is neither a shard index ({INDEX_NAME}) nor a folder "
                        "holding one, and data.init_args.samples_per_shard is not set",
                        "point it at the index.json provq-make-shards wrote, or set "
                        "data.init_args.samples_per_shard (the sample count of every shard) "
                        "for shard URLs")]
    local = [u for u in expand_urls(shards) if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not resolve_data_path(u, root=root).is_file()]
    if not missing:
        return []
    first = ", ".join(missing[:2]) + (f" and {len(missing) - 2} more" if len(missing) > 2 else "")
    return [Problem(key, f"{len(missing)} of {len(local)} shard files not found: {first}",
                    _shards_fix(key, str(Path(missing[0]).parent)))]


CLASS_LIST_FIX = "give a text file of wnids, one per line (e.g. experiments/in100/classes.txt)"


def check_imagenet_data(args: Mapping[str, Any], key: str,
                        env: Mapping[str, str] | None = None) -> list[Problem]:
    """``ImageNetDataModule``: training and validation shards, the class list."""
    env = os.environ if env is None else env
    per_shard = args.get("samples_per_shard")
    problems = check_shards(f"{key}.train_shards", args["train_shards"], per_shard, env)
    if args.get("val_shards") is not None:
        problems += check_shards(f"{key}.val_shards", args["val_shards"], per_shard, env)
    if args.get("class_list"):
        problems += check_path(f"{key}.class_list", args["class_list"], "file", CLASS_LIST_FIX,
                               env, root=experiments_parent())
    return problems


def check_image_folder_data(args: Mapping[str, Any], key: str,
                            env: Mapping[str, str] | None = None) -> list[Problem]:
    """``ImageFolderDataModule``: the training (and validation) folder, the class list."""
    env = os.environ if env is None else env
    fix = ("point it at a folder of class subfolders (<wnid>/*.JPEG) or of <wnid>_*.JPEG files "
           "(the shared sample: ../shared/data/images/imagenet_sample; PROVQ_SHARED_DATA says "
           "where ../shared/data is)")
    root = experiments_parent()
    problems = check_path(f"{key}.root", args["root"], "folder", fix, env, root=root)
    if args.get("val_root") is not None:
        problems += check_path(f"{key}.val_root", args["val_root"], "folder", fix, env, root=root)
    if args.get("class_list"):
        problems += check_path(f"{key}.class_list", args["class_list"], "file", CLASS_LIST_FIX,
                               env, root=root)
    return problems


def check_protein_data(args: Mapping[str, Any], key: str,
                       env: Mapping[str, str] | None = None) -> list[Problem]:
    """``ProteinStructureDataModule``: every structure source, training-only ones too."""
    env = os.environ if env is None else env
    fix = ("give a folder of structures (.pdb/.cif/.bcif, optionally .gz), a structure file or "
           "a text file listing them (the shared sample: ../shared/data/proteins; "
           "PROVQ_SHARED_DATA says where ../shared/data is)")
    problems = []
    for name in ("sources", "train_sources"):
        value = args.get(name)
        for source in [value] if isinstance(value, str) else list(value or []):
            problems += check_path(f"{key}.{name}", str(source), "path", fix, env)
    return problems


# -- model ----------------------------------------------------------------------------------
def lpips_linear_layers() -> Path | None:
    """The LPIPS linear-layer file inside the installed ``lpips`` package (None: no package)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / LPIPS_LINEAR_FILE


def _weights(key: str, configured: str | None, hub: Path, filename: str, what: str,
             source: str, off: str) -> list[Problem]:
    """A weight file at its config path, else in the hub cache (``image.pretrained``'s rule)."""
    path = Path(configured).expanduser() if configured else hub / filename
    if path.is_file():
        return []
    put = (f"put it at {path}" if configured
           else f"put it at {path} ($TORCH_HOME/hub/checkpoints) or give its path in {key}")
    return [Problem(key, f"{what} needs {filename}, not found at {path}",
                    f"download {source}; {put}; or turn it off: {off}")]


def check_image_tokenizer(args: Mapping[str, Any], key: str, hub: Path | None = None,
                          lpips_linear: Path | None | bool = True) -> list[Problem]:
    """``ImageTokenizer``: LPIPS (loss or evaluation) and rFID weights, ``init_from``.

    The nets needed are those ``image.metrics.frozen_nets`` builds: LPIPS when
    ``lpips_weight > 0`` or ``eval_lpips``, the FID Inception when ``eval_fid``.
    ``lpips_linear``: the package's linear-layer file (True: look it up).
    """
    # Only image configs get here, and they import the image room anyway.
    from provq_lightning.image.pretrained import (
        FID_INCEPTION_FILE,
        VGG16_FILE,
        hub_checkpoint_dir,
    )

    hub = hub_checkpoint_dir() if hub is None else hub
    problems = []
    if float(args.get("lpips_weight", 1.0)) > 0 or args.get("eval_lpips", True):
        off = f"{key}.lpips_weight 0 and {key}.eval_lpips false"
        problems += _weights(f"{key}.lpips_vgg_path", args.get("lpips_vgg_path"), hub,
                             VGG16_FILE, "LPIPS (its VGG16 trunk: torchvision's "
                             "ImageNet weights)", VGG16_URL, off)
        linear = lpips_linear_layers() if lpips_linear is True else lpips_linear
        if linear is None or not linear.is_file():
            where = f"not at {linear}" if linear else "the lpips package is not installed"
            problems.append(Problem(
                f"{key}.lpips_weight", f"LPIPS needs its calibrated linear layers vgg.pth "
                f"({LPIPS_LINEAR_FILE} inside the lpips package): {where}",
                f"pip install lpips (the package ships the file; source: {LPIPS_SOURCE}); or "
                f"turn LPIPS off: {off}"))
    if args.get("eval_fid", True):
        problems += _weights(f"{key}.fid_inception_path", args.get("fid_inception_path"), hub,
                             FID_INCEPTION_FILE,
                             "rFID (pytorch-fid's FID Inception-V3)", FID_INCEPTION_URL,
                             f"{key}.eval_fid false")
    init_from = args.get("init_from")
    if init_from:
        from provq_lightning.image.llamagen import parse_init_from

        try:
            path, _ = parse_init_from(str(init_from))
        except ProvqError:
            return [*problems, Problem(f"{key}.init_from", f"{init_from!r} is not understood",
                                       "use llamagen:PATH (the checkpoint's 'model' weights) or "
                                       "llamagen-ema:PATH (its 'ema' weights)")]
        if not path.expanduser().is_file():
            problems.append(Problem(f"{key}.init_from", f"LlamaGen checkpoint {path} not found",
                                    "give the path of the .pt file LlamaGen's vq_train.py "
                                    "wrote (docs/images.md), or drop init_from"))
    return problems


# -- the registry and the glue --------------------------------------------------------------
DATA_CHECKS: dict[str, Check] = {
    "provq_lightning.datamodules.imagenet.ImageNetDataModule": check_imagenet_data,
    "provq_lightning.datamodules.image_folder.ImageFolderDataModule": check_image_folder_data,
    "provq_lightning.datamodules.proteins.ProteinStructureDataModule": check_protein_data,
}
MODEL_CHECKS: dict[str, Check] = {
    "provq_lightning.image.tokenizer.ImageTokenizer": check_image_tokenizer,
}


def check_for(class_path: str, registry: Mapping[str, Check]) -> Check | None:
    """The check registered for ``class_path`` or the nearest of its bases."""
    if class_path in registry:
        return registry[class_path]
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None  # the parser already refused a class it cannot import
    for base in getattr(cls, "__mro__", ()):
        found = registry.get(f"{base.__module__}.{base.__qualname__}")
        if found is not None:
            return found
    return None


def _section_problems(section: Any, prefix: str, registry: Mapping[str, Check]) -> list[Problem]:
    if not isinstance(section, Mapping) or not isinstance(section.get("class_path"), str):
        return []
    check = check_for(section["class_path"], registry)
    if check is None:
        return []
    return check(section.get("init_args") or {}, f"{prefix}.init_args")


def preflight_problems(config: Mapping[str, Any],
                       env: Mapping[str, str] | None = None) -> list[Problem]:
    """Every problem of a fit's parsed config (as a dict) on this machine."""
    import torch
    from lightning.fabric.accelerators.cuda import num_cuda_devices
    from lightning.fabric.accelerators.mps import MPSAccelerator

    env = os.environ if env is None else env
    trainer = config.get("trainer") or {}
    problems = check_accelerator(trainer, num_cuda_devices(), torch.version.cuda,
                                 MPSAccelerator.is_available())
    problems += check_cluster(trainer, env)
    problems += _section_problems(config.get("data"), "data", DATA_CHECKS)
    problems += _section_problems(config.get("model"), "model", MODEL_CHECKS)
    return problems


def format_problems(problems: list[Problem]) -> str:
    """One block: a headline, then each problem with its fix."""
    n = len(problems)
    lines = [f"pre-flight: {n} thing{'s' if n > 1 else ''} this fit needs "
             f"{'are' if n > 1 else 'is'} missing here (nothing was built):"]
    for i, problem in enumerate(problems, start=1):
        lines.append(f"  {i}. {problem.key}: {problem.missing}")
        lines.append(f"     fix: {problem.fix}")
    return "\n".join(lines)


def run_preflight(config: Mapping[str, Any]) -> None:
    """Raise ``PreflightError`` listing every problem of ``config``; nothing when it is fine."""
    problems = preflight_problems(config)
    if problems:
        raise PreflightError(format_problems(problems))

"""The pre-flight of ``provq-fit`` (``provq_lightning.tools.preflight``): every check on its own,
the shipped sample configs passing, and ``in1k_16x16`` on a machine without its GPUs, shards and
weights failing in one block that names all of them (issue 22, item 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from provq_lightning.datamodules.image_folder import ImageFolderDataModule
from provq_lightning.image.shards import ShardInfo, write_index
from provq_lightning.tools import preflight as pf
from tests.helpers import effective_config

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
VGG16 = "vgg16-397923af.pth"
INCEPTION = "pt_inception-2015-12-05-6726825d.pth"


def keys(problems: list[pf.Problem]) -> list[str]:
    return [p.key for p in problems]


# -- the machine ----------------------------------------------------------------------------
@pytest.mark.parametrize(("devices", "needed"), [
    (8, 8), ("8", 8), (-1, 1), ("auto", 1), ("-1", 1), ([0, 3], 4), ("1,", 2), ("0,2", 3),
])
def test_gpus_needed_reads_every_form_of_devices(devices, needed):
    assert pf.gpus_needed(devices) == needed
    assert pf.gpus_needed("two") == 0  # Lightning refuses it itself, in its own words


def test_a_gpu_fit_without_gpus_names_the_accelerator_and_the_cpu_fallback():
    trainer = {"accelerator": "gpu", "devices": 8}
    (problem,) = pf.check_accelerator(trainer, visible_gpus=0, cuda_build="12.1")
    assert problem.key == "trainer.accelerator"
    assert "gpu with trainer.devices 8" in problem.missing and "no CUDA GPU" in problem.missing
    assert "a machine with 8 GPUs" in problem.fix
    assert "--trainer.accelerator cpu --trainer.devices 1" in problem.fix
    (cpu_only,) = pf.check_accelerator(trainer, visible_gpus=0, cuda_build=None)
    assert "CPU-only build" in cpu_only.missing


def test_fewer_gpus_than_devices_names_the_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    (problem,) = pf.check_accelerator({"accelerator": "cuda", "devices": 8}, 2, "12.1")
    assert problem.key == "trainer.devices" and "only 2 GPUs are visible" in problem.missing
    assert "CUDA_VISIBLE_DEVICES=0,1" in problem.missing and "--trainer.devices 2" in problem.fix


@pytest.mark.parametrize("trainer", [
    {"accelerator": "gpu", "devices": 8},  # 8 visible
    {"accelerator": "cpu", "devices": 1},
    {"accelerator": "auto", "devices": "auto"},
    {"accelerator": {"class_path": "x.MyAccelerator"}, "devices": 4},
])
def test_enough_gpus_or_no_gpu_asked_is_fine(trainer):
    assert pf.check_accelerator(trainer, visible_gpus=8, cuda_build="12.1") == []
    if trainer["accelerator"] != "gpu":
        assert pf.check_accelerator(trainer, visible_gpus=0, cuda_build=None) == []


def test_several_nodes_need_a_launcher():
    (problem,) = pf.check_cluster({"num_nodes": 2, "devices": 8}, env={})
    assert problem.key == "trainer.num_nodes" and "srun provq-fit" in problem.fix
    srun = {"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2",
            "SLURM_JOB_NAME": "train"}
    assert pf.check_cluster({"num_nodes": 2, "devices": 8}, srun) == []
    torchrun = {"RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8"}
    assert pf.check_cluster({"num_nodes": 2, "devices": 8}, torchrun) == []
    assert pf.check_cluster({"num_nodes": 1, "devices": 8}, env={}) == []


def test_srun_task_layout_must_match_devices_and_nodes():
    srun = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "1",
            "SLURM_JOB_NAME": "train"}
    problems = pf.check_cluster({"num_nodes": 2, "devices": 8}, srun)
    assert keys(problems) == ["trainer.devices", "trainer.num_nodes"]
    assert "--ntasks-per-node=4" in problems[0].missing and "--nodes=1" in problems[1].missing
    # An interactive allocation (srun --job-name=interactive) is not SLURM's launch: Lightning
    # ignores its variables, so does the pre-flight.
    assert pf.check_cluster({"devices": 8}, {**srun, "SLURM_JOB_NAME": "interactive"}) == []


def test_a_path_naming_an_unset_variable_says_which(monkeypatch, tmp_path):
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    (problem,) = pf.check_path("data.init_args.root", "$SLURM_TMPDIR/photos", "folder", "fix",
                               os.environ)
    assert "names $SLURM_TMPDIR, which is not set here" in problem.missing
    assert "inside the SLURM job" in problem.fix
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path))
    (tmp_path / "photos").mkdir()
    assert pf.check_path("data.init_args.root", "${SLURM_TMPDIR}/photos", "folder", "fix",
                         os.environ) == []


# -- data -----------------------------------------------------------------------------------
def test_shards_an_index_a_folder_holding_one_or_urls_with_samples_per_shard(tmp_path):
    key, env = "data.init_args.train_shards", {}
    (problem,) = pf.check_shards(key, str(tmp_path / "train" / "index.json"), None, env)
    assert "shard index" in problem.missing and "not found" in problem.missing
    assert f"provq-make-shards <ImageNet train folder> {tmp_path / 'train'}" in problem.fix
    assert "data.init_args.samples_per_shard" in problem.fix

    (tmp_path / "train").mkdir()
    (problem,) = pf.check_shards(key, str(tmp_path / "train"), None, env)
    assert "has no index.json" in problem.missing
    write_index(tmp_path / "train" / "index.json", [ShardInfo("shard-0.tar", 10)])
    assert pf.check_shards(key, str(tmp_path / "train"), None, env) == []
    assert pf.check_shards(key, str(tmp_path / "train" / "index.json"), None, env) == []

    pattern = str(tmp_path / "s-{0..2}.tar")
    (problem,) = pf.check_shards(key, pattern, None, env)
    assert "data.init_args.samples_per_shard is not set" in problem.missing
    (tmp_path / "s-0.tar").write_bytes(b"")
    (problem,) = pf.check_shards(key, pattern, 100, env)
    assert problem.missing.startswith("2 of 3 shard files not found")
    for i in (1, 2):
        (tmp_path / f"s-{i}.tar").write_bytes(b"")
    assert pf.check_shards(key, pattern, 100, env) == []
    assert pf.check_shards(key, "pipe:curl -s https://x/s-{0..9}.tar", 100, env) == []


def test_imagenet_data_checks_train_and_val_shards_and_the_class_list(tmp_path):
    args = {"train_shards": str(tmp_path / "t" / "index.json"), "val_shards": None,
            "samples_per_shard": None, "class_list": str(tmp_path / "classes.txt")}
    problems = pf.check_imagenet_data(args, "data.init_args", env={})
    assert keys(problems) == ["data.init_args.train_shards", "data.init_args.class_list"]
    args["val_shards"] = str(tmp_path / "v" / "index.json")
    problems = pf.check_imagenet_data(args, "data.init_args", env={})
    assert "provq-make-shards <ImageNet val folder>" in problems[1].fix


def test_image_folder_data_needs_its_folders(tmp_path):
    args = {"root": str(tmp_path / "photos"), "val_root": None, "class_list": None}
    (problem,) = pf.check_image_folder_data(args, "data.init_args", env={})
    assert problem.key == "data.init_args.root" and "not found" in problem.missing
    (tmp_path / "photos").mkdir()
    assert pf.check_image_folder_data(args, "data.init_args", env={}) == []


def test_protein_data_needs_every_source(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "list.txt").write_text("")
    args = {"sources": [str(tmp_path / "a"), str(tmp_path / "list.txt"), str(tmp_path / "b")],
            "train_sources": str(tmp_path / "c")}
    problems = pf.check_protein_data(args, "data.init_args", env={})
    assert keys(problems) == ["data.init_args.sources", "data.init_args.train_sources"]
    assert str(tmp_path / "b") in problems[0].missing


# -- model ----------------------------------------------------------------------------------
IMAGE_ARGS = {"lpips_weight": 1.0, "eval_lpips": True, "eval_fid": True, "lpips_vgg_path": None,
              "fid_inception_path": None, "init_from": None}


def test_image_tokenizer_weights_name_the_file_where_it_comes_from_and_the_key(tmp_path):
    linear = tmp_path / "vgg.pth"
    linear.write_bytes(b"")
    problems = pf.check_image_tokenizer(IMAGE_ARGS, "model.init_args", hub=tmp_path,
                                        lpips_linear=linear)
    assert keys(problems) == ["model.init_args.lpips_vgg_path",
                              "model.init_args.fid_inception_path"]
    lpips, fid = problems
    assert VGG16 in lpips.missing and str(tmp_path / VGG16) in lpips.missing
    assert pf.VGG16_URL in lpips.fix and "model.init_args.lpips_weight 0" in lpips.fix
    assert INCEPTION in fid.missing and pf.FID_INCEPTION_URL in fid.fix
    assert "model.init_args.eval_fid false" in fid.fix

    (tmp_path / VGG16).write_bytes(b"")
    given = tmp_path / "elsewhere.pth"
    given.write_bytes(b"")
    args = {**IMAGE_ARGS, "fid_inception_path": str(given)}
    assert pf.check_image_tokenizer(args, "model.init_args", hub=tmp_path,
                                    lpips_linear=linear) == []


def test_lpips_linear_layers_come_with_the_lpips_package(tmp_path):
    (tmp_path / VGG16).write_bytes(b"")
    args = {**IMAGE_ARGS, "eval_fid": False}
    (problem,) = pf.check_image_tokenizer(args, "m", hub=tmp_path, lpips_linear=None)
    assert "vgg.pth" in problem.missing and "pip install lpips" in problem.fix
    assert "PerceptualSimilarity" in problem.fix
    installed = pf.lpips_linear_layers()
    assert installed is not None and installed.is_file()  # the lpips provq depends on has it


def test_image_tokenizer_without_lpips_and_fid_needs_no_weights(tmp_path):
    args = {**IMAGE_ARGS, "lpips_weight": 0.0, "eval_lpips": False, "eval_fid": False}
    assert pf.check_image_tokenizer(args, "m", hub=tmp_path, lpips_linear=None) == []
    args["init_from"] = f"llamagen:{tmp_path / 'vq_ds16_c2i.pt'}"
    (problem,) = pf.check_image_tokenizer(args, "m", hub=tmp_path, lpips_linear=None)
    assert problem.key == "m.init_from" and "vq_ds16_c2i.pt not found" in problem.missing
    args["init_from"] = "taming:x.ckpt"
    (problem,) = pf.check_image_tokenizer(args, "m", hub=tmp_path, lpips_linear=None)
    assert "'taming:x.ckpt' is not understood" in problem.missing
    assert "llamagen:PATH" in problem.fix


@pytest.mark.parametrize("lpips_weight", [0.0, 1.0])
@pytest.mark.parametrize("eval_lpips", [False, True])
@pytest.mark.parametrize("eval_fid", [False, True])
def test_the_weights_checked_are_the_nets_the_model_builds(
    monkeypatch, tmp_path, lpips_weight, eval_lpips, eval_fid
):
    from provq_lightning.image import metrics

    built = set()
    monkeypatch.setattr(metrics, "build_lpips", lambda *a: built.add("lpips"))
    monkeypatch.setattr(metrics, "build_fid_inception", lambda *a: built.add("fid"))
    monkeypatch.setattr(metrics, "ReconstructionMetrics", lambda *a: None)
    args = {**IMAGE_ARGS, "lpips_weight": lpips_weight, "eval_lpips": eval_lpips,
            "eval_fid": eval_fid}
    metrics.frozen_nets(SimpleNamespace(**args))
    problems = pf.check_image_tokenizer(args, "m", hub=tmp_path, lpips_linear=tmp_path / "no")
    checked = {"lpips" if "lpips" in p.key else "fid" for p in problems}
    assert checked == built


# -- the registry and the glue --------------------------------------------------------------
class MyFolders(ImageFolderDataModule):
    """A user's subclass of a shipped datamodule."""


def test_a_subclass_is_checked_as_its_base_and_an_unknown_class_not_at_all():
    check = pf.check_for(f"{__name__}.MyFolders", pf.DATA_CHECKS)
    assert check is pf.check_image_folder_data
    assert pf.check_for("provq_lightning.datamodules.topodisc.TopoDiscDataModule",
                        pf.DATA_CHECKS) is None


def test_the_block_lists_every_problem_with_its_fix():
    block = pf.format_problems([pf.Problem("a.b", "x is missing", "make x"),
                                pf.Problem("c", "y is missing", "make y")])
    assert block.splitlines() == [
        "pre-flight: 2 things this fit needs are missing here (nothing was built):",
        "  1. a.b: x is missing", "     fix: make x",
        "  2. c: y is missing", "     fix: make y",
    ]


@pytest.mark.parametrize(("config", "data_keys"), [
    ("topodisc_provq.yaml", []),
    ("imagenet_sample_64px.yaml", ["data.init_args.root"]),
    ("proteins_sample.yaml", ["data.init_args.sources", "data.init_args.train_sources"]),
])
def test_the_sample_configs_pass_and_fail_without_their_data(config, data_keys, monkeypatch,
                                                             tmp_path):
    from provq_lightning.data.paths import shared_data_dir

    if not shared_data_dir().is_dir():
        pytest.skip(f"shared sample data not found at {shared_data_dir()} (set PROVQ_SHARED_DATA)")
    monkeypatch.chdir(REPO)
    parsed = effective_config(EXPERIMENTS / config)
    assert pf.preflight_problems(parsed) == []
    monkeypatch.setenv("PROVQ_SHARED_DATA", str(tmp_path / "elsewhere"))
    assert keys(pf.preflight_problems(parsed)) == data_keys


def test_in1k_here_fails_in_one_block_naming_all_that_is_missing(tmp_path):
    # No GPU (also on a GPU machine), an empty torch hub, no shards in the working directory.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TORCH_HOME": str(tmp_path / "torch"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "provq_lightning.tools.fit", "--config", "in1k_16x16"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    block = done.stderr[done.stderr.index("provq-fit: error: pre-flight: "):]
    assert "(nothing was built)" in block.splitlines()[0]
    for needed in ("trainer.accelerator: gpu with trainer.devices 8",
                   "data.init_args.train_shards", "data.init_args.val_shards",
                   "provq-make-shards <ImageNet train folder> data/imagenet/train",
                   "data.init_args.samples_per_shard",
                   "model.init_args.lpips_vgg_path: LPIPS", VGG16, pf.VGG16_URL,
                   "model.init_args.fid_inception_path: rFID", INCEPTION, pf.FID_INCEPTION_URL):
        assert needed in block, needed
    assert sum(line.lstrip()[:3] in {f"{i}. " for i in range(1, 10)}
               for line in block.splitlines()) == 5  # GPU, 2 shard indexes, 2 weight files
    assert not (tmp_path / "runs").exists()  # no run directory, no logger, no model

"""``provq-fit --config NAME`` finds a shipped config when no such file exists in the cwd."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from provq_lightning.errors import ProvqError
from provq_lightning.tools.shipped_configs import resolve_config_args, shipped_names
from tests.helpers import cli_in_process

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "experiments"


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: no experiments/ here


@pytest.mark.parametrize(
    "value, shipped",
    [("in1k_16x16", "in1k_16x16.yaml"), ("in100/provq", "in100/provq.yaml"),
     ("topodisc_provq.yaml", "topodisc_provq.yaml"),
     ("experiments/in100/base.yaml", "in100/base.yaml")],
)
def test_a_shipped_name_becomes_its_path(value, shipped):
    for argv in (["fit", "--config", value], ["fit", "-c", value]):
        resolved = Path(resolve_config_args(argv)[2])
        assert resolved.resolve() == (SHIPPED / shipped).resolve()
    (flag,) = resolve_config_args([f"--config={value}"])
    assert Path(flag.removeprefix("--config=")).resolve() == (SHIPPED / shipped).resolve()


def test_a_file_in_the_cwd_wins_and_other_arguments_are_untouched(tmp_path):
    (tmp_path / "topodisc_provq.yaml").write_text("trainer: {max_steps: 5}\n")
    argv = ["fit", "--config", "topodisc_provq.yaml", "--trainer.max_steps", "in1k_16x16",
            "--config", "{trainer: {max_steps: 3}}"]
    assert resolve_config_args(argv) == argv


def test_an_unknown_name_is_one_line_naming_it_and_some_shipped_ones():
    with pytest.raises(ProvqError) as err:
        resolve_config_args(["fit", "--config", "in1k_16x17"])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("--config in1k_16x17: no such file in ")
    assert "in1k_16x16, " in message and "topodisc_provq" in message
    assert f"({len(shipped_names())} shipped)" in message


def test_shipped_names_are_the_fit_configs_not_the_sweeps():
    names = shipped_names()
    assert {"topodisc_provq", "in1k_16x16", "in100/base", "in100/provq"} <= set(names)
    assert not [n for n in names if n.startswith("sweeps/")]


def test_provq_fit_resolves_shipped_configs_by_name(capsys):
    code, out, err = cli_in_process(
        capsys, "--config", "in100/base", "--config", "in100/provq", "--print_config")
    assert code == 0, err[-2000:]
    config = yaml.safe_load(out)
    assert config["trainer"]["logger"]["init_args"]["name"] == "in100_provq"
    assert config["data"]["class_path"] == "provq_lightning.datamodules.imagenet.ImageNetDataModule"
    # Paths inside a shipped config stay as written: relative to the cwd.
    assert config["data"]["init_args"]["class_list"] == "experiments/in100/classes.txt"


def test_a_shipped_variant_brings_its_base_by_name(capsys):
    code, out, err = cli_in_process(capsys, "--config", "topodisc_provq", "--print_config")
    assert code == 0, err[-2000:]
    config = yaml.safe_load(out)
    assert config["trainer"]["logger"]["init_args"]["name"] == "topodisc_provq"
    assert config["trainer"]["max_steps"] == 3000  # from topodisc_base.yaml, beside it
    assert config["model"]["class_path"] == "provq_lightning.topodisc.TopoDiscTokenizer"
    assert (config["curriculum"]["warmup_steps"], config["curriculum"]["kmeans_init"]) == (
        1000, True)


def test_provq_fit_refuses_an_unknown_config_in_one_line(capsys):
    code, _, err = cli_in_process(capsys, "--config", "topodisc_prvq", "--print_config")
    assert code == 1
    assert err.startswith("provq-fit: error: --config topodisc_prvq: no such file in ")
    assert err.count("\n") == 1 and "topodisc_provq" in err


@pytest.mark.parametrize("name", ["proteins_sample", "topodisc_provq", "cath_aminoaseed_provq"])
def test_read_config_composes_a_variant_as_provq_fit_does(name, capsys):
    # Tools that read a config's sections (the protein floor) see what provq-fit sees.
    import yaml

    from provq_lightning.runs.loading import read_config
    from tests.helpers import cli_in_process

    path = REPO / "experiments" / f"{name}.yaml"
    code, out, _ = cli_in_process(capsys, "--config", str(path), "--print_config")
    printed = yaml.safe_load(out)
    composed = read_config(path)
    assert code == 0
    for section in ("model", "data"):  # what the file sets, as provq-fit parsed it
        assert composed[section]["class_path"] == printed[section]["class_path"], section
        wanted = composed[section].get("init_args", {})
        got = {k: printed[section]["init_args"][k] for k in wanted}
        assert wanted == got, section
    logged = printed["trainer"]["logger"]["init_args"]["name"]
    assert composed["trainer"]["logger"]["init_args"]["name"] == logged

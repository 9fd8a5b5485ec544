"""The make targets as the docs promise them: ``make help`` lists every target (and every target
the docs name), the README says how to reach the commands installed in ``.venv``, and
``make protein-sample PROTEIN_STEPS=N`` shortens the protein runs in proportion."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from provq_lightning.errors import ProvqError
from provq_lightning.runs.loading import read_config
from provq_lightning.tools.scaled_steps import scaled_overrides

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
        REPO / "benchmarks" / "README.md"]
MAKEFILES = [REPO / "Makefile", *sorted((REPO / "mk").glob("*.mk"))]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str) -> str:
    proc = subprocess.run(["make", "-s", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def help_targets() -> dict[str, str]:
    lines = [line.split(None, 1) for line in make("help").splitlines() if line.strip()]
    return {parts[0]: parts[1] if len(parts) > 1 else "" for parts in lines}


def test_make_help_lists_every_target_with_what_it_does():
    listed = help_targets()
    phony = {name for path in MAKEFILES
             for line in path.read_text().splitlines() if line.startswith(".PHONY:")
             for name in line.split(":", 1)[1].split()}
    assert phony - set(listed) == set(), "end each target's line with `## what it does`"
    assert set(listed) - phony == set(), "declare each listed target .PHONY"
    assert all(len(description) > 5 for description in listed.values()), listed


def test_every_make_target_the_docs_name_exists():
    named = {match for doc in DOCS for match in
             re.findall(r"(?:`|^\s*)make ([a-z][a-z0-9-]*)", doc.read_text(), re.MULTILINE)}
    assert {"demo", "test", "install", "protein-sample", "sweep"} <= named  # the pattern works
    assert named - set(help_targets()) == set()


def test_readme_says_how_to_reach_the_venv_commands_before_using_one():
    text = (REPO / "README.md").read_text()
    first_command = re.search(r"^provq-fit ", text, re.MULTILINE).start()
    assert 0 <= text.find("source .venv/bin/activate") < first_command
    # Its first commands install what they need themselves (fresh machine).
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in first_block.splitlines()] == [
        ["make", "demo"], ["make", "test"]]
    assert "$(STAMP)" in (REPO / "Makefile").read_text().split("\ndemo:")[1].splitlines()[0]


# -- make protein-sample PROTEIN_STEPS=N -----------------------------------------------------
CONFIG = {
    "trainer": {"max_steps": 3000, "val_check_interval": 500},
    "model": {"init_args": {"lr_warmup_steps": 30}},
    "curriculum": {"warmup_steps": 1200, "transition_steps": 600, "kmeans_collect_batches": 8},
}


def test_steps_scale_in_proportion_and_the_last_step_is_validated():
    assert scaled_overrides(CONFIG, 300) == {
        "trainer.max_steps": 300, "curriculum.warmup_steps": 120,
        "curriculum.transition_steps": 60, "model.init_args.lr_warmup_steps": 3,
        "trainer.val_check_interval": 50}
    # 1000 / 6 = 166.7: the largest divisor of 1000 below it, so step 1000 is validated.
    assert scaled_overrides(CONFIG, 1000)["trainer.val_check_interval"] == 125
    short = scaled_overrides(CONFIG, 12)
    assert short["curriculum.warmup_steps"] == 5 and short["curriculum.kmeans_collect_batches"] == 5
    vanilla = {**CONFIG, "curriculum": {"warmup_steps": 0, "transition_steps": 0}}
    assert scaled_overrides(vanilla, 300)["curriculum.warmup_steps"] == 0  # stays vanilla


@pytest.mark.parametrize("steps, named", [
    (97, "use a multiple of 6, e.g. 96"),  # no divisor near 16: step 97 never validated
    (0, "steps must be a positive number")])
def test_steps_that_cannot_scale_are_refused_in_one_line(steps, named):
    with pytest.raises(ProvqError) as err:
        scaled_overrides(CONFIG, steps)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_shipped_protein_variants_scale_apart():
    provq, vanilla = (read_config(REPO / "experiments" / name) for name in
                      ("proteins_sample.yaml", "proteins_sample_vanilla.yaml"))
    steps = provq["trainer"]["max_steps"] // 10
    fast, plain = scaled_overrides(provq, steps), scaled_overrides(vanilla, steps)
    assert fast["curriculum.warmup_steps"] > 0 and plain["curriculum.warmup_steps"] == 0
    for out in (fast, plain):
        assert out["trainer.max_steps"] == steps
        assert steps % out["trainer.val_check_interval"] == 0


def test_make_protein_sample_passes_the_scaled_steps_per_variant():
    import yaml

    default = make("-n", "protein-sample", "PROTEIN_SEEDS=0")
    (sweep,) = [line for line in default.splitlines() if "provq-sweep run" in line]
    assert "--set" not in sweep and "scaled_steps" not in default
    lines = make("-n", "protein-sample", "PROTEIN_STEPS=300", "PROTEIN_SEEDS=0").splitlines()
    scaled = [i for i, line in enumerate(lines)
              if "scaled_steps experiments/proteins_sample" in line]
    removal = [i for i, line in enumerate(lines) if line.startswith("rm -rf ")]
    assert len(scaled) == 2 and scaled[0] < removal[0]  # refused before any run is deleted
    check, run = lines[scaled[0]], lines[scaled[1]]
    assert "provq-sweep" not in check and " 300)" in check
    assert "--levels seed=0 --levels variant=$v $sets" in run
    # The loop's variants and their configs are the sweep file's.
    variants = run.split("for v in ", 1)[1].split("; do", 1)[0].split()
    grid = yaml.safe_load((REPO / "experiments" / "sweeps" / "proteins_sample.yaml").read_text())
    configs = {name: level["config"] for name, level in grid["grid"]["variant"].items()}
    assert variants == list(configs)
    for variant, config in configs.items():
        named = "experiments/proteins_sample" + ("" if variant == "provq" else f"_{variant}")
        assert config == f"{named}.yaml"

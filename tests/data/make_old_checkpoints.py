"""Write the old-checkpoint fixtures with the provq on ``sys.path`` (an older commit's tree).

    PYTHONPATH=OLD_TREE python tests/data/make_old_checkpoints.py NAME

runs ``topodisc_format0.yaml`` of this folder for 6 steps (the checkpoint kept as ``NAME.ckpt``)
and, uninterrupted, for 12, and records what that provq made of them in ``NAME.json``: the codes
``provq-tokenize`` gives the 6-step checkpoint, and the codes and codebook of the 12-step run.
A checkpoint provq loads today must give the same codes, and resumed to step 12 the same run.

``topodisc_format0``: written by commit 46e1ba5, the last without a checkpoint format version
(05fa35f, before the package's rooms, writes the same keys, values and codes).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "topodisc_format0.yaml"


def fit(work: Path, steps: int) -> Path:
    subprocess.run(
        [sys.executable, "-m", "provq_lightning.tools.fit", "fit", "--config", str(CONFIG),
         "--trainer.max_steps", str(steps), "--trainer.logger.init_args.save_dir", str(work),
         "--trainer.logger.init_args.version", f"steps{steps}"],
        check=True, cwd=work,
    )
    return work / "topodisc_format0" / f"steps{steps}" / "checkpoints" / "last.ckpt"


def codes(ckpt: Path, out: Path) -> dict[str, list[int]]:
    """``provq-tokenize`` of the training points: key -> code ids."""
    subprocess.run(
        [sys.executable, "-m", "provq_lightning.tools.tokenize_cli", "--ckpt", str(ckpt),
         "--config", str(CONFIG), "--out", str(out), "--format", "fasta", "--device", "cpu"],
        check=True,
    )
    lines = (out / "codes.fasta").read_text().splitlines()
    pairs = zip(lines[::2], lines[1::2], strict=True)
    return {key[1:]: [int(c) for c in ids.split()] for key, ids in pairs}


def main(name: str) -> None:
    import provq_lightning

    print(f"provq from {Path(provq_lightning.__file__).parent}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        at6, at12 = fit(work, 6), fit(work, 12)
        final = torch.load(at12, map_location="cpu", weights_only=True)["state_dict"]
        expected = {
            "codes_at_6": codes(at6, work / "tokens6"),
            "codes_at_12": codes(at12, work / "tokens12"),
            "codebook_at_12": final["quantizer.embedding.weight"].tolist(),
        }
        shutil.copyfile(at6, HERE / f"{name}.ckpt")
    (HERE / f"{name}.json").write_text(json.dumps(expected) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])

#!/usr/bin/env bash
# The lowest-versions job: a fresh venv with every dependency of setup.cfg's install_requires at
# its floor (constraints-lowest.txt), then the tests of what the floors are about: provq-fit
# (LightningCLI + jsonargparse) fitting, resuming and evaluating, checkpoints written and read,
# the private Lightning attributes provq uses, and structure parsing (biotite). A failing test
# fails the job.
#
#   scripts/test_lowest.sh [VENV]    # default .venv-lowest; VENV is deleted and made anew
#
# Downloads about 3 GB (torch 2.4 from PyPI is a CUDA build; it runs on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-lowest}
PYTHON=${PYTHON:-python3}

TESTS=(
    tests/core/test_lowest_floors.py
    tests/core/test_lightning_private.py
    tests/core/test_cli.py
    tests/core/test_cli_conventions.py
    tests/core/test_resume.py
    tests/core/test_old_checkpoints.py
    tests/core/test_run_safety.py
    tests/cluster/test_preemption.py
    tests/image/test_stream_resume.py
    tests/reliability/test_checkpoint_io.py
    tests/reliability/test_checkpoint_kill.py
    tests/reliability/test_checkpoint_enospc.py
    tests/reliability/test_weights_only.py
    tests/protein/test_parsing.py
)

start=$SECONDS
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -c constraints-lowest.txt -e ".[test]"
echo "lowest versions: installed in $((SECONDS - start)) s"
"$VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
    | grep -i -E "^($(grep -o '^[A-Za-z0-9_.-]*' constraints-lowest.txt | paste -sd'|'))==" \
    | paste -sd' '
# pytest's closing line, with the tests' time, stays the job's last line
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"

#!/usr/bin/env bash
# The guards CI runs before the tests (scripts/test.sh calls this; configured in pyproject.toml):
#   ruff check     lint of src/, tests/, bench/ (rules and line length in [tool.ruff])
#   ruff format    --check: the same files laid out as `ruff format` lays them out (run it to fix)
#   mypy           types of src/clpipe (clpipe.testing aside; [tool.mypy])
#   lint-imports   the import layering and no-cycle contracts ([tool.importlinter]);
#                  docs/developer/architecture.md explains them
# Each runs even when an earlier one failed; the script fails when any did.
# The tools come from the dev extra (pip install -e '.[dev]'), installed by scripts/setup.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/ruff ] || [ ! -x .venv/bin/mypy ] || [ ! -x .venv/bin/lint-imports ]; then
  scripts/setup.sh || exit 1
fi
failed=()
echo "[lint] ruff check"
.venv/bin/ruff check src tests bench || failed+=(ruff)
echo "[lint] ruff format --check"
.venv/bin/ruff format --check src tests bench || failed+=(ruff-format)
echo "[lint] mypy"
.venv/bin/mypy || failed+=(mypy)
echo "[lint] lint-imports"
.venv/bin/lint-imports --no-logo || failed+=(lint-imports)
if [ "${#failed[@]}" -gt 0 ]; then
  echo "[lint] failed: ${failed[*]} (fix what is listed above)" >&2
  exit 1
fi
echo "[lint] all clean"

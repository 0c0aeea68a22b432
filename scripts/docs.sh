#!/usr/bin/env bash
# Build the documentation site (Sphinx, with warnings as errors) into docs/_build/html.
# Needs the docs extras in .venv (scripts/setup.sh installs them). Extra arguments go to
# sphinx-build, e.g. scripts/docs.sh -E (rebuild every page).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c 'import sphinx, sphinx_click, myst_parser' 2>/dev/null; then
  echo "[docs] Sphinx is not installed in .venv; run scripts/setup.sh first" >&2
  exit 1
fi
.venv/bin/sphinx-build -W --keep-going -b html "$@" docs docs/_build/html
echo "[docs] built: docs/_build/html/index.html"

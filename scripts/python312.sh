#!/usr/bin/env bash
# Prints the path of a Python 3.12 interpreter, installing one if the machine has none:
# python3.12 on PATH, else pyenv's, else uv's (uv from PyPI; it downloads a standalone
# CPython build). Used by `make test-newest` (CI's newest-stack run).
set -euo pipefail

# Through the interpreter itself: a pyenv shim exists even where it cannot run.
if python3.12 -c "import sys; print(sys.executable)" 2>/dev/null; then
  exit 0
fi
for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
  if [ -x "$p" ]; then
    echo "$p"
    exit 0
  fi
done
tools="${TMPDIR:-/tmp}/flaxtrain-uv"
if [ ! -x "$tools/bin/uv" ]; then
  python3 -m venv "$tools" >&2
  "$tools/bin/pip" install --quiet uv >&2
fi
if "$tools/bin/uv" python install 3.12 >&2; then
  "$tools/bin/uv" python find 3.12
  exit 0
fi
echo "python312.sh: no Python 3.12 here and uv could not install one: install python3.12" \
  "(e.g. with pyenv or your package manager) and run again." >&2
exit 1

#!/usr/bin/env bash
# The project's checks: lint, types, tests. README's test command ends with this script.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check evomerge search_spaces evaluators tests bench
mypy
python -m pytest -q "$@"

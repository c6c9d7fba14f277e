#!/usr/bin/env bash
# The project's checks: lint, types, tests. README's test command ends with this script.
#   scripts/test.sh          the fast lane: lint, types and every test that starts no Ray cluster
#   scripts/test.sh --full   the full lane (what CI runs): also the real searches on Ray
# Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
lane=(-m "not slow")
if [[ "${1:-}" == "--full" ]]; then
    lane=()
    shift
fi
ruff check evomerge search_spaces evaluators tests bench
mypy
python -m pytest -q --durations=15 "${lane[@]}" "$@"

#!/usr/bin/env bash
# Run keywatch on the embedded in-memory store. Without KEYWATCH_SECRET it runs in
# development mode (a built-in, insecure key-hashing secret), and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ -z "${KEYWATCH_SECRET:-}" ]; then
  exec .venv/bin/keywatch serve --dev "$@"
fi
exec .venv/bin/keywatch serve "$@"

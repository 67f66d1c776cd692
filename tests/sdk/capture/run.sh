#!/bin/sh
# Makes the JSON edit captures in tests/fixtures/captures with the pinned SDKs (Python
# openai 3.52.0 as in tests/sdk/requirements.txt, Node openai 6.49.0 as the `node_`
# captures): each SDK's requests saved byte for byte by listener.py on 127.0.0.1:8765.
# Needs python3 with venv, node and npm, and access to PyPI and npm. Run from anywhere.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../../fixtures/captures"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check openai==3.52.0
(cd "$work" && npm install --silent --no-save --prefix "$work/node" openai@6.49.0 >/dev/null)
names="jsonedit_urls jsonedit_file_ids jsonedit_stream"
python3 "$here/listener.py" 8765 "$out" $(for n in $names; do echo "python_$n"; done) &
sleep 1
"$work/venv/bin/python" "$here/json_edits.py" http://127.0.0.1:8765/v1 sk-test-KEY
wait
python3 "$here/listener.py" 8765 "$out" $(for n in $names; do echo "node_$n"; done) &
sleep 1
NODE_PATH="$work/node/node_modules" node "$here/json_edits.mjs" http://127.0.0.1:8765/v1 sk-test-KEY
wait

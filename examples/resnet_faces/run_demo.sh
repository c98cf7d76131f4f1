#!/usr/bin/env bash
# The README's main job, end to end and offline: build the (untrained) resnet_faces model,
# make sample images, archive the model, start the server, send two images in one request,
# print the answer (2 x 136 floats), stop the server.
# Run through `make demo`, which puts the project's .venv first on PATH.
set -euo pipefail
cd "$(dirname "$0")"

python build_model.py --out resnet_faces.pt
python make_images.py --out-dir images
mkdir -p model_store
tsctl archive --model-name resnet_faces --version 1.0 \
    --serialized-file resnet_faces.pt --handler handler.py \
    --export-path model_store -f

# a state dir of our own (mode 0700, as tsctl requires), so the demo never touches another
# tsctl the user runs
TSCTL_STATE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/tsctl-demo-XXXXXX")"
export TSCTL_STATE_DIR
trap 'tsctl serve stop >/dev/null 2>&1 || true; rm -rf "$TSCTL_STATE_DIR"' EXIT

tsctl serve start --ncs --model-store model_store --models resnet_faces.mar
tsctl infer resnet_faces images/face_a.jpg,images/face_b.jpg | python -c '
import json, sys
answer = json.load(sys.stdin)
for name, face in zip(("face_a.jpg", "face_b.jpg"), answer):
    print(f"{name}: {len(face)} floats (68 landmarks as x, y):")
    print(" ".join(f"{v:.4f}" for v in face))
'
tsctl serve stop

#!/usr/bin/env bash
# The README's main job, end to end and offline: build the (untrained) resnet_faces model,
# make sample images, archive the model into model_store/, and show what went in.
# Run through `make demo`, which puts the project's .venv first on PATH.
set -euo pipefail
cd "$(dirname "$0")"

python build_model.py --out resnet_faces.pt
python make_images.py --out-dir images
mkdir -p model_store
tsctl archive --model-name resnet_faces --version 1.0 \
    --serialized-file resnet_faces.pt --handler handler.py \
    --export-path model_store -f
tsctl archive inspect model_store/resnet_faces.mar

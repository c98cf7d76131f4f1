"""The models the benchmarks serve, built and archived with `tsctl archive` (one archive for
both servers): the tiny TorchScript MLP (16→64→64→4, benchmarks/models/) in one archive per
(workers, batch size), and the resnet_faces example's files.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.lib.script import ROOT, run_checked

MODELS_DIR = ROOT / "benchmarks" / "models"
MLP_HANDLER = MODELS_DIR / "mlp_handler.py"
BUILD_MLP = MODELS_DIR / "build_mlp.py"
RESNET_DIR = ROOT / "examples" / "resnet_faces"
#: the MLP's request: a JSON list of 16 floats
MLP_BODY = [round(0.1 * i - 0.75, 3) for i in range(16)]


def archive(
    tsctl: Path,
    store: Path,
    src: Path,
    name: str,
    archive_name: str,
    serialized: Path,
    handler: Path,
    settings: dict[str, Any],
) -> str:
    """A .mar in `store` named `archive_name`.mar (model name `name`) with a model-config.yaml."""
    folder = src / archive_name
    folder.mkdir(parents=True)
    config = folder / "model-config.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    out = folder / "out"
    out.mkdir()
    run_checked(
        [
            tsctl, "archive", "--model-name", name, "--version", "1.0",
            "--serialized-file", serialized, "--handler", handler, "--config-file", config,
            "--export-path", out, "-f",
        ],
        timeout=120,
    )  # fmt: skip
    target = store / f"{archive_name}.mar"
    shutil.move(out / f"{name}.mar", target)
    return target.name


def mlp_archive_name(workers: int, batch: int) -> str:
    return "mlp" if (workers, batch) == (1, 1) else f"mlp_w{workers}_b{batch}"


def mlp_settings(workers: int, batch: int) -> dict[str, Any]:
    return {
        "minWorkers": workers,
        "maxWorkers": workers,
        "batchSize": batch,
        "maxBatchDelay": 5 if batch > 1 else 100,
    }


def mlp_archives(
    python: Path, tsctl: Path, work: Path, store: Path, combos: Iterable[tuple[int, int]]
) -> list[str]:
    """Build the MLP (`work/mlp.pt`) and archive it into `store` once per (workers, batch) in
    `combos` (sorted), sources under `work/src`; the archives' file names."""
    run_checked([python, BUILD_MLP, "--out", work / "mlp.pt"], timeout=120)
    return [
        archive(
            tsctl, store, work / "src", "mlp", mlp_archive_name(w, b), work / "mlp.pt",
            MLP_HANDLER, mlp_settings(w, b),
        )
        for w, b in sorted(combos)
    ]  # fmt: skip


def resnet_archive(python: Path, tsctl: Path, work: Path, store: Path) -> str:
    """Build resnet_faces (`work/resnet/resnet_faces.pt`) and its sample images
    (`work/images/`), and archive it into `store` (1 worker, batch size 8, maxBatchDelay 50 ms);
    the archive's file name."""
    resnet = work / "resnet"
    resnet.mkdir()
    model = resnet / "resnet_faces.pt"
    run_checked([python, RESNET_DIR / "build_model.py", "--out", model], timeout=300)
    run_checked([python, RESNET_DIR / "make_images.py", "--out-dir", work / "images"], timeout=120)
    return archive(
        tsctl, store, work / "src", "resnet_faces", "resnet_faces", model,
        RESNET_DIR / "handler.py",
        {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 50},
    )  # fmt: skip

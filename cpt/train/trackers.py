"""Experiment trackers: every metrics record of a stage also goes to TensorBoard, W&B or MLflow.

Each tracker is the library's own client, used directly: one run per stage, named after it, in
a project / experiment named after the recipe; a record's x-axis is the number of updates done
when it was written (an evaluation at step N follows training step N - 1). Only rank 0 tracks.

- ``tensorboard``: event files under ``<stage>/tensorboard``.
- ``wandb``: the project is the recipe's name unless ``WANDB_PROJECT`` says otherwise; the run id
  is derived from the stage directory, so a resumed stage continues its W&B run. ``WANDB_MODE``
  (``offline`` on clusters without internet, then ``wandb sync``) and the other ``WANDB_*``
  variables apply as usual.
- ``mlflow``: ``MLFLOW_TRACKING_URI`` when set (a tracking server), else a file store in
  ``<output_dir>/mlruns`` (``mlflow ui --backend-store-uri <output_dir>/mlruns``); metric names
  use ``.`` where the others use ``/`` (:func:`mlflow_key`).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Protocol

class Tracker(Protocol):
    def log(self, values: dict[str, float], updates: int) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    def __init__(self, stage_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(stage_dir / "tensorboard"))

    def log(self, values: dict[str, float], updates: int) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, updates)

    def close(self) -> None:
        self._writer.close()


class WandB:
    def __init__(self, recipe_name: str, stage_dir: Path, config: dict[str, Any]):
        import wandb

        run_id = hashlib.sha256(str(stage_dir.resolve()).encode()).hexdigest()[:16]
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", recipe_name), group=stage_dir.parent.name, name=stage_dir.name,
            id=run_id, resume="allow", dir=str(stage_dir), config=config, reinit="create_new",
        )

    def log(self, values: dict[str, float], updates: int) -> None:
        self._run.log(values, step=updates)

    def close(self) -> None:
        self._run.finish()


class MLflow:
    def __init__(self, recipe_name: str, stage_dir: Path, config: dict[str, Any]):
        from mlflow import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:  # mlflow keeps its file store for local use behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (stage_dir.parent / "mlruns").resolve().as_uri()
        self._client = MlflowClient(tracking_uri=uri)
        experiment = self._client.get_experiment_by_name(recipe_name)
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(recipe_name)
        run = self._client.create_run(experiment_id, run_name=stage_dir.name, tags={"cpt.run_dir": str(stage_dir.parent)})
        self._run_id = run.info.run_id
        self._client.log_dict(self._run_id, config, "recipe.json")

    def log(self, values: dict[str, float], updates: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, now, updates) for k, v in values.items()]
        self._client.log_batch(self._run_id, metrics=metrics)

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


def mlflow_key(key: str) -> str:
    """MLflow's file store keeps a metric per file, named by its path: ``loss`` and ``loss/prose``
    cannot both exist, so ``/`` becomes ``.`` there (``loss.prose``, ``eval.prose.loss``)."""
    return key.replace("/", ".")


def open_trackers(names: list[str], recipe_name: str, stage_dir: Path, config: dict[str, Any]) -> list[Tracker]:
    """The stage's trackers, opened in the order the recipe lists them."""
    made = {"tensorboard": lambda: TensorBoard(stage_dir), "wandb": lambda: WandB(recipe_name, stage_dir, config),
            "mlflow": lambda: MLflow(recipe_name, stage_dir, config)}
    return [made[name]() for name in names]

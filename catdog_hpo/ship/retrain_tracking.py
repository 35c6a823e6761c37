"""``retrain --mlflow URI``: one MLflow run for a retrain (the shipped model's files, its epochs
and headline figures). The client, its one-warning rule and the per-epoch metric names are the
study's (``search.tracking``); mlflow is imported only when a URI is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from catdog_hpo.search.tracking import EPOCH_METRICS, Client, run_url


def log_retrain(uri: str, out: Path, config_file: Path, metrics: dict[str, Any]) -> str | None:
    """One run for a retrain: every file in ``out`` (model files, metrics.json, MODEL_CARD.md,
    curves.svg) as artifacts, the kept seed's epochs as metrics per step, the headline figures.
    Returns the run's URL (or id); None after the one warning."""
    client = Client(uri)
    experiment = client.experiment_id() if client.alive else None
    if experiment is None:
        return None
    run = client.call("create the retrain's run", lambda: client.mlflow.create_run(
        experiment, run_name=f"retrain-{config_file.stem}", tags={"catdog_hpo.kind": "retrain"}))
    if run is None:
        return None
    run_id = run.info.run_id
    for row in metrics.get("history") or ():
        client.log(run_id, "log the retrain's epochs", step=int(row["epoch"]),
                   metrics={name: row.get(field) for field, name in EPOCH_METRICS.items()})

    def pick(key: str, inner: str) -> Any:  # metrics.json's [key][inner], None where absent
        return (metrics.get(key) or {}).get(inner)

    figures = {"val_acc_mean": pick("val_acc", "mean"), "val_acc_std": pick("val_acc", "std"),
               "test_acc_mean": pick("test_acc", "mean"), "kept_val_acc": pick("val", "accuracy"),
               "kept_test_acc": pick("test", "accuracy"), "n_params": metrics.get("n_params"),
               "flops": metrics.get("flops"), "inference_flops": metrics.get("inference_flops"),
               "latency_ms": pick("latency", "ms")}
    params = {"config_file": str(config_file), "train_on": metrics.get("train_on"), "epochs": metrics.get("epochs"),
              "kept_seed": metrics.get("kept_seed"), "seeds": len(metrics.get("seeds") or ()),
              "data": pick("data", "description"), "device": metrics.get("device")}
    client.log(run_id, "log the retrain's figures", metrics=figures,
               params={k: v for k, v in params.items() if v is not None})
    client.call("upload the model files", lambda: client.mlflow.log_artifacts(run_id, str(out)))
    client.call("end the retrain's run", lambda: client.mlflow.set_terminated(run_id, "FINISHED"))
    return run_url(uri, experiment, run_id) if client.alive else None

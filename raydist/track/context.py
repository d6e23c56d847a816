"""Where a run logs to, decided once by the driver (whose working directory the paths are relative to) and handed
to the process that trains, which may run elsewhere (a Ray Train worker, a Tune trial in its own directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

DB_NAME = "mlflow.db"


class TrackingContext(TypedDict):
    mlflow: bool
    uri: str | None  # resolved: absolute sqlite path, or the server's address
    experiment: str
    log_checkpoint: bool
    tensorboard: bool
    parent: str | None  # MLflow run id of the sweep or comparison this run belongs to
    explicit: bool  # the user named a store: a missing mlflow is worth a warning


def resolve_uri(uri: str | None, output_dir: str | Path) -> str:
    """The MLflow tracking URI: the default is a SQLite store beside the runs (OUTPUT_DIR/mlflow.db), which
    ``mlflow ui --backend-store-uri sqlite:///OUTPUT_DIR/mlflow.db`` opens with no server; a plain path is a SQLite
    file; relative SQLite paths are made absolute here, in the driver's working directory."""
    if uri is None:
        return "sqlite:///" + str((Path(output_dir).expanduser() / DB_NAME).resolve())
    if "://" not in uri:
        return "sqlite:///" + str(Path(uri).expanduser().resolve())
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and not path.startswith("/") and path != ":memory:":
            return "sqlite:///" + str(Path(path).resolve())
    return uri


def tracking_context(tracking: dict[str, Any], output_dir: str | Path, parent: str | None = None) -> TrackingContext:
    """The resolved ``tracking`` section of a job (or of a sweep's or comparison's base job)."""
    return TrackingContext(
        mlflow=bool(tracking.get("mlflow", True)),
        uri=resolve_uri(tracking.get("uri"), output_dir),
        experiment=tracking.get("experiment") or "raydist",
        log_checkpoint=bool(tracking.get("log_checkpoint", False)),
        tensorboard=bool(tracking.get("tensorboard", True)),
        parent=parent,
        explicit=tracking.get("uri") is not None,
    )

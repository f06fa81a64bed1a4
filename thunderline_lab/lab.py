"""The lab directory: where a study's store, Optuna storage, MLflow data and reports live.

Default ``./lab``; override with ``--lab DIR`` or ``THUNDERLINE_LAB_HOME``. Embedded
defaults, zero servers::

    lab/lab.db            the trial store (event log + projections), SQLite WAL
    lab/optuna.journal    Optuna storage (JournalFileStorage: safe for many local workers)
    lab/mlflow.db         MLflow tracking backend (SQLite); artifacts in lab/mlartifacts/
                          (lab/mlflow.db.lock: one process at a time creates its tables)
    lab/runs/             executed notebooks (papermill)
    lab/reports/          SN-vs-none comparison reports

Example:
    >>> lab = Lab.resolve("/tmp/my-lab")
    >>> lab.db_path.name
    'lab.db'
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thunderline_lab.errors import ConfigError
from thunderline_lab.store import TrialStore

__all__ = ["ENV_LAB_HOME", "ENV_TOKEN", "Lab", "study_name"]

ENV_LAB_HOME = "THUNDERLINE_LAB_HOME"
# the gateway's token: read by `serve`, EventClient, GatewaySource and the batch runner
ENV_TOKEN = "THUNDERLINE_LAB_TOKEN"


@dataclass(frozen=True)
class Lab:
    """Paths of one lab directory (nothing is created until asked)."""

    root: Path

    @classmethod
    def resolve(cls, path: str | os.PathLike[str] | None = None) -> Lab:
        """``path``, else ``$THUNDERLINE_LAB_HOME``, else ``./lab`` (made absolute).

        Raises:
            ConfigError: ``path`` is no path (papermill makes ``-p lab_dir 5`` an int), or
                names a file, not a lab folder (its ``lab.db``, or ``$THUNDERLINE_LAB_HOME``
                set to a file): said here, naming where the path came from, rather than as
                "no trial store at .../lab.db/lab.db" later.
        """
        if path is not None and not isinstance(path, str | os.PathLike):
            raise ConfigError(f"lab directory: a folder path, not {type(path).__name__} {path!r}")
        env = os.environ.get(ENV_LAB_HOME)
        chosen = path or env or "lab"
        root = Path(chosen).expanduser().resolve()
        if root.is_file():
            where = f"${ENV_LAB_HOME}" if not path and env else "lab directory"
            hint = " (give the folder that holds it)" if root.name == "lab.db" else ""
            raise ConfigError(f"{where} {root}: a file, not a lab folder{hint}")
        return cls(root)

    @property
    def db_path(self) -> Path:
        return self.root / "lab.db"

    @property
    def optuna_journal(self) -> Path:
        return self.root / "optuna.journal"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_tracking_uri(self) -> str:
        """``$MLFLOW_TRACKING_URI`` if set, else the lab's SQLite backend."""
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.mlflow_db}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def ensure(self) -> Lab:
        """Create the lab's folders; returns self.

        Raises:
            ConfigError: a folder cannot be made (a file in the way, no permission).
        """
        for d in (self.root, self.runs_dir, self.reports_dir, self.mlflow_artifacts):
            self._mkdir(d)
        return self

    def store(self) -> TrialStore:
        """Open (creating if needed) the lab's trial store.

        Raises:
            ConfigError: the lab folder cannot be made.
            StoreError: the store cannot be opened.
        """
        self._mkdir(self.root)
        return TrialStore(self.db_path)

    def _mkdir(self, d: Path) -> None:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(
                f"lab directory {self.root}: {d} exists and is not a folder"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"lab directory {self.root}: cannot create {d}: {exc.strerror or exc}"
            ) from None


def study_name(value: Any, what: str = "study") -> str:
    """A study name as a notebook parameter gives it: text, or an integer taken as its
    text (papermill makes ``-p study_name 2024`` the int 2024; a study named "2024" is
    legitimate). The monitor, the notebook helpers and the comparison all read names so.

    Example:
        >>> study_name(2024), study_name("sn-vs-none")
        ('2024', 'sn-vs-none')

    Raises:
        ConfigError: anything else (a float, a bool, None, a list, blank text), naming
            ``what`` (the argument).
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value
    raise ConfigError(
        f"{what}: expected a study name (text; an integer is taken as its text), "
        f"got {type(value).__name__} {value!r}"
    )

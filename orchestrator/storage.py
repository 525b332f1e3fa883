"""Where a study's Optuna record lives: the `storage` config key.

| storage                        | backend                                  | for                          |
|--------------------------------|------------------------------------------|------------------------------|
| (none)                         | SQLite `<out>/<study>/study.db`, WAL     | local runs (the default)     |
| `sqlite:////abs/path.db`       | SQLite at that path                      | a study file kept elsewhere  |
| `postgresql://user@host/db`    | Optuna RDB storage over SQLAlchemy       | cluster runs, shared studies |
| `journal:///abs/path.log`      | Optuna journal file (append-only, locks) | shared filesystems, no server|

Passwords never travel in the URL: a URL with one is refused (it would be recorded in
run.json and shown by `ps`); the password comes from PRUNESEARCH_STORAGE_PASSWORD (or
libpq's own PGPASSWORD / ~/.pgpass) and is added only when connecting, in the process
that connects. Everything that prints or records a URL uses `redact`.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import optuna

PASSWORD_ENV = "PRUNESEARCH_STORAGE_PASSWORD"
_RDB_SCHEMES = ("sqlite", "postgresql", "mysql")


def _scheme(url: str) -> str:
    return urlsplit(url).scheme.split("+", 1)[0]  # postgresql+psycopg2 -> postgresql


def check_storage_url(url: str) -> None:
    """Raise ValueError (one line, with the fix) for a storage URL we cannot use."""
    parts = urlsplit(url)
    scheme = _scheme(url)
    if scheme not in (*_RDB_SCHEMES, "journal"):
        raise ValueError(f"'{redact(url)}' is not a storage URL we know; use "
                         "postgresql://user@host/db, journal:///path/file.log or "
                         "sqlite:///path/study.db")  # fmt: skip
    if parts.password:
        raise ValueError(f"'{redact(url)}' holds a password; remove it from the URL and set "
                         f"{PASSWORD_ENV} (it would be written to run.json and logs)")  # fmt: skip
    if scheme in ("journal", "sqlite") and not parts.path.strip("/"):
        raise ValueError(f"'{url}' names no file; e.g. {scheme}:///shared/studies/search.log")
    if scheme in ("postgresql", "mysql") and not (parts.hostname or "host=" in parts.query):
        raise ValueError(f"'{redact(url)}' names no server; e.g. postgresql://user@host/db")


def redact(url: str) -> str:
    """`url` with any password replaced by ***, for printing and recording."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _connect_url(url: str) -> str:
    """The URL SQLAlchemy connects with: the password added from the environment."""
    password = os.environ.get(PASSWORD_ENV)
    if not password or _scheme(url) not in ("postgresql", "mysql"):
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).set(password=password).render_as_string(hide_password=False)


def study_storage(storage: str | None, study_dir: Path) -> str:
    """The storage URL of a study: the configured one, or its own SQLite file."""
    return storage or f"sqlite:///{Path(study_dir).resolve() / 'study.db'}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    scheme = _scheme(url)
    if scheme == "journal":
        from optuna.storages.journal import JournalFileBackend

        path = urlsplit(url).path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    if scheme != "sqlite":
        return optuna.storages.RDBStorage(_connect_url(url), engine_kwargs={"pool_pre_ping": True})
    return _open_sqlite(url)


def _open_sqlite(url: str) -> optuna.storages.RDBStorage:
    from sqlalchemy import event

    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})

    # WAL + synchronous=NORMAL: commits survive a process crash without an fsync each,
    # and readers (optuna-dashboard, `prunesearch front`) never block the writer.
    @event.listens_for(storage.engine, "connect")
    def _pragmas(conn, _record):
        cursor = conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    storage.engine.dispose()  # reconnect so every connection gets the pragmas
    return storage


def close_storage(storage: optuna.storages.BaseStorage) -> None:
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()

"""Results in an object store: `out: s3://bucket/prefix` or `gs://bucket/prefix`.

Everything that writes a study directory writes a local file (temporary name, rename),
so the study is staged on the driver's disk and mirrored to the URI through pyarrow's
filesystems: after every Parquet flush, and whenever run.json or the sensitivity table
change, each new or changed file is uploaded whole. An object PUT is atomic, so the
store never holds a torn file either, and parts are immutable, so each is uploaded
once. Parts merged away by compaction are deleted from the store after the merged file
is uploaded, so the store never lacks a row (orchestrator/compaction.py). A resume, a
`--join` and `front`/`export`/`report` of a URI first download the study into a fresh
staging directory and work there; a download that meets an object deleted by a merge
starts again, so the copy is one state of the store.

Credentials are the cloud's usual ones, never config keys: for S3 the AWS environment,
profile or instance role (pyarrow honours `AWS_ENDPOINT_URL` for S3-compatible stores
such as MinIO); for GCS the application default credentials, or `STORAGE_EMULATOR_HOST`
(the variable Google's client libraries use) for an emulator.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from orchestrator.errors import ConfigError

SCHEMES = ("s3", "gs", "gcs")


def is_uri(text: str | Path) -> bool:
    return isinstance(text, str) and urlsplit(text).scheme in SCHEMES and "://" in text


def join(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}"


def open_fs(uri: str):
    """(pyarrow filesystem, path inside it) for an s3:// or gs:// URI."""
    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if parts.scheme in ("gs", "gcs") and host:
        emulator = urlsplit(host if "://" in host else f"http://{host}")
        fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=emulator.netloc,
                                scheme=emulator.scheme)  # fmt: skip
        return fs, f"{parts.netloc}{parts.path}".rstrip("/")
    return pafs.FileSystem.from_uri(uri)


def check_uri(uri: str, flag: str = "--out") -> None:
    """The bucket exists and answers with these credentials: one line otherwise, before
    anything starts."""
    import pyarrow.fs as pafs

    try:
        fs, path = open_fs(uri)
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise ConfigError(f"{flag} '{uri}': bucket '{bucket}' does not exist; create it or "
                              "check the name")  # fmt: skip
        if fs.get_file_info(path).type == pafs.FileType.File:
            raise ConfigError(f"{flag} '{uri}' is a file, not a prefix; give a directory URI")
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:  # pyarrow: credentials, network, malformed URI
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ConfigError(f"{flag} '{uri}': cannot reach it ({text}); check the URI and the "
                          "cloud credentials of this machine") from None  # fmt: skip


class Mirror:
    """A local directory mirrored to a URI: `pull` downloads, `push` uploads what changed
    since this process last pushed, then deletes what `forget` was told (hidden files
    stay local)."""

    def __init__(self, uri: str, local: Path) -> None:
        self.uri, self.local = uri.rstrip("/"), Path(local)
        self.fs, self.path = open_fs(self.uri)
        self._pushed: dict[str, tuple[int, int]] = {}  # relative name -> (size, mtime_ns)
        self._doomed: list[str] = []  # relative names to delete after the next upload
        self.vanished = 0  # objects the last pull listed but could not download

    def empty(self) -> bool:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path, allow_not_found=True)
        return not self.fs.get_file_info(selector)

    def exists(self, name: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(f"{self.path}/{name}").type == pafs.FileType.File

    def refresh(self, name: str) -> None:
        """Download `name` again if the store has it (another driver may have changed it)."""
        from orchestrator.atomic import atomic_write_bytes

        data = _read(self.fs, f"{self.path}/{name}")
        if data is not None:
            (self.local / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.local / name, data)
            self._pushed[name] = _stamp(self.local / name)

    def pull(self, under: str = "") -> list[str]:
        """Download every file (under `under`) not already here; returns their names."""
        import pyarrow.fs as pafs

        from orchestrator.atomic import atomic_write_bytes

        base = f"{self.path}/{under}".rstrip("/")
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True,
                                                        allow_not_found=True))  # fmt: skip
        fetched, self.vanished = [], 0
        for info in infos:
            name = info.path[len(self.path) + 1 :]
            target = self.local / name
            if info.type != pafs.FileType.File or target.exists():
                continue
            data = _read(self.fs, info.path)
            if data is None:  # deleted since listed: a merge's source (its merged file is up)
                self.vanished += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, data)
            self._pushed[name] = _stamp(target)  # the store has it already
            fetched.append(name)
        return fetched

    def forget(self, names: list[str]) -> None:
        """Delete these (relative names, gone here) from the store at the end of the next
        push: after the files that hold their rows are uploaded."""
        for name in names:
            self._pushed.pop(name, None)
        self._doomed += names

    def push(self) -> int:
        """Upload new and changed files; returns how many."""
        sent = 0
        for path in sorted(self.local.rglob("*")):
            name = path.relative_to(self.local).as_posix()
            if not path.is_file() or any(p.startswith(".") for p in name.split("/")):
                continue
            stamp = _stamp(path)
            if self._pushed.get(name) == stamp:
                continue
            with self.fs.open_output_stream(f"{self.path}/{name}") as f:
                f.write(path.read_bytes())
            self._pushed[name] = stamp
            sent += 1
        while self._doomed:  # in order: a merged file goes only after its leftovers
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(f"{self.path}/{self._doomed[0]}")
            self._doomed.pop(0)
        return sent


def read_bytes(uri: str) -> bytes | None:
    """The object at `uri`, or None where there is none."""
    return _read(*open_fs(uri))


def _read(fs, path: str) -> bytes | None:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None  # deleted between the two calls
        raise


def _pulled(uri: str, local: Path, tries: int = 20) -> Mirror:
    """A Mirror of `uri` whose files are all in `local`, downloaded from one listing: where
    one vanished (a merge removed it after uploading the merged file), we start again,
    since mixing files of two listings could hold a row twice."""
    for _ in range(tries):
        mirror = Mirror(uri, local)
        mirror.pull()
        if not mirror.vanished:
            return mirror
        shutil.rmtree(local)
        local.mkdir()
    raise OSError(f"{uri} kept changing while it was downloaded; try again")


def shown(path: Path, local: Path, where: str | Path) -> str:
    """`path` (inside `local`, the local copy of `where`) as the user knows it."""
    if not is_uri(str(where)):
        return str(path)
    return join(str(where), Path(path).relative_to(local).as_posix())


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def staging_dir(name: str) -> Path:
    """A fresh local directory (0o700) to stage study `name` in."""
    return Path(tempfile.mkdtemp(prefix="prunesearch-")) / name


@contextlib.contextmanager
def local_copy(where: str | Path, *, pull: bool = True) -> Iterator[Path]:
    """A local path for a study directory (or an output directory) that may be a URI: the
    URI's files downloaded (`pull`) into a temporary directory, and anything written
    there uploaded back when the block ends without an error."""
    if not is_uri(str(where)):
        yield Path(where)
        return
    check_uri(str(where), "study" if pull else "--out")
    local = staging_dir("copy")
    local.mkdir(parents=True)
    try:
        mirror = _pulled(str(where), local) if pull else Mirror(str(where), local)
        yield local
        mirror.push()
    except ConfigError as exc:  # name the URI the user gave, not the temporary copy
        raise ConfigError(str(exc).replace(str(local), str(where).rstrip("/"))) from None
    finally:
        shutil.rmtree(local.parent, ignore_errors=True)

"""A throwaway PostgreSQL server on 127.0.0.1, for the tests of the shared tracking server.

    with postgres.running() as url:     # postgresql://postgres@127.0.0.1:<port>/mlflow
        ...

It uses the machine's PostgreSQL (Debian's `postgresql` package) when there is one,
else the build that the pgserver wheel ships (requirements-dev), so a fresh machine
runs the tests too. PostgreSQL refuses to run as root, as the tests do in CI: then
the server runs as `nobody`, in a folder of its own under the system temp dir
(pytest's tmp_path is root's alone). Everything is removed afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

UNPRIVILEGED = "nobody"
START_TIMEOUT = 60  # seconds for pg_ctl to see the server accept connections


def machine_bin() -> Path | None:
    """The folder of the machine's initdb / pg_ctl / postgres, if there are any."""
    on_path = shutil.which("pg_ctl")
    if on_path:  # Debian links them from /usr/local/bin or puts them on PATH by hand
        return Path(on_path).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version)
    return Path(versions[-1]).parent if versions else None


def _version(path: str) -> tuple[int, ...]:
    number = Path(path).parts[-3]
    return tuple(int(n) for n in number.split(".") if n.isdigit())


def wheel_bin() -> Path | None:
    """The folder of the PostgreSQL build inside the pgserver wheel, without importing
    pgserver (its import sets up locks and folders of its own)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
    return folder if (folder / "pg_ctl").is_file() else None


def find_bin() -> Path:
    found = machine_bin() or wheel_bin()
    if found is None:
        raise RuntimeError(
            "no PostgreSQL found: install Debian's postgresql, or "
            "`pip install -r requirements-dev.lock` for the one in the pgserver wheel"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One PostgreSQL cluster in its own folder: start(), stop(), and its URL."""

    def __init__(self, bin_dir: Path | None = None, database: str = "mlflow"):
        self.folder = Path(tempfile.mkdtemp(prefix="llf-postgres-"))
        self.as_root = os.geteuid() == 0
        self.bin = bin_dir or find_bin()
        if self.as_root:
            user = pwd.getpwnam(UNPRIVILEGED)
            self.user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            if not self._runs(self.bin / "postgres", "--version"):  # e.g. a venv under /root
                self.bin = self._copy_install()
        else:
            self.user = {}
        self.data = self.folder / "data"
        self.sockets = self.folder / "sockets"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
        self.database = database

    def _run(self, *args: str | Path, timeout: float = START_TIMEOUT) -> None:
        result = subprocess.run(
            [str(a) for a in args],
            cwd=self.folder,  # the unprivileged user must be able to enter its cwd
            capture_output=True,
            text=True,
            timeout=timeout,
            **self.user,
        )
        if result.returncode != 0:
            log = self.folder / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{' '.join(map(str, args))} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}{tail}"
            )

    def _runs(self, *args: str | Path) -> bool:
        try:
            self._run(*args, timeout=30)
        except (RuntimeError, OSError):
            return False
        return True

    def _copy_install(self) -> Path:
        """A copy of the wheel's PostgreSQL that the unprivileged user can read: the
        install (pgserver/pginstall) and the libraries its RPATH names, which sit three
        levels up from bin/ (site-packages/pgserver.libs)."""
        install = self.bin.parent
        site = install.parents[1]
        copy = self.folder / "install"
        for part in (install, site / "pgserver.libs"):
            if part.is_dir():
                shutil.copytree(part, copy / part.relative_to(site), symlinks=True)
        for path in [copy, *copy.rglob("*")]:
            os.lchown(path, self.user["user"], self.user["group"])
        return copy / install.relative_to(site) / "bin"

    def start(self) -> str:
        if not (self.data / "PG_VERSION").exists():
            self.sockets.mkdir(exist_ok=True)
            if self.as_root:
                os.chown(self.sockets, self.user["user"], self.user["group"])
            # trust: only this machine's loopback and socket can reach it; --no-sync: a test
            # cluster needs no durability, nor fsync below
            self._run(
                self.bin / "initdb",
                "-D",
                self.data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
            self._start()
            self._run(
                self.bin / "createdb",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                self.database,
            )
        else:
            self._start()
        return self.url

    def _start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -F"
        self._run(
            self.bin / "pg_ctl",
            "start",
            "-w",
            "-t",
            str(START_TIMEOUT),
            "-D",
            self.data,
            "-l",
            self.folder / "server.log",
            "-o",
            options,
        )

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(self.bin / "pg_ctl", "stop", "-w", "-m", "fast", "-D", self.data)

    def remove(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def running(bin_dir: Path | None = None, database: str = "mlflow") -> Iterator[str]:
    """A fresh PostgreSQL with an empty `database`, on a free 127.0.0.1 port; yields its URL."""
    server = Server(bin_dir, database)
    try:
        yield server.start()
    finally:
        server.remove()

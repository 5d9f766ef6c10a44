"""`make server`: check what a shared tracking server needs, then become `mlflow server`.

Left to itself, `mlflow server` logs a port in use and exits 0, answers a DB that is not a
database URL with a traceback, and retries an unreachable database for minutes. Here each
is one line, `error: <problem>; <fix>`, and exit 2, within seconds. Then this process execs
`mlflow server` (same pid: whatever stops it stops the server), with the GenAI job runner
off: nothing here uses it, and it is one more process per server.

    python -m src.server --host 127.0.0.1 --port 5000 --workers 4 \
        --db postgresql://user:password@host:5432/database --artifacts /srv/mlartifacts
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys

from src.errors import UserError

CONNECT_TIMEOUT_S = 5  # per address of the database host; psycopg's least is 2
# MLflow's SQL stores (mlflow.store.db.db_types.DATABASE_ENGINES, which tests compare with
# this): importing mlflow for it would take seconds of the 15 a failure may.
DATABASE_ENGINES = ("postgresql", "mysql", "sqlite", "mssql")
NEEDS = (
    "make server needs DB=postgresql://user:password@host:5432/database "
    "and ARTIFACTS=<a folder or s3://bucket/path>"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other error here
        raise UserError(f"{message}; see `python -m src.server --help`")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m src.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (HOST)")
    parser.add_argument("--port", type=int, default=5000, help="port to serve on (PORT)")
    parser.add_argument("--workers", type=int, default=4, help="server processes (WORKERS)")
    parser.add_argument("--db", default="", help="the runs' database, a SQLAlchemy URL (DB)")
    parser.add_argument("--artifacts", default="", help="a folder or s3://bucket/path")
    parser.add_argument(
        "--allowed-hosts", default="", help="names clients may reach the server by, comma-separated"
    )
    args = parser.parse_args(argv)
    if not args.db or not args.artifacts:
        raise UserError(NEEDS)
    if not 1 <= args.port <= 65535:
        raise UserError(f"PORT={args.port} is not a port; use one from 1024 to 65535")
    if args.workers < 1:
        raise UserError(f"WORKERS={args.workers}: at least 1 server process is needed")
    return args


def database_url(db: str):
    """DB as a SQLAlchemy URL of a database MLflow can keep runs in, or a UserError."""
    import sqlalchemy

    fix = "use DB=postgresql://user:password@host:5432/database"
    try:
        url = sqlalchemy.make_url(db)
    except sqlalchemy.exc.ArgumentError:
        raise UserError(f"DB={db} is not a database URL; {fix}") from None
    if not any(url.drivername.lower().startswith(name) for name in DATABASE_ENGINES):
        raise UserError(
            f"DB={shown(url)}: MLflow keeps runs in {', '.join(DATABASE_ENGINES)} only; {fix}"
        )
    try:
        url.get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        raise UserError(
            f"DB={shown(url)}: SQLAlchemy has no driver {url.drivername}; {fix}"
        ) from None
    return url


def shown(url) -> str:
    """The URL as messages print it: without its password."""
    return url.render_as_string(hide_password=True)


def check_port(host: str, port: int) -> None:
    """Bind (host, port) as the server will (SO_REUSEADDR, as uvicorn sets it), and let go."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise UserError(
            f"HOST={host} is not an address of this machine ({exc.strerror}); use "
            "HOST=127.0.0.1 (this machine only) or HOST=0.0.0.0 (every interface)"
        ) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                problem = f"port {port} on {host} is in use (another server?)"
                raise UserError(f"{problem}; stop it, or pick a free one with PORT=") from None
            if exc.errno == errno.EACCES:
                problem = f"serving on port {port} needs root"
                raise UserError(f"{problem}; pick one from 1024 up with PORT=") from None
            raise UserError(f"can't serve on {host}:{port} ({exc.strerror}); check HOST") from None


def check_database(url) -> None:
    """Connect once, within seconds: MLflow would retry an unreachable database for minutes."""
    import sqlalchemy

    timeout = {"connect_timeout": CONNECT_TIMEOUT_S}
    connect_args = timeout if url.get_backend_name() in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(
            url, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool
        )
    except ImportError as exc:  # the dialect's driver
        raise UserError(
            f"DB={shown(url)} needs the Python module {exc.name}, which is not installed: "
            "install it here, or use PostgreSQL (its driver, psycopg, is installed)"
        ) from None
    fix = "check the path in DB" if url.get_backend_name() == "sqlite" else "start it, or fix DB"
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise UserError(f"can't reach the database {shown(url)} ({reason}); {fix}") from None
    finally:
        engine.dispose()


def mlflow_command(args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "mlflow", "server", "--host", args.host]
    command += ["--port", str(args.port), "--workers", str(args.workers)]
    command += ["--backend-store-uri", args.db, "--artifacts-destination", args.artifacts]
    return command + (["--allowed-hosts", args.allowed_hosts] if args.allowed_hosts else [])


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(argv)
        url = database_url(args.db)
        check_port(args.host, args.port)
        check_database(url)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted before the server started", file=sys.stderr)
        sys.exit(130)
    print(
        f"serving http://{args.host}:{args.port}: runs in {shown(url)}, artifacts in "
        f"{args.artifacts}",
        file=sys.stderr,
        flush=True,
    )
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    os.execv(sys.executable, mlflow_command(args))


if __name__ == "__main__":
    main()

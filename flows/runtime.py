"""What a ``slimdiff run`` process owns, and how it leaves nothing behind (docs/reliability.md).

Without ``PREFECT_API_URL`` a flow needs Prefect's temporary API server (a uvicorn subprocess).
Prefect stops it from ``atexit``, which never runs when the process is killed by SIGTERM (Prefect
re-delivers SIGTERM to the default handler after recording the crash) or SIGKILL, so the server
outlived the run. Here the run owns it:

* :func:`supervised` starts it (on a thread, so its boot overlaps the imports, once the params
  that need no model have passed) and stops it on return, on an error, on SIGINT and on SIGTERM
  (the handler raises :class:`Terminated`, which unwinds the flow: its MLflow run is marked KILLED);
* every process the run starts inherits ``SLIMDIFF_RUN_TOKEN``, and the run leaves a record
  ``<artifact_root>/.runs/<token>.json`` with its own pid and start time. Nothing survives SIGKILL,
  so the next run calls :func:`stop_orphans`: for each record whose owner is gone it stops every
  process still carrying that token (the server, Dask workers, ...), then drops the record.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

TOKEN_VAR = "SLIMDIFF_RUN_TOKEN"
RUNS_DIR = ".runs"


class Terminated(BaseException):  # noqa: N818 - a signal, like KeyboardInterrupt, not an error
    """SIGTERM reached a supervised run; unwinds it like KeyboardInterrupt does for SIGINT."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def stop_orphans(artifact_root: str | Path) -> list[dict]:
    """Stop the processes left behind by killed runs of this workspace; returns what was stopped
    (pid, command line, owner pid). Runs still alive, and their processes, are not touched."""
    import psutil

    runs = Path(artifact_root) / RUNS_DIR
    if not runs.is_dir():
        return []
    stopped: list[dict] = []
    for record_file in sorted(runs.glob("*.json")):
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            continue
        if record.get("host") != socket.gethostname():
            continue  # another machine's run (shared workspace): its processes are not visible here
        started = _process_started(int(record["pid"]))
        if started is not None and abs(started - float(record["started"])) < 1.0:
            continue  # the owner still runs
        left = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if proc.pid != os.getpid() and proc.environ().get(TOKEN_VAR) == record["token"]:
                    left.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        for proc in left:
            proc.terminate()
        _, alive = psutil.wait_procs(left, timeout=5)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=5)
        for proc in left:
            cmd = " ".join((proc.info.get("cmdline") or [])[:6])
            stopped.append({"pid": proc.pid, "cmdline": cmd, "owner_pid": record["pid"]})
            log.warning("stopped pid %d left by killed run (pid %s): %s", proc.pid, record["pid"], cmd)
        record_file.unlink(missing_ok=True)
    return stopped


def _start_prefect_server_early():
    """Without PREFECT_API_URL a flow starts Prefect's temporary API server when it first needs
    the API, after this process has imported torch, diffusers and MLflow. Start that same server
    (Prefect's own singleton) now, on a thread, so that its boot runs on another core while the
    imports happen. Returns (the server, or None when an API URL is set and nothing is started;
    a callable that waits for the start). If the early start fails, the flow's own start runs as
    usual and reports it."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None, lambda: None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()

    def start() -> None:
        try:
            server.start()
        except Exception as err:  # noqa: BLE001 - the flow's own start raises it again, with context
            log.debug("early Prefect server start failed: %s", err)

    thread = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    thread.start()
    return server, thread.join


def _drain_prefect_logs() -> None:
    try:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()  # sends what is queued (at most 5 s)
    except Exception as err:  # noqa: BLE001 - only log delivery is at stake
        log.debug("could not flush Prefect's API logs: %s", err)


class Supervisor:
    """What :func:`supervised` yields: starts the servers the run needs, remembers them to stop."""

    def __init__(self) -> None:
        self.server = None

    def start_prefect_server(self) -> Callable[[], None]:
        """Start Prefect's temporary server early (when no PREFECT_API_URL is set); returns a
        callable that waits until it is up. It is stopped when the supervised block ends."""
        self.server, wait = _start_prefect_server_early()
        return wait


@contextmanager
def supervised(artifact_root: str | Path) -> Iterator[Supervisor]:
    """Own this run's processes (see the module docstring): stops orphans of killed runs first,
    turns SIGTERM into :class:`Terminated`, and stops the server it started however it ends."""
    stop_orphans(artifact_root)
    token = uuid.uuid4().hex
    os.environ[TOKEN_VAR] = token  # inherited by every process started from here on
    runs = Path(artifact_root) / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    record = runs / f"{token}.json"
    me = os.getpid()
    record.write_text(
        json.dumps(
            {
                "token": token,
                "pid": me,
                "started": _process_started(me),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
    )

    def on_sigterm(signum, frame):
        raise Terminated(signum)

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: the caller owns signal handling
        previous = None
    supervisor = Supervisor()
    try:
        yield supervisor
    finally:
        try:
            server = supervisor.server  # only the one this run started
            if server is not None and server.server_process is not None:
                _drain_prefect_logs()  # the crash records reach the server before it stops
                server.stop()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            record.unlink(missing_ok=True)
            os.environ.pop(TOKEN_VAR, None)

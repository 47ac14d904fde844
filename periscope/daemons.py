"""Background processes the project starts itself (Kafka brokers, Spark master and workers), and only those.

A daemon is known by two things: the pid file its start wrote, and the end of
the command line it was started with (which names a file of its own state
dir, e.g. ``kafka.Kafka <state>/kafka/server.properties``). A pid is acted on
only while both agree, so a stale pid file (after a reboot its number may
belong to anything) is removed, never signalled, and stopping one state dir's
daemons never touches another's, nor anything else.

Each daemon runs in a session of its own (Ctrl-C in the terminal that started
it leaves it alone), with stdout and stderr appended to its log file.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Daemon:
    """How to recognise one daemon: its pid file and the end of its command line."""

    name: str
    pid_file: Path
    command_ending: str
    log_file: Path


def alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child that exited
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def command_line(pid: int) -> str:
    """The process's arguments joined by spaces ("" if there is no such process)."""
    try:
        if Path("/proc/self/cmdline").exists():
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        result = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True)
        return result.stdout.strip()
    except OSError:
        return ""


def running_pid(daemon: Daemon) -> int | None:
    """The pid of the daemon, if the process its pid file names is alive and is that daemon."""
    try:
        pid = int(daemon.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) and _command_line_settled(pid).endswith(daemon.command_ending) else None


def _command_line_settled(pid: int, patience_s: float = 1.0) -> str:
    """The command line, read again while it is empty: a process in the middle of exec shows none."""
    deadline = time.monotonic() + patience_s
    line = command_line(pid)
    while not line and alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
        line = command_line(pid)
    return line


def launch(daemon: Daemon, command: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None) -> int:
    """Start ``command`` in the background as ``daemon``; return its pid (written to the pid file).

    The command must end with ``daemon.command_ending`` and exec its JVM
    (``java`` itself, or ``spark-class``, which execs ``java``), so the pid is
    the process that ``running_pid`` later recognises.
    """
    daemon.log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(daemon.log_file, "ab") as log_out:
        process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=log_out, stderr=subprocess.STDOUT,
                                   cwd=cwd, env=None if env is None else dict(env), start_new_session=True)
    process.returncode = 0  # tells Popen not to wait for (or warn about) a child meant to outlive us
    daemon.pid_file.write_text(f"{process.pid}\n")
    return process.pid


def stop(daemons: Sequence[Daemon], timeout: float = 30.0) -> list[int | None]:
    """Stop each running daemon; return their pids (None for those not running), in order.

    SIGTERM to all at once (a Kafka quorum shuts down faster together than one
    node after another), SIGKILL to any still running after ``timeout``.
    Stale pid files are removed.
    """
    pids = [running_pid(daemon) for daemon in daemons]
    for daemon, pid in zip(daemons, pids):
        if pid is None and daemon.pid_file.exists():
            log.info("Removing %s: its pid is not a running %s of this state dir", daemon.pid_file, daemon.name)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid is not None and alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for daemon, pid in zip(daemons, pids):
        if pid is not None and alive(pid):
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", daemon.name, pid, timeout)
            os.kill(pid, signal.SIGKILL)
            while alive(pid):
                time.sleep(0.1)
        daemon.pid_file.unlink(missing_ok=True)
    return pids


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (for tests and benchmarks)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the JVM binds
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def port_open(address: str, timeout: float) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, _, port = address.strip().rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log, read without loading the whole file: for error messages."""
    try:
        with open(path, errors="replace") as log_in:
            return "".join(deque(log_in, maxlen=lines)).rstrip("\n")
    except OSError:
        return "(no log)"

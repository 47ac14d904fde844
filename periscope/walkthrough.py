"""The classroom walkthrough, executed: ``make walkthrough`` (``python -m periscope.walkthrough``).

docs/WALKTHROUGH.md is not written by hand. Its source is
docs/walkthrough/WALKTHROUGH.template.md: the prose, and the commands in the
order a class types them. This module runs every command of the template, in
that order, from a clean state of its own, captures what each one prints, and
writes the doc with that output under each command - as Spark's
``examples/src/main/python/sql/basic.py`` pastes each call's output under it,
except that here the output is produced, and checked, by running it::

    python -m periscope.walkthrough            # run it all, rewrite docs/WALKTHROUGH.md (make walkthrough)
    python -m periscope.walkthrough --check    # run it all, compare with docs/WALKTHROUGH.md (make test)

**A clean, separate state.** The commands run in a directory shaped like a
fresh clone (the scripts linked, ``data/``, ``var/`` and ``model/`` empty but
for the shipped sample and the fetched jars), with ``PERISCOPE_STATE_DIR``,
``PERISCOPE_DATA_DIR``, ``PERISCOPE_MODEL_DIR`` pointing into it and a Kafka
broker and dashboard on free ports (``KAFKA_PORT``, ``KAFKA_BOOTSTRAP_SERVERS``,
``STREAMLIT_SERVER_PORT``). Only the environment differs from a reader's, so
the commands are exactly what a reader types, and a running ``make demo`` is
never disturbed. What they print is rewritten back to the reader's view: the
temporary directory becomes ``data/``, ``var/``, ``model/``, the ports 9092,
9093 and 8501. Everything is stopped and removed at the end (``--keep`` keeps
the directory).

**The template.** Markdown, copied as it is, except fenced blocks whose info
string is an action. ``T`` names a terminal: a command started there keeps
running in the background while the next blocks run, as in a second window::

    ```run              a command typed and waited for; shown, with its output below it
    ```start T          a command started in terminal T (shown; its output waits for a show)
    ```show T           what terminal T printed since its last show
    ```type T           lines typed at a prompt in terminal T, shown with the answers
    ```await T          wait until terminal T prints a line matching `#| for:`, or exits (not shown)
    ```ctrl-c T         Ctrl-C in terminal T, and wait until it has stopped (not shown)
    ```kill-9 T         kill -9 of what runs in terminal T: no chance to clean up (not shown)

Options are lines at the top of a block, ``#| name: value`` (as in Quarto);
put a value in double quotes to keep spaces at its ends:

    wait-for: REGEX   show/start: wait until the output has a line matching it (show: up to that line)
    for: REGEX        await: the line to wait for (without it, await waits for the exit)
    only: REGEX       keep only the lines matching it (several: any of them)
    hide: REGEX       leave out the lines matching it (both in the doc and in the check)
    first: N / last: N  keep only the first / last N lines
    head: N, tail: M  when longer, show the first N and last M lines with "…" between
    volatile: REGEX   this block's figures that depend on timing: masked by --check
    expect: REGEX     the output must match, or the walkthrough fails: the doc's claims hold
    capture: NAME = REGEX   the first group, for {{NAME}} in the prose and in later expect:
    timeout: SECONDS  how long to wait (default 180; a run: 600)
    exit: N | any     the exit code a run (or an awaited exit) must have (default 0)
    prompt: TEXT      type: the prompt that says the answer is complete (default "sql> ")
    until: REGEX      type: type the line again, once a second, until its answer matches
    hidden: yes       type: do it, but do not show it (a readiness probe)
    output: no        run: show the command only

Plain fenced blocks (```bash, ```) are shown and not run: commands the
walkthrough cannot run for a reader (``make setup``, a browser). A comment
``<!--template ... -->`` is a note for the template's editors, left out of the doc.

**The check.** ``--check`` runs the template and compares the result with the
committed doc after masking, in both, what depends on timing: clock times,
durations, rates, latencies, pids, Kafka cluster ids, model versions (a
timestamp), Airflow run ids, the number of speed files pruned (``MASKS``), plus
each block's own ``volatile:`` patterns. Everything else must be equal: the
prose, the commands, the trip and dead-letter counts, version numbers,
watermarks, "none lost, none twice". On a difference it prints a unified diff
of the masked texts; when a command fails, the command and the end of its
output. The freshly rendered doc is written to var/walkthrough/WALKTHROUGH.md
(after a failure, what ran before it to var/walkthrough/WALKTHROUGH.partial.md).
"""
from __future__ import annotations

import argparse
import codecs
import difflib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from periscope import cli, config, kafka_local, spark_session

TEMPLATE = config.PROJECT_ROOT / "docs" / "walkthrough" / "WALKTHROUGH.template.md"
OUTPUT = config.PROJECT_ROOT / "docs" / "WALKTHROUGH.md"
CHECK_OUTPUT = config.PROJECT_ROOT / "var" / "walkthrough" / "WALKTHROUGH.md"
HEADER = ("<!-- Generated by `make walkthrough` from docs/walkthrough/WALKTHROUGH.template.md, which runs every "
          "command below and pastes its output: edit the template, not this file. -->\n\n")

ACTIONS = ("run", "start", "show", "type", "await", "ctrl-c", "kill-9")
OPTIONS = {
    "run": {"only", "hide", "first", "last", "head", "tail", "volatile", "expect", "capture", "timeout", "exit",
            "output"},
    "start": {"wait-for", "timeout", "volatile"},
    "show": {"wait-for", "only", "hide", "first", "last", "head", "tail", "volatile", "expect", "capture",
             "timeout"},
    "type": {"prompt", "until", "hidden", "hide", "volatile", "expect", "capture", "timeout"},
    "await": {"for", "timeout", "exit"},
    "ctrl-c": {"timeout"},
    "kill-9": {"timeout"},
}
LISTS = {"only", "hide", "volatile", "expect", "capture"}
WAIT_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0
RETYPE_EVERY_S = 1.0

MASKS: list[tuple[str, str]] = [
    (r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)?", "<timestamp>"),  # Airflow, manifests
    (r"\b\d\d/\d\d/\d\d \d\d:\d\d:\d\d\b", "<timestamp>"),  # Spark's own log lines
    (r"\b\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+", "<timestamp>"),  # Streamlit's (trips' times have no fraction)
    (r"(?m)^\d\d:\d\d:\d\d\b", "<clock>"),  # the layers' log lines
    (r"\b\d{8}T\d{6}Z\b", "<model version>"),
    (r"(?<!MAE )(?<!RMSE )\b\d[\d,]*(?:\.\d+)? m?s\b", "<duration>"),
    (r"\b\d[\d,]*(?:\.\d+)? (?:trips|MB)/s\b", "<rate>"),
    (r"\b\d[\d,]*(?:\.\d+)?/s\b", "<rate>"),
    (r"\bpid \d+", "pid <pid>"),
    (r"\bcluster id [\w-]+", "cluster id <id>"),
    (r"\bspeed layer [\w.-]+-\d+:", "speed layer <host>-<pid>:"),  # kafka_consumer.py's default consumer id
    (r"\(1 min [\d.-]+\)", "(1 min <rmsle>)"),  # the live error of the last minute
    (r"\bmanual__[\w:.+-]+", "manual__<run id>"),
    (r"\bpruned [\d,]+ speed", "pruned <n> speed"),  # one speed file per poll batch: as many as polls
]
"""What depends on timing in every block (pattern, replacement): masked in both texts by ``--check``."""

FENCE = re.compile(r"^```")
OPTION = re.compile(r"^#\|\s*([\w-]+):\s?(.*)$")
TEMPLATE_NOTE = re.compile(r"<!--template.*?-->\n?", re.DOTALL)  # notes for the template's editors only
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class WalkthroughError(RuntimeError):
    """A command failed, or did not print what the template waits for or claims."""


# --- the template ---------------------------------------------------------------------------------------


@dataclass
class Block:
    """One action of the template: what to do, in which terminal, with which options."""

    action: str
    terminal: str | None
    body: str
    options: dict[str, list[str]]
    line: int
    section: str

    def option(self, name: str, default: str | None = None) -> str | None:
        values = self.options.get(name)
        return values[-1] if values else default

    def number(self, name: str, default: float | None = None) -> float | None:
        value = self.option(name)
        return default if value is None else float(value)

    def where(self) -> str:
        return f"template line {self.line} ({self.section}): {self.action}" + (
            f" {self.terminal}" if self.terminal else "")


def parse_template(text: str) -> list[str | Block]:
    """Prose (str) and actions (Block), in order; plain fenced blocks stay prose."""
    chunks: list[str | Block] = []
    prose: list[str] = []
    lines = text.splitlines(keepends=True)
    section, index = "top", 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("## "):
            section = line[3:].strip()
        words = line[3:].split() if FENCE.match(line) else []
        if not words or words[0] not in ACTIONS:
            prose.append(line)
            index += 1
            continue
        start = index + 1
        end = next((i for i in range(start, len(lines)) if lines[i].strip() == "```"), None)
        if end is None:
            raise WalkthroughError(f"template line {index + 1}: the block `{line.strip()}` is never closed")
        chunks.append("".join(prose))
        prose = []
        chunks.append(parse_block(words, lines[start:end], index + 1, section))
        index = end + 1
    chunks.append("".join(prose))
    return chunks


def parse_block(words: list[str], body_lines: list[str], line: int, section: str) -> Block:
    action = words[0]
    wants_terminal = action != "run"
    if len(words) != (2 if wants_terminal else 1):
        raise WalkthroughError(f"template line {line}: `{' '.join(words)}`: "
                               + (f"{action} names one terminal, e.g. `{action} 4`" if wants_terminal
                                  else "run takes no terminal (it runs in the foreground)"))
    options: dict[str, list[str]] = {}
    rest = list(body_lines)
    while rest and OPTION.match(rest[0].rstrip("\n")):
        name, value = OPTION.match(rest.pop(0).rstrip("\n")).groups()
        if name not in OPTIONS[action]:
            raise WalkthroughError(f"template line {line}: {action} has no option {name!r} "
                                   f"(it has: {', '.join(sorted(OPTIONS[action]))})")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if name not in LISTS and name in options:
            raise WalkthroughError(f"template line {line}: option {name!r} given twice")
        options.setdefault(name, []).append(value)
    for name in options.get("capture", []):
        if "=" not in name:
            raise WalkthroughError(f"template line {line}: capture wants `NAME = REGEX`, got {name!r}")
    body = "".join(rest).strip("\n")
    if action in ("run", "start") and not body:
        raise WalkthroughError(f"template line {line}: {action} needs a command")
    return Block(action, words[1] if wants_terminal else None, body, options, line, section)


# --- the clean state -------------------------------------------------------------------------------------


@dataclass
class Sandbox:
    """A directory shaped like a fresh clone, and the environment that keeps every layer inside it."""

    root: Path
    env: dict[str, str]
    rewrites: list[tuple[str, str]]
    ports: dict[int, int]

    @classmethod
    def create(cls, project: Path = config.PROJECT_ROOT, jars: bool = True) -> Sandbox:
        """``jars``: link the fetched Kafka and Spark jars in (and insist that they are there)."""
        kafka_libs = kafka_local.BrokerFiles.of(kafka_local.default_state_dir()).libs
        spark_jars = spark_session.JARS_DIR
        if jars and not (kafka_libs / ".fetched").is_file():
            raise WalkthroughError(f"the Kafka jars are not in {kafka_libs}: run `make kafka-fetch` first")
        if jars and not (spark_jars / spark_session.MARKER).is_file():
            raise WalkthroughError(f"Spark's connector jars are not in {spark_jars}: "
                                   "run `make spark-fetch` first")
        root = Path(tempfile.mkdtemp(prefix="periscope-walkthrough-"))
        for entry in sorted(project.iterdir()):
            if entry.name not in {".git", ".venv", ".venv-compose", "data", "var", "model", "artifacts",
                                  "test-artifacts", ".pytest_cache", ".hypothesis"}:
                (root / entry.name).symlink_to(entry)
        (root / "data").mkdir()
        for entry in sorted((project / "data").iterdir()):
            if entry.is_file():
                (root / "data" / entry.name).symlink_to(entry.resolve())
        (root / "var" / "kafka").mkdir(parents=True)
        (root / "var" / "spark").mkdir()
        if jars:
            (root / "var" / "kafka" / "libs").symlink_to(kafka_libs.resolve())
            (root / "var" / "spark" / "jars").symlink_to(spark_jars.resolve())
        kafka_port, controller_port, dashboard_port = kafka_local.free_ports(3)
        ports = {kafka_port: kafka_local.DEFAULT_PORT, controller_port: kafka_local.DEFAULT_CONTROLLER_PORT,
                 dashboard_port: 8501}
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("PERISCOPE_", "KAFKA_", "AIRFLOW", "STREAMLIT_"))
               and name not in ("SPARK_MASTER", "VIRTUAL_ENV")}
        venv_bin = str(Path(sys.executable).parent)
        env.update({
            "PATH": venv_bin + os.pathsep + env.get("PATH", ""), "PYTHONUNBUFFERED": "1",
            "PERISCOPE_STATE_DIR": str(root / "var"), "PERISCOPE_DATA_DIR": str(root / "data"),
            "PERISCOPE_MODEL_DIR": str(root / "model"),
            "KAFKA_PORT": str(kafka_port), "KAFKA_CONTROLLER_PORT": str(controller_port),
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}", "STREAMLIT_SERVER_PORT": str(dashboard_port),
        })
        if Path(sys.prefix) != Path(sys.base_prefix):
            env["VIRTUAL_ENV"] = sys.prefix
        rewrites = []
        for base in dict.fromkeys([str(root), str(root.resolve())]):
            rewrites += [(f"{base}/", ""), (base, ".")]
        rewrites += [(f"{project.resolve()}/", ""), (f"{project}/", "")]
        return cls(root, env, rewrites, ports)

    def readers_view(self, text: str) -> str:
        """Output as a reader sees it: relative paths, default ports, no colours, no trailing blanks."""
        text = ANSI.sub("", text.replace("\r\n", "\n"))
        for old, new in self.rewrites:
            text = text.replace(old, new)
        for port, default in self.ports.items():
            text = re.sub(rf"(?<=:){port}\b", str(default), text)
        return "\n".join(line.rstrip() for line in text.split("\n"))

    def remove(self) -> None:
        kafka_local.stop_broker(self.root / "var")
        shutil.rmtree(self.root, ignore_errors=True)


# --- terminals -------------------------------------------------------------------------------------------


class Terminal:
    """A command running in the background, as in its own terminal window: its output, its keyboard."""

    def __init__(self, name: str, command: str, sandbox: Sandbox):
        self.name, self.command = name, command
        self.process = subprocess.Popen(["bash", "-c", command], cwd=sandbox.root, env=sandbox.env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # its own process group, as a terminal's job
        self.text, self.shown, self.closed = "", 0, False
        self.changed = threading.Condition()
        threading.Thread(target=self._read, name=f"terminal-{name}", daemon=True).start()

    def _read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = self.process.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            text = decoder.decode(chunk, final=not chunk)
            with self.changed:
                self.text += text
                self.closed = not chunk
                self.changed.notify_all()
            if not chunk:
                return

    def wait(self, found: Callable[[str], int | None], what: str, timeout: float, or_exit: bool = False) -> int:
        """Until ``found(text)`` gives an index (or, with ``or_exit``, the output ends); returns that index."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                index = found(self.text)
                if index is not None:
                    return index
                if self.closed:
                    if or_exit:
                        return len(self.text)
                    raise WalkthroughError(f"terminal {self.name} (`{self.command}`) ended without {what}; "
                                           f"it printed:\n{tail(self.text)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WalkthroughError(f"terminal {self.name} (`{self.command}`) did not print {what} within "
                                           f"{timeout:.0f} s; it printed:\n{tail(self.text)}")
                self.changed.wait(min(left, 1.0))

    def wait_for(self, pattern: str, timeout: float, whole_line: bool = True) -> int:
        """Until a line after the last show matches; returns the end of that line (nothing is shown).

        ``whole_line``: and until that line is complete, so that what is shown
        never ends in the middle of a line; a prompt (no newline) wants False.
        """
        regex = re.compile(pattern, re.MULTILINE)

        def found(text: str) -> int | None:
            match = regex.search(text, self.shown)
            if match is None:
                return None
            newline = text.find("\n", match.end())
            if newline < 0:
                return None if whole_line else len(text)
            return newline + 1
        return self.wait(found, f"a line matching {pattern!r}", timeout)

    def wait_exit(self, timeout: float) -> int:
        self.wait(lambda text: None, "exiting", timeout, or_exit=True)
        try:
            return self.process.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired as error:
            raise WalkthroughError(f"terminal {self.name} (`{self.command}`) closed its output but did not "
                                   f"exit") from error

    def take(self, end: int | None = None) -> str:
        """The output since the last show, up to ``end``; it counts as shown."""
        with self.changed:
            end = len(self.text) if end is None else max(end, self.shown)
            text, self.shown = self.text[self.shown:end], end
            return text

    def type(self, line: str) -> int:
        """Type a line (and Enter); returns where its answer starts in the output."""
        with self.changed:
            start = len(self.text)
        self.process.stdin.write((line + "\n").encode())
        self.process.stdin.flush()
        return start

    def signal(self, signum: int) -> None:
        """To the whole job (the command and its children), as a terminal sends Ctrl-C."""
        if self.running():  # not reaped yet, so its pid is still this job's process group
            os.killpg(self.process.pid, signum)

    def running(self) -> bool:
        return self.process.poll() is None

    def stragglers(self) -> list[psutil.Process]:
        """Processes of this job still alive after its command ended (a JVM child, say)."""
        alive = []
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) == self.process.pid and process.pid != self.process.pid:
                    alive.append(process)
            except (OSError, psutil.Error):
                continue
        return alive

    def close(self) -> None:
        """At the end of the walkthrough: what still runs gets SIGTERM, then SIGKILL."""
        if self.running():
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()
        for process in self.stragglers():
            process.kill()
        try:
            self.process.stdin.close()
        except OSError:
            pass


def close_gaps(prose: str) -> str:
    """One blank line where a block that shows nothing (await, ctrl-c, kill-9) left two or more."""
    return re.sub(r"\A\n{2,}", "\n", re.sub(r"\n{3,}", "\n\n", prose))


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip("\n").split("\n")[-lines:])


# --- running the template ---------------------------------------------------------------------------------


@dataclass
class Rendered:
    """The doc as the run produced it, and what the check may mask in each of its fenced blocks."""

    text: str
    block_masks: list[list[str]]
    seconds: float


@dataclass
class Runner:
    sandbox: Sandbox
    log: Callable[[str], None]
    verbose: bool = False
    terminals: dict[str, Terminal] = field(default_factory=dict)
    captures: dict[str, str] = field(default_factory=dict)
    began: float = field(default_factory=time.monotonic)

    def run_all(self, chunks: list[str | Block]) -> Rendered:
        parts: list[tuple[str, list[str] | None]] = []  # (text, None) for prose, (text, masks) for a block
        try:
            for chunk in chunks:
                if isinstance(chunk, str):
                    parts.append((chunk, None))
                    continue
                first_line = chunk.body.splitlines()[0][:60] if chunk.body else ""
                self.log(f"[{time.monotonic() - self.began:6.1f} s] {chunk.section[:28]:<28} {chunk.action:<6} "
                         f"{chunk.terminal or '':<2} {first_line}")
                try:
                    text = getattr(self, "do_" + chunk.action.replace("-", "_"))(chunk)
                except WalkthroughError as error:
                    error.partial = "".join(part for part, _ in parts)  # what ran, for a look at it
                    raise
                if self.verbose and text:
                    self.log(text.rstrip("\n"))
                if text:
                    parts.append((text, chunk.options.get("volatile", [])))
        finally:
            for terminal in self.terminals.values():
                terminal.close()
        text, block_masks = "", []
        for part, volatile in parts:
            if volatile is None:
                part = self.fill(TEMPLATE_NOTE.sub("", part))
            text += part
            fenced = sum(1 for segment in split_fences(part) if segment.startswith("```"))
            block_masks += [volatile or []] * fenced
        text = "".join(segment if segment.startswith("```") else close_gaps(segment)
                       for segment in split_fences(text))
        return Rendered(HEADER + text.lstrip("\n"), block_masks, time.monotonic() - self.began)

    def fill(self, prose: str) -> str:
        def value(match: re.Match) -> str:
            if match.group(1) not in self.captures:
                raise WalkthroughError(f"the prose uses {{{{{match.group(1)}}}}}, which no block captures")
            return self.captures[match.group(1)]
        return PLACEHOLDER.sub(value, prose)

    # the actions

    def do_run(self, block: Block) -> str:
        process = subprocess.Popen(["bash", "-c", block.body], cwd=self.sandbox.root, env=self.sandbox.env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            raw, _ = process.communicate(timeout=block.number("timeout", RUN_TIMEOUT_S))
        except subprocess.TimeoutExpired as error:
            os.killpg(process.pid, signal.SIGKILL)
            raw, _ = process.communicate()
            raise WalkthroughError(f"{block.where()}: `{block.body}` did not finish within "
                                   f"{block.number('timeout', RUN_TIMEOUT_S):.0f} s; it printed:\n"
                                   f"{tail(raw.decode(errors='replace'))}") from error
        output = raw.decode(errors="replace")
        self.check_exit(block, process.returncode, output)
        shown = self.finish(block, output)
        command = f"```bash\n{block.body}\n```\n"
        if block.option("output") == "no" or not shown:
            return command
        return f"{command}\n```\n{shown}\n```\n"

    def do_start(self, block: Block) -> str:
        previous = self.terminals.get(block.terminal)
        if previous is not None and previous.running():
            raise WalkthroughError(f"{block.where()}: terminal {block.terminal} still runs `{previous.command}`; "
                                   "stop it first (ctrl-c, kill-9 or await)")
        if previous is not None:
            previous.close()
        terminal = self.terminals[block.terminal] = Terminal(block.terminal, block.body, self.sandbox)
        if block.option("wait-for"):  # seen, not shown: a later show prints it
            terminal.wait_for(block.option("wait-for"), block.number("timeout", WAIT_TIMEOUT_S), whole_line=False)
        return f"```bash\n{block.body}\n```\n"

    def do_show(self, block: Block) -> str:
        terminal = self.terminal(block)
        end = None
        if block.option("wait-for"):
            end = terminal.wait_for(block.option("wait-for"), block.number("timeout", WAIT_TIMEOUT_S))
        shown = self.finish(block, terminal.take(end))
        return f"```\n{shown}\n```\n" if shown else ""

    def do_type(self, block: Block) -> str:
        terminal = self.terminal(block)
        prompt = block.option("prompt", "sql> ")
        timeout = block.number("timeout", WAIT_TIMEOUT_S)

        def after(start: int) -> Callable[[str], int | None]:
            return lambda text: len(text) - len(prompt) if len(text) >= start + len(prompt) and text.endswith(
                prompt) else None

        terminal.take(terminal.wait(after(0), f"the prompt {prompt!r}", timeout) + len(prompt))  # the prompt now
        transcript = []
        deadline = time.monotonic() + timeout
        for line in block.body.splitlines():
            while True:
                start = terminal.type(line)
                end = terminal.wait(after(start), f"the prompt {prompt!r} after {line!r}", timeout, or_exit=True)
                answer = terminal.take(end)
                terminal.take(min(end + len(prompt), len(terminal.text)))
                if not block.option("until") or re.search(block.option("until"), answer, re.MULTILINE):
                    break
                if not terminal.running() or time.monotonic() > deadline:
                    raise WalkthroughError(f"{block.where()}: no answer to {line!r} matched "
                                           f"{block.option('until')!r} within {timeout:.0f} s; the last one:\n"
                                           f"{tail(answer)}")
                time.sleep(RETYPE_EVERY_S)  # a poll interval: the condition is the answer itself
            transcript.append(f"{prompt}{line}\n{answer}")
        shown = self.finish(block, "".join(transcript))
        return "" if block.option("hidden") == "yes" else f"```\n{shown}\n```\n"

    def do_await(self, block: Block) -> str:
        terminal = self.terminal(block)
        timeout = block.number("timeout", WAIT_TIMEOUT_S)
        if block.option("for"):
            terminal.wait_for(block.option("for"), timeout, whole_line=False)
        else:
            self.check_exit(block, terminal.wait_exit(timeout), terminal.text)
        return ""

    def do_ctrl_c(self, block: Block) -> str:
        terminal = self.terminal(block)
        terminal.signal(signal.SIGINT)
        terminal.wait_exit(block.number("timeout", STOP_TIMEOUT_S))
        return ""

    def do_kill_9(self, block: Block) -> str:
        terminal = self.terminal(block)
        terminal.signal(signal.SIGKILL)
        terminal.wait_exit(block.number("timeout", STOP_TIMEOUT_S))
        return ""

    # helpers

    def terminal(self, block: Block) -> Terminal:
        if block.terminal not in self.terminals:
            raise WalkthroughError(f"{block.where()}: nothing was started in terminal {block.terminal}")
        return self.terminals[block.terminal]

    def check_exit(self, block: Block, code: int, output: str) -> None:
        wanted = block.option("exit", "0")
        if wanted != "any" and code != int(wanted):
            command = block.body if block.action == "run" else self.terminals[block.terminal].command
            raise WalkthroughError(f"{block.where()}: `{command}` exited with {code} (expected {wanted}); "
                                   f"the end of its output:\n{tail(output)}")

    def finish(self, block: Block, raw: str) -> str:
        """Rewrite, filter and trim an output; check its claims, take its captures."""
        lines = self.sandbox.readers_view(raw).strip("\n").split("\n")
        if block.options.get("only"):
            lines = [line for line in lines if any(re.search(p, line) for p in block.options["only"])]
        lines = [line for line in lines if not any(re.search(p, line) for p in block.options.get("hide", []))]
        if block.option("first"):
            lines = lines[:int(block.option("first"))]
        if block.option("last"):
            lines = lines[-int(block.option("last")):]
        head, tail_lines = int(block.option("head", "0")), int(block.option("tail", "0"))
        if (head or tail_lines) and len(lines) > head + tail_lines + 1:
            lines = lines[:head] + ["…"] + (lines[-tail_lines:] if tail_lines else [])
        text = "\n".join(lines).strip("\n")
        for claim in block.options.get("expect", []):
            pattern = PLACEHOLDER.sub(lambda m: re.escape(self.captures.get(m.group(1), m.group(0))), claim)
            if not re.search(pattern, text, re.MULTILINE):
                raise WalkthroughError(f"{block.where()}: the output does not match {pattern!r}, which the doc "
                                       f"claims; it is:\n{tail(text)}")
        for capture in block.options.get("capture", []):
            name, pattern = (part.strip() for part in capture.split("=", 1))
            match = re.search(pattern, text, re.MULTILINE)
            if match is None:
                raise WalkthroughError(f"{block.where()}: nothing in the output matches {pattern!r} "
                                       f"(capture {name}); it is:\n{tail(text)}")
            self.captures[name] = match.group(1)
        return text


def render(template: Path = TEMPLATE, log: Callable[[str], None] = print, verbose: bool = False,
           keep: bool = False, jars: bool = True) -> Rendered:
    """Run every block of the template from a clean state; the doc it produces."""
    chunks = parse_template(template.read_text())
    sandbox = Sandbox.create(jars=jars)
    log(f"walkthrough: {template} in {sandbox.root} (Kafka on {sandbox.env['KAFKA_BOOTSTRAP_SERVERS']})")
    try:
        return Runner(sandbox, log, verbose).run_all(chunks)
    finally:
        if keep:
            kafka_local.stop_broker(sandbox.root / "var")
            log(f"kept {sandbox.root}")
        else:
            sandbox.remove()


# --- the check --------------------------------------------------------------------------------------------


def split_fences(text: str) -> list[str]:
    """The text cut into prose and fenced blocks (each block with its fences), in order."""
    segments, current, inside = [], [], False
    for line in text.splitlines(keepends=True):
        if not inside and FENCE.match(line):
            segments.append("".join(current))
            current, inside = [line], True
        elif inside and line.strip() == "```":
            current.append(line)
            segments.append("".join(current))
            current, inside = [], False
        else:
            current.append(line)
    segments.append("".join(current))
    return [segment for segment in segments if segment]


def masked(text: str, block_masks: list[list[str]]) -> str:
    """The text with every timing-dependent figure replaced by a name for it."""
    out, ordinal = [], 0
    for segment in split_fences(text):
        if segment.startswith("```"):
            for pattern in block_masks[ordinal] if ordinal < len(block_masks) else []:
                segment = re.sub(pattern, "<volatile>", segment)
            ordinal += 1
        for pattern, replacement in MASKS:
            segment = re.sub(pattern, replacement, segment)
        out.append(segment)
    return "".join(out)


@dataclass
class CheckResult:
    ok: bool
    report: str
    seconds: float


def check(template: Path = TEMPLATE, doc: Path = OUTPUT, log: Callable[[str], None] = print,
          verbose: bool = False, keep: bool = False, rendered_to: Path = CHECK_OUTPUT,
          jars: bool = True) -> CheckResult:
    """Run the walkthrough and compare it with the committed doc, timing-dependent figures masked."""
    began = time.monotonic()
    try:
        rendered = render(template, log, verbose, keep, jars)
    except (WalkthroughError, kafka_local.KafkaLocalError) as error:
        return CheckResult(False, f"the walkthrough failed: {error}{save_partial(error, rendered_to)}",
                           time.monotonic() - began)
    rendered_to.parent.mkdir(parents=True, exist_ok=True)
    rendered_to.write_text(rendered.text)
    expected = masked(doc.read_text() if doc.exists() else "", rendered.block_masks)
    actual = masked(rendered.text, rendered.block_masks)
    if expected == actual:
        return CheckResult(True, f"{doc} shows what the walkthrough prints "
                                 f"({len(rendered.block_masks)} blocks, {rendered.seconds:.0f} s)",
                           rendered.seconds)
    diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                                        f"{doc} (masked)", f"{rendered_to} (this run, masked)", n=2))
    return CheckResult(False, f"{doc} differs from what the walkthrough prints now (timing-dependent figures "
                              f"masked); this run is in {rendered_to}, `make walkthrough` rewrites the doc:\n"
                              f"{diff}",
                       rendered.seconds)


def save_partial(error: Exception, path: Path) -> str:
    """Write what ran before a failure beside ``path``; the sentence that says where."""
    partial = getattr(error, "partial", None)
    if not partial:
        return ""
    target = path.with_suffix(".partial.md")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(HEADER + partial)
    return f"\n(what ran before it, with its output: {target})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m periscope.walkthrough", formatter_class=cli.HelpFormatter,
        description="Run every command of the walkthrough template, in order, from a clean state of its own, and "
                    "write docs/WALKTHROUGH.md with their output; --check compares instead (make test runs it).")
    parser.add_argument("--check", action="store_true",
                        help="compare with --output instead of rewriting it; exit code 1 when they differ")
    parser.add_argument("--template", type=Path, default=TEMPLATE, help="the doc's source")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the doc it writes (or, with --check, reads)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary clone and its state (the broker is stopped all the same)")
    parser.add_argument("--verbose", action="store_true", help="print each block's output as it runs")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.check:
        result = check(args.template, args.output, log, args.verbose, args.keep)
        print(result.report)
        return 0 if result.ok else 1
    try:
        rendered = render(args.template, log, args.verbose, args.keep)
    except (WalkthroughError, kafka_local.KafkaLocalError) as error:
        print(f"error: {error}{save_partial(error, CHECK_OUTPUT)}", file=sys.stderr)
        return 1
    args.output.write_text(rendered.text)
    print(f"wrote {args.output} ({rendered.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

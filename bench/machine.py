"""What machine a benchmark ran on, so that its numbers can be read and compared.

Both benchmarks (``bench/bench_batch.py``, ``bench/bench_model.py``) print
this first and store it in their JSON result: a time means little without
the CPU, the number of cores the process may use, the memory, the library
versions, and how busy the machine was (the load average), because the
machines Periscope is measured on are shared with other work. For the same
reason the benchmarks measure, around each timed run, how much CPU time
other processes took meanwhile (``machine_busy_s``, ``children_cpu_s``).

Run it on its own to see what a benchmark would record::

    python -m bench.machine
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

LIBRARIES = ("numpy", "pandas", "pyarrow", "fastavro", "scikit-learn", "joblib", "psutil")
CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: str) -> str:
    """The ``model name`` line of ``/proc/cpuinfo`` text, or the platform's best guess."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Installed version of each library ("missing" when it is not installed)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def children_cpu_s() -> float:
    """CPU seconds used so far by this process's finished children (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has used since boot (idle and I/O wait excluded).

    The difference over a measured run, minus the run's own CPU time, is
    what other people's work took from the machine meanwhile.
    """
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, OS, library versions and current load, as JSON-ready values."""
    cpuinfo = CPUINFO.read_text() if CPUINFO.exists() else ""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = psutil.virtual_memory()
    return {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(cpuinfo),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gb": round(memory.total / 2**30, 1),
        "ram_available_gb": round(memory.available / 2**30, 1),
        "load_average_1_5_15": [round(load, 2) for load in os.getloadavg()],
        "os": platform.platform(),
        "libraries": library_versions(),
    }


def machine_lines(info: dict[str, Any]) -> list[str]:
    """``machine_info`` as a few human-readable lines."""
    libraries = ", ".join(f"{name} {version}" for name, version in info["libraries"].items())
    load = " / ".join(f"{value:.2f}" for value in info["load_average_1_5_15"])
    return [
        f"machine: {info['cpu_model']}, {info['usable_cpus']} usable of {info['logical_cpus']} logical CPUs "
        f"({info['physical_cores']} physical cores), {info['ram_gb']:.1f} GiB RAM "
        f"({info['ram_available_gb']:.1f} GiB available)",
        f"  {info['os']}; load average {load} (1/5/15 min)",
        f"  {libraries}",
    ]


def print_machine(info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Print the machine description (measuring it unless given) and return it."""
    info = info or machine_info()
    for line in machine_lines(info):
        print(line)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.machine",
        description="Describe this machine as the benchmarks record it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print the description as one JSON object")
    args = parser.parse_args(argv)
    if args.json:
        print(json.dumps(machine_info(), indent=2))
    else:
        print_machine()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An SQL prompt in the terminal over a Spark session (``spark_streaming.py --sql``,
``batch_processor.py sql``).

Each line typed runs as ``spark.sql(line)`` and its first rows are shown. In
the speed layer the streaming queries go on meanwhile, so a query over a
memory-sink view shows what the stream has produced so far.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from pyspark.logger import PySparkLogger
from pyspark.sql import SparkSession

QUIT_WORDS = ("quit", "exit")


def quiet_query_errors() -> None:
    """Keep pyspark from logging a failed statement as a JSON blob with the JVM's stack trace;
    the prompt (or ``-e``) says what failed in one line."""
    for name in ("SQLQueryContextLogger", "DataFrameQueryContextLogger"):
        PySparkLogger.getLogger(name).setLevel(logging.CRITICAL)


def sql_prompt(spark: SparkSession, example: str, *, over: str = "the running streams",
               ends: str = "ends the prompt and stops the speed layer",
               before: Callable[[], object] | None = None) -> None:
    """Read SQL lines from the terminal and show their result, until ``quit``, ``exit`` or Ctrl-D.

    Empty lines are skipped; a line that fails prints the first line of its error and the
    prompt goes on. Spark's own WARN lines are held back while the prompt is open (log level
    ERROR), so they do not mix into what is typed. ``before`` runs before each statement.
    """
    spark.sparkContext.setLogLevel("ERROR")
    quiet_query_errors()
    print(f"SQL over {over}: e.g. {example} (quit, exit or Ctrl-D {ends})")
    while True:
        try:
            line = input("sql> ").strip().rstrip(";")
        except EOFError:
            return
        if line.lower() in QUIT_WORDS:
            return
        if not line:
            continue
        try:
            if before is not None:
                before()
            spark.sql(line).show(20, truncate=False)
        except Exception as error:  # noqa: BLE001 -- a typo in a query must not stop the stream
            print(f"error: {str(error).splitlines()[0]}")

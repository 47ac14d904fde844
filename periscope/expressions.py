"""Trip expressions as data: one definition of the cleaning rules and the view facts, two interpreters.

The cleaning rules (``schema.RULES``) and what the views compute per trip
(``views.FACTS``: its date, hour, distance band, grid cell, ...) are written
once, as trees of ``Expr`` built with Python operators and the functions
below (``field("trip_duration") >= 60``, ``where(...)``, ``sin(...)``). Two
interpreters read the same trees:

* ``evaluate``: numpy, over arrays of millions of record-form trips (the
  python batch engine, the speed layers, the loaders) or over the scalars of a
  single record (``schema.check_rules``);
* ``to_spark``: a Spark column expression (the Spark batch engine), so Spark
  evaluates the rules in the JVM, with no Python worker in between.

Both follow numpy's semantics of the record form, where a missing value is
NaN in a float field: NaN propagates through arithmetic, every comparison
with it is False and ``isnan`` finds it. Spark reads a missing double as null
and orders NaN above every number, so ``to_spark`` makes null and NaN behave
as numpy's NaN (comparisons with either are False; ``isnan`` is true for
both). Integer fields are never NaN: the record form has ``NOT_RECORDED``
there, and the Spark engine gives them that value too. Results agree to the
last bit except where the JVM's ``sin``/``cos``/``asin`` and numpy's differ
in the last place, which no rule or view can see unless a value lies within
1e-13 of a threshold (``tests/test_spark_batch.py`` compares both engines).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Operand = Any
"""An ``Expr`` or a Python number (made a literal)."""


class Expr:
    """A node: an operation and its arguments (``Expr`` nodes or plain values such as a field name)."""

    __slots__ = ("op", "args")
    __hash__ = object.__hash__

    def __init__(self, op: str, *args: Any) -> None:
        self.op, self.args = op, args

    def __repr__(self) -> str:
        return f"{self.op}({', '.join(map(repr, self.args))})"

    def __bool__(self) -> bool:
        raise TypeError("an Expr has no truth value: combine conditions with & | ~, not and/or/not")

    def __add__(self, other: Operand) -> Expr: return Expr("add", self, _expr(other))
    def __radd__(self, other: Operand) -> Expr: return Expr("add", _expr(other), self)
    def __sub__(self, other: Operand) -> Expr: return Expr("sub", self, _expr(other))
    def __rsub__(self, other: Operand) -> Expr: return Expr("sub", _expr(other), self)
    def __mul__(self, other: Operand) -> Expr: return Expr("mul", self, _expr(other))
    def __rmul__(self, other: Operand) -> Expr: return Expr("mul", _expr(other), self)
    def __truediv__(self, other: Operand) -> Expr: return Expr("div", self, _expr(other))
    def __floordiv__(self, other: Operand) -> Expr: return Expr("floordiv", self, _expr(other))
    def __mod__(self, other: Operand) -> Expr: return Expr("mod", self, _expr(other))
    def __abs__(self) -> Expr: return Expr("abs", self)
    def __eq__(self, other: Operand) -> Expr: return Expr("eq", self, _expr(other))  # type: ignore[override]
    def __ge__(self, other: Operand) -> Expr: return Expr("ge", self, _expr(other))
    def __gt__(self, other: Operand) -> Expr: return Expr("gt", self, _expr(other))
    def __le__(self, other: Operand) -> Expr: return Expr("le", self, _expr(other))
    def __lt__(self, other: Operand) -> Expr: return Expr("lt", self, _expr(other))
    def __and__(self, other: Operand) -> Expr: return Expr("and", self, _expr(other))
    def __or__(self, other: Operand) -> Expr: return Expr("or", self, _expr(other))
    def __invert__(self) -> Expr: return Expr("not", self)


def _expr(value: Operand) -> Expr:
    return value if isinstance(value, Expr) else Expr("lit", value)


def field(name: str, missing: float | None = None) -> Expr:
    """A trip field; ``missing``: its value for trips whose columns lack the field (None: required)."""
    return Expr("field", name, missing)


def where(condition: Expr, then: Operand, otherwise: Operand) -> Expr:
    return Expr("where", condition, _expr(then), _expr(otherwise))


def maximum(a: Operand, b: Operand) -> Expr:
    return Expr("maximum", _expr(a), _expr(b))


def isnan(a: Expr) -> Expr:
    """True where a float value is missing (NaN; null in Spark)."""
    return Expr("isnan", a)


def sin(a: Expr) -> Expr: return Expr("sin", a)
def cos(a: Expr) -> Expr: return Expr("cos", a)
def arcsin(a: Expr) -> Expr: return Expr("arcsin", a)
def sqrt(a: Expr) -> Expr: return Expr("sqrt", a)
def floor(a: Expr) -> Expr: return Expr("floor", a)
def rint(a: Expr) -> Expr: return Expr("rint", a)


def square(a: Expr) -> Expr:
    return a * a


def radians(a: Expr) -> Expr:
    """Degrees to radians, as numpy and the JVM both compute it: one product with pi/180."""
    return a * (math.pi / 180.0)


def to_int(a: Expr) -> Expr:
    """A float value as a 64-bit integer (truncated; the value must be finite)."""
    return Expr("to_int", a)


def bucket(a: Expr, bounds: Sequence[float]) -> Expr:
    """How many of the ascending ``bounds`` are <= the value (numpy's ``searchsorted(side="right")``;
    NaN counts as above every bound)."""
    return Expr("bucket", a, tuple(float(b) for b in bounds))


def lookup(table: Sequence[float], index: Expr) -> Expr:
    """``table[index]``, NaN where the index is outside the table."""
    return Expr("lookup", tuple(float(v) for v in table), index)


def fields(*exprs: Expr) -> list[str]:
    """The trip fields the expressions read, in the order first met."""
    found: dict[str, None] = {}

    def visit(node: Expr) -> None:
        if node.op == "field":
            found.setdefault(node.args[0])
        for arg in node.args:
            if isinstance(arg, Expr):
                visit(arg)

    for expr in exprs:
        visit(expr)
    return list(found)


# --- numpy ------------------------------------------------------------------------------------------

_NUMPY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide,
    "floordiv": np.floor_divide, "mod": np.mod, "abs": np.abs, "maximum": np.maximum,
    "eq": np.equal, "ge": np.greater_equal, "gt": np.greater, "le": np.less_equal, "lt": np.less,
    "and": np.logical_and, "or": np.logical_or, "not": np.logical_not, "isnan": np.isnan,
    "sin": np.sin, "cos": np.cos, "arcsin": np.arcsin, "sqrt": np.sqrt, "floor": np.floor, "rint": np.rint,
    "where": np.where,
}


def _lookup(table: tuple[float, ...], index: Any) -> Any:
    values = np.asarray(table)
    index = np.asarray(index, dtype=np.int64)
    inside = (index >= 0) & (index < len(values))
    return np.where(inside, values[np.clip(index, 0, len(values) - 1)], np.nan)


def evaluate(expr: Expr, columns: Mapping[str, Any], cache: dict[int, Any] | None = None) -> Any:
    """The expression over record-form ``columns`` (numpy arrays of equal length, or one record's
    scalars). ``cache`` shares sub-expressions (the same node object) between calls."""
    cache = {} if cache is None else cache
    key = id(expr)
    if key in cache:
        return cache[key]
    op, args = expr.op, expr.args
    if op == "lit":
        value = args[0]
    elif op == "field":
        name, missing = args
        value = columns[name] if missing is None or name in columns else missing
    elif op == "bucket":
        value = np.searchsorted(args[1], evaluate(args[0], columns, cache), side="right")
    elif op == "lookup":
        value = _lookup(args[0], evaluate(args[1], columns, cache))
    else:
        operands = [evaluate(arg, columns, cache) for arg in args]
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.asarray(operands[0]).astype(np.int64) if op == "to_int" else _NUMPY[op](*operands)
    cache[key] = value
    return value


# --- Spark ------------------------------------------------------------------------------------------


_MAY_BE_NAN = {"field": None, "lit": None, "lookup": True, "arcsin": True, "sqrt": True, "div": True,
               "eq": False, "ge": False, "gt": False, "le": False, "lt": False, "and": False, "or": False,
               "not": False, "isnan": False, "bucket": False, "to_int": False}
"""Operations whose result can be NaN whatever their arguments (True), never (False), or as a field
or literal says (None); any other is NaN when an argument may be."""


def may_be_nan(expr: Expr, float_fields: frozenset[str]) -> bool:
    """Whether the expression can be NaN (null in Spark): a float field, or an operation that makes or
    passes on a NaN. Comparisons with a value that cannot be need no guard in Spark."""
    known = _MAY_BE_NAN.get(expr.op, "args")
    if expr.op == "field":
        return expr.args[0] in float_fields
    if expr.op == "lit":
        return isinstance(expr.args[0], float) and math.isnan(expr.args[0])
    if known != "args":
        return bool(known)
    return any(may_be_nan(arg, float_fields) for arg in expr.args if isinstance(arg, Expr))


def to_spark(expr: Expr, columns: Mapping[str, Any], float_fields: frozenset[str],
             cache: dict[int, Any] | None = None) -> Any:
    """The expression as a pyspark ``Column`` over record-form ``columns`` (field name -> Column:
    integers with ``NOT_RECORDED`` for a missing value, the ``float_fields`` null or NaN where
    missing). A value that cannot be a finite integer (NaN) becomes null in ``to_int``."""
    from pyspark.sql import functions as F  # noqa: N812 -- only the Spark engine needs pyspark

    cache = {} if cache is None else cache
    key = id(expr)
    if key in cache:
        return cache[key]
    op, args = expr.op, expr.args

    def arg(index: int) -> Any:
        return to_spark(args[index], columns, float_fields, cache)

    def missing(node: Expr, column: Any) -> Any:  # null or NaN: numpy's NaN
        return column.isNull() | F.isnan(column) if may_be_nan(node, float_fields) else F.lit(False)

    if op == "lit":
        value = F.lit(args[0])
    elif op == "field":
        name, default = args
        value = columns[name] if default is None or name in columns else F.lit(default)
    elif op in ("eq", "ge", "gt", "le", "lt"):
        a, b = arg(0), arg(1)
        compared = {"eq": a == b, "ge": a >= b, "gt": a > b, "le": a <= b, "lt": a < b}[op]
        if may_be_nan(args[0], float_fields) or may_be_nan(args[1], float_fields):
            compared = F.when(missing(args[0], a) | missing(args[1], b), F.lit(False)).otherwise(compared)
        value = compared
    elif op in ("and", "or"):
        value = (arg(0) & arg(1)) if op == "and" else (arg(0) | arg(1))
    elif op == "not":
        value = ~arg(0)
    elif op == "isnan":
        value = missing(args[0], arg(0))
    elif op in ("add", "sub", "mul", "div"):
        a, b = arg(0), arg(1)
        value = {"add": a + b, "sub": a - b, "mul": a * b, "div": a / b}[op]
    elif op == "mod":
        value = F.pmod(arg(0), arg(1))
    elif op == "floordiv":  # exact for integers below 2**53: the quotient of a multiple is exact
        a, b = arg(0), arg(1)
        value = ((a - F.pmod(a, b)) / b).cast("long")
    elif op == "maximum":
        a, b = arg(0), arg(1)
        value = F.greatest(a, b)
        if may_be_nan(expr, float_fields):  # greatest skips a null; numpy's maximum keeps a NaN
            value = F.when(a.isNull() | b.isNull(), F.lit(None)).otherwise(value)
    elif op == "where":
        value = F.when(arg(0), arg(1)).otherwise(arg(2))
    elif op == "bucket":
        a, bounds = arg(0), args[1]
        counted = sum((F.when(a >= bound, 1).otherwise(0) for bound in bounds), F.lit(0))
        value = F.when(missing(args[0], a), F.lit(len(bounds))).otherwise(counted).cast("long")
    elif op == "lookup":
        table, index = args[0], arg(1)
        values = F.lit(np.asarray(table))  # one array literal, one call to the JVM (not one per value)
        value = F.when((index >= 0) & (index < len(table)), F.element_at(values, (index + 1).cast("int"))
                       ).otherwise(F.lit(float("nan")))
    elif op == "to_int":
        value = arg(0).try_cast("long")
    else:
        value = {"abs": F.abs, "sin": F.sin, "cos": F.cos, "arcsin": F.asin, "sqrt": F.sqrt,
                 "floor": F.floor, "rint": F.rint}[op](arg(0))
    cache[key] = value
    return value

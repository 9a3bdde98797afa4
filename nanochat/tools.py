"""The calculator tool: what the engine runs between `<|python_start|>` and `<|python_end|>`.

The model writes a Python-looking expression; `calculate(expr)` evaluates it by walking its syntax
tree, never with `eval`. Allowed: int/float literals, + - * / // % ** (bounded), parentheses, unary
+/-, and string methods on string literals for letter counting: `"strawberry".count("r")`, with
`.lower()` / `.upper()` / `.strip()` before it. Anything else (names, calls, attributes, comprehensions)
is refused and gives None, as do errors such as division by zero.

Bounds instead of timeouts: the expression is at most MAX_EXPR_CHARS long, every intermediate number
stays within MAX_ABS (exponents are checked before they are computed), and strings never grow (only
methods that keep or shrink the length are allowed). Each operation is then cheap and the walk
visits at most a few hundred nodes, so evaluation is bounded in time without SIGALRM: it is a pure
function, safe to call from any thread (the web server's workers call it concurrently).

GSM8K writes numbers with thousands separators ("1,200"): commas between digits are removed first.
Results are formatted the way the GSM8K annotations write them: integers without a decimal point
(48 / 2 -> "24"), other floats to 10 significant digits.
"""

from __future__ import annotations

import ast
import math
import operator
import re

MAX_EXPR_CHARS = 400
MAX_NODES = 200
MAX_ABS = 10 ** 30  # bound on every intermediate number
MAX_EXPONENT = 256

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_STR_METHODS = {"count", "lower", "upper", "strip"}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


class CalculatorError(ValueError):
    """The expression is not allowed or cannot be evaluated (the tool then outputs nothing)."""


def _check_number(x):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise CalculatorError(f"not a number: {x!r}")
    if isinstance(x, float) and not math.isfinite(x):
        raise CalculatorError("result is not finite")
    if abs(x) > MAX_ABS:
        raise CalculatorError(f"number too large (limit {MAX_ABS:.0e})")
    return x


def _pow(base, exp):
    if isinstance(base, str) or isinstance(exp, str):
        raise CalculatorError("** needs numbers")
    if abs(exp) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {exp} too large (limit {MAX_EXPONENT})")
    if base != 0 and abs(base) != 1 and exp > 0 and exp * math.log10(abs(base)) > 30:
        raise CalculatorError("power too large")
    if base == 0 and exp < 0:
        raise CalculatorError("zero to a negative power")
    result = base ** exp
    if isinstance(result, complex):
        raise CalculatorError("complex result")
    return result


class _Evaluator:
    def __init__(self):
        self.nodes = 0

    def visit(self, node):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise CalculatorError(f"expression too complex (more than {MAX_NODES} nodes)")
        if isinstance(node, ast.Expression):
            return self.visit(node.body)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str):
                return node.value
            return _check_number(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            value = self.visit(node.operand)
            if isinstance(value, str):
                raise CalculatorError("unary sign on a string")
            return _check_number(-value if isinstance(node.op, ast.USub) else +value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = self.visit(node.left), self.visit(node.right)
            if isinstance(left, str) or isinstance(right, str):
                raise CalculatorError("arithmetic on strings is not allowed")  # "a" * 10**9 would be unbounded
            if isinstance(node.op, ast.Pow):
                return _check_number(_pow(left, right))
            try:
                return _check_number(_BINOPS[type(node.op)](left, right))
            except ZeroDivisionError:
                raise CalculatorError("division by zero") from None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.keywords:
            method = node.func.attr
            if method not in _STR_METHODS:
                raise CalculatorError(f"method {method!r} is not allowed (only {sorted(_STR_METHODS)})")
            target = self.visit(node.func.value)
            args = [self.visit(a) for a in node.args]
            if not isinstance(target, str) or not all(isinstance(a, str) for a in args):
                raise CalculatorError(f".{method}() works on string literals only")
            if method == "count":
                if len(args) != 1:
                    raise CalculatorError(".count() takes one string")
                return target.count(args[0])
            if args:
                raise CalculatorError(f".{method}() takes no arguments")
            return getattr(target, method)()
        raise CalculatorError(f"{type(node).__name__} is not allowed in a calculator expression")


def evaluate(expr: str):
    """The value of `expr` (int, float or str); CalculatorError when it is refused or fails."""
    if not isinstance(expr, str):
        raise CalculatorError("the expression must be a str")
    if len(expr) > MAX_EXPR_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPR_CHARS} characters")
    expr = _THOUSANDS.sub("", expr.strip())
    if not expr:
        raise CalculatorError("empty expression")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise CalculatorError(f"not an expression: {e}") from None
    return _Evaluator().visit(tree)


def format_result(value) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


def calculate(expr: str) -> str | None:
    """The tool's output text for `expr`, or None when it is refused (then the engine forces nothing)."""
    try:
        return format_result(evaluate(expr))
    except CalculatorError:
        return None

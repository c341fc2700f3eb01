"""A calculator that is safe by construction: the expression is parsed with ``ast`` and only arithmetic is walked.

    calculate("17 * 23 + 4")          # 395
    calculate("sqrt(2) / 2")          # 0.7071067811865476
    calculate("__import__('os')")     # ToolError: ... names are not arithmetic

Nothing is ever handed to ``eval``: the parser only builds a tree, and the walk below knows numbers, the operators
``+ - * / // % **``, unary minus and plus, parentheses, and a few named functions (abs, round, min, max, sqrt).
Everything else (names, attributes, subscripts, strings, comprehensions, lambdas) is refused by name. Results are
Python's own for the same expression: integers stay exact, ``/`` gives a float.

Limits keep one expression from eating the machine: its length, the nesting depth, and the size of an integer
power (``9**9**9`` would take minutes and gigabytes).
"""

from __future__ import annotations

import ast
import math
import operator

from scratchlm.function_schema import ToolError

MAX_LENGTH = 500  # characters of one expression
MAX_DEPTH = 50  # nested operations (the parser itself recurses on deeper ones)
MAX_POWER_BITS = 14_000  # an integer power's result may have at most this many bits (about 4,200 digits)

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FUNCTIONS = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression, e.g. 17 * 23 + 4 or sqrt(2) / 2.

    Args:
        expression: numbers with + - * / // % ** and parentheses; abs, round, min, max and sqrt
    """
    value = calculate(expression)
    if isinstance(value, float):
        return repr(value)
    try:
        return str(value)
    except ValueError:  # Python prints at most 4,300 digits of an integer (sys.set_int_max_str_digits)
        raise ToolError(f"the result has about {int(value.bit_length() * 0.30103):,} digits, too many to print") \
            from None


def calculate(expression: str) -> int | float:
    """The value of an arithmetic ``expression`` (a ToolError saying what is wrong otherwise)."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("the calculator needs an arithmetic expression, e.g. 17 * 23")
    if len(expression) > MAX_LENGTH:
        raise ToolError(f"the expression is {len(expression)} characters long; the calculator takes at most "
                        f"{MAX_LENGTH}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as exc:
        hint = " (write powers as **, not ^)" if "^" in expression else ""
        raise ToolError(f"not an arithmetic expression: {exc.msg if isinstance(exc, SyntaxError) else exc}"
                        f"{hint}") from None
    except RecursionError:
        raise ToolError(f"the expression is nested too deeply (at most {MAX_DEPTH} levels)") from None
    try:
        return _walk(tree.body, 0)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("the result is too large for a floating-point number") from None
    except (ValueError, TypeError) as exc:  # sqrt(-1), round(1, 2, 3), min() ...
        raise ToolError(f"cannot compute it: {exc}") from None


def _walk(node: ast.AST, depth: int) -> int | float:
    if depth > MAX_DEPTH:
        raise ToolError(f"the expression is nested too deeply (at most {MAX_DEPTH} levels)")
    if isinstance(node, ast.Constant):
        # bool is an int subclass in Python, and complex numbers are not arithmetic for this tool
        if type(node.value) not in (int, float):
            raise ToolError(f"{node.value!r} is not a number")
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _walk(node.left, depth + 1), _walk(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_walk(node.operand, depth + 1))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
        if node.keywords:
            raise ToolError(f"{node.func.id}() takes positional arguments only")
        args = [_walk(a, depth + 1) for a in node.args]
        return FUNCTIONS[node.func.id](*args)
    raise ToolError(f"{_describe(node)} is not arithmetic: use numbers, + - * / // % ** and parentheses, "
                    f"and {', '.join(FUNCTIONS)}")


def _check_power(base, exponent) -> None:
    """Refuse an integer power whose result would be enormous, before Python starts computing it."""
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * abs(base).bit_length() > MAX_POWER_BITS:
            raise ToolError(f"{base} ** {exponent} is too large (more than {MAX_POWER_BITS:,} bits)")


def _describe(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return f"the name {node.id!r} (names are not arithmetic)"
    if isinstance(node, ast.Call):
        return "calling " + (f"{node.func.id!r}" if isinstance(node.func, ast.Name) else "that")
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        return "the operator ^ (write powers as **)"
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        return f"the operator {type(node.op).__name__}"
    return f"a {type(node).__name__} expression"

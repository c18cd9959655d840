"""The calculator tool of the tool-use demo kit (written by scripts/build_tool_demo.py)."""
import ast

MAX_CHARS = 200  # longer expressions are refused
MAX_DIGITS = 100  # so are results (and intermediate results) longer than this

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def _value(node):
    """The integer value of an expression node: integers, + - *, unary minus and parentheses only."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        value = _OPS[type(node.op)](_value(node.left), _value(node.right))
        if len(str(abs(value))) > MAX_DIGITS:
            raise ValueError(f"result longer than {MAX_DIGITS} digits")
        return value
    raise ValueError(f"unsupported: {ast.unparse(node)!r} (integers with + - * and parentheses only)")


def calculator(expression: str) -> str:
    """Integer arithmetic with + - *.

    Args:
        expression: the expression, e.g. 347 * 29
    """
    if not isinstance(expression, str):
        raise ValueError("expression must be a string")
    if len(expression) > MAX_CHARS:
        raise ValueError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an expression: {expression!r}") from None
    return str(_value(tree.body))

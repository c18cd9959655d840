"""MiniMind-3's six mock tools (its trainer/train_agent.py), as plain functions that
`transformers.utils.get_json_schema` turns into the tool schemas a chat template's `tools=` takes.

Same names, parameters and required parameters as MiniMind-3's tool list, and the same result dicts (key order
included) for the same arguments: the tables below are MiniMind-3's fixed mock data, not real weather, clocks or
rates. Differences, all on purpose: a required argument left out raises TypeError (MiniMind-3 fills in a default;
its rollout turns any failure into {"error": "tool not found"} anyway), and calculate_math evaluates arithmetic
itself instead of calling eval (see safe_arithmetic). See docs/minimind.md "minimind-3's agent reward".
"""
import ast
import math
import operator

# city: (temperature, condition); any other city gets DEFAULT_WEATHER. Humidity is always 65%.
WEATHER = {
    "北京": ("28°C", "晴"), "上海": ("15°C", "多云"), "广州": ("32°C", "闷热"), "深圳": ("30°C", "晴"),
    "杭州": ("22°C", "阴"), "成都": ("18°C", "小雨"), "武汉": ("25°C", "多云"), "南京": ("20°C", "晴"),
    "西安": ("16°C", "大风"), "重庆": ("26°C", "阴"), "Tokyo": ("12°C", "晴"), "New York": ("8°C", "多云"),
    "London": ("5°C", "小雨"), "Paris": ("10°C", "阴"), "Sydney": ("25°C", "晴朗"),
}
DEFAULT_WEATHER = ("22°C", "晴")

DEFAULT_TIMEZONE = "Asia/Shanghai"
CLOCK = {  # one frozen moment, per time zone; an unknown zone reads Shanghai's time
    "Asia/Shanghai": "2025-03-07 14:30:00", "America/New_York": "2025-03-07 01:30:00",
    "Europe/London": "2025-03-07 06:30:00", "Asia/Tokyo": "2025-03-07 15:30:00",
    "Europe/Paris": "2025-03-07 07:30:00", "Australia/Sydney": "2025-03-07 17:30:00",
}

# from currency -> to currency -> rate (codes as written, case-sensitive); any other pair, reverse pairs
# included, is 1.0
RATES = {
    "USD": {"CNY": 7.21, "EUR": 0.92, "GBP": 0.79}, "EUR": {"CNY": 7.85}, "GBP": {"CNY": 9.12},
    "JPY": {"CNY": 0.048}, "CNY": {"JPY": 20.83}, "AUD": {"CNY": 4.72},
}

# target language -> source text -> translation (exact text, case-sensitive language); anything else comes
# back untranslated
TRANSLATIONS = {
    "english": {"你好世界": "Hello World", "今天天气真好": "The weather is nice today",
                "机器学习很有趣": "Machine learning is interesting"},
    "chinese": {"Good morning": "早上好", "I love programming": "我喜欢编程", "Happy birthday": "生日快乐"},
}

# (from unit, to unit), lower-cased -> factor; any other pair has factor 1. MiniMind-3's temperature entries
# are plain factors too (no 32-degree offset): 100 celsius -> 180.0 fahrenheit.
UNIT_FACTORS = {
    ("km", "miles"): 0.621371, ("miles", "km"): 1.60934, ("kg", "pounds"): 2.20462, ("pounds", "kg"): 0.453592,
    ("meters", "feet"): 3.28084, ("feet", "meters"): 0.3048, ("celsius", "fahrenheit"): 1.8,
    ("fahrenheit", "celsius"): 0.5556,
}


# ----------------------------------------------------------------------------- safe arithmetic
# the spellings MiniMind-3 accepts for Python's operators
SPELLINGS = str.maketrans({"×": "*", "÷": "/", "−": "-", "（": "(", "）": ")"})
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_INT_BITS = 64_000  # no integer grows past this (2 ** 10000 is fine; 9 ** 9 ** 9 is refused, not computed)
MAX_COUNTING_ARGUMENT = 20_000  # math.factorial / comb / perm of more would take seconds and give huge numbers


def safe_arithmetic(expression):
    """The value of an arithmetic expression: int and float literals, + - * / // % **, unary + and -,
    parentheses, and `math.<name>` constants and functions. `^` is read as `**` and ×, ÷, −, （, ） as
    *, /, -, (, ). Anything else, and integers that would exceed MAX_INT_BITS, raise ValueError; Python's own
    errors (ZeroDivisionError, a math domain error, ...) pass through."""
    text = str(expression).replace("^", "**").translate(SPELLINGS).lstrip(" \t")  # eval() drops leading blanks too
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {text!r}") from e
    return _value(tree.body)


def _value(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _value(node.left), _value(node.right)
        _refuse_huge(node.op, left, right)
        return BINARY[type(node.op)](left, right)
    if _is_math_name(node):
        return getattr(math, node.attr)  # AttributeError for a name math lacks
    if isinstance(node, ast.Call) and _is_math_name(node.func) and all(k.arg for k in node.keywords):
        function = getattr(math, node.func.attr)
        args = [_value(a) for a in node.args]
        kwargs = {k.arg: _value(k.value) for k in node.keywords}
        if node.func.attr in ("factorial", "comb", "perm") and any(
                isinstance(a, int) and abs(a) > MAX_COUNTING_ARGUMENT for a in args):
            raise ValueError(f"math.{node.func.attr} of more than {MAX_COUNTING_ARGUMENT} is refused")
        return function(*args, **kwargs)
    raise ValueError(f"not allowed in an arithmetic expression: {ast.unparse(node)!r}")


def _is_math_name(node):
    return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math"
            and not node.attr.startswith("_"))


def _refuse_huge(op, left, right):
    """ValueError before an integer product or power past MAX_INT_BITS is computed (floats overflow on their own)."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return
    if isinstance(op, ast.Mult):
        bits = left.bit_length() + right.bit_length()
    elif isinstance(op, ast.Pow) and right > 0 and abs(left) > 1:
        bits = right * math.log2(abs(left))
    else:
        return
    if bits > MAX_INT_BITS:
        raise ValueError(f"the result would have about {int(bits)} bits (more than {MAX_INT_BITS})")


# ----------------------------------------------------------------------------- the tools
def calculate_math(expression: str) -> dict:
    """Calculate a math expression.

    Args:
        expression: The expression, e.g. "(3 + 5) * 2" or "math.sqrt(2) ^ 2"; ^ is a power, and ×, ÷, −, （ and ）
            may stand for *, /, -, ( and ).
    """
    return {"result": str(safe_arithmetic(expression))}


def unit_converter(value: float, from_unit: str, to_unit: str) -> dict:
    """Convert a value from one unit to another.

    Args:
        value: The value to convert.
        from_unit: The unit of the value, e.g. km, miles, kg, pounds, meters, feet, celsius, fahrenheit.
        to_unit: The unit to convert to.
    """
    factor = UNIT_FACTORS.get((from_unit.lower(), to_unit.lower()), 1)
    return {"result": round(float(value) * factor, 4)}


def get_current_weather(location: str) -> dict:
    """Get the current weather of a city.

    Args:
        location: The city, e.g. 北京 or Tokyo.
    """
    temperature, condition = WEATHER.get(location, DEFAULT_WEATHER)
    return {"city": location, "temperature": temperature, "humidity": "65%", "condition": condition}


def get_current_time(timezone: str = DEFAULT_TIMEZONE) -> dict:
    """Get the current date and time in a time zone.

    Args:
        timezone: An IANA time zone name such as Asia/Shanghai (the default) or Europe/London.
    """
    return {"datetime": CLOCK.get(timezone, CLOCK[DEFAULT_TIMEZONE]), "timezone": timezone}


def get_exchange_rate(from_currency: str, to_currency: str) -> dict:
    """Get the exchange rate between two currencies.

    Args:
        from_currency: The currency code to convert from, e.g. USD.
        to_currency: The currency code to convert to, e.g. CNY.
    """
    return {"from": from_currency, "to": to_currency, "rate": RATES.get(from_currency, {}).get(to_currency, 1.0)}


def translate_text(text: str, target_language: str) -> dict:
    """Translate a text into another language.

    Args:
        text: The text to translate.
        target_language: The language to translate into: english or chinese.
    """
    return {"translated_text": TRANSLATIONS.get(target_language, {}).get(text, text)}


TOOLS = [calculate_math, unit_converter, get_current_weather, get_current_time, get_exchange_rate, translate_text]

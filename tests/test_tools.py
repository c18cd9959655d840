"""tools.py: loading a tools file, JSON schemas as chat templates get them, parsing <tool_call> blocks, and
the worker process that runs tools without letting one crash or hang the trainer."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast
from transformers.utils import get_json_schema

from tools import ToolRunner, count_unbalanced, load_tools, parse_tool_calls, tool_schemas
from trainer_utils import InputError

ROOT = Path(__file__).resolve().parents[1]

TOOLS_FILE = '''
import json
import os
import time
from math import sqrt  # imported: never a tool


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def echo(text: str) -> str:
    """Return the text unchanged.

    Args:
        text: Any text.
    """
    return text


def info(city: str) -> dict:
    """Facts about a city.

    Args:
        city: The city's name.
    """
    return {"city": city, "population": 2100000, "name_zh": "巴黎"}


def fail(message: str):
    """Raise an error.

    Args:
        message: The error's message.
    """
    raise ValueError(message)


def big(n: int) -> str:
    """A long text.

    Args:
        n: Its length.
    """
    return "x" * n


def spin():
    """Loop forever in pure Python."""
    while True:
        pass


def sleep():
    """Sleep far longer than any timeout."""
    time.sleep(100)


def die():
    """End the worker process abruptly."""
    os._exit(3)


def pid() -> int:
    """The worker's process id."""
    return os.getpid()


def heavy() -> list:
    """Heavy modules the worker has imported."""
    import sys
    return [m for m in ("torch", "transformers", "trainer_utils") if m in sys.modules]


def _helper():
    return 1
'''


def write(tmp_path, text, name="my_tools.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tools_file(tmp_path_factory):
    return write(tmp_path_factory.mktemp("tools"), TOOLS_FILE)


@pytest.fixture(scope="module")
def runner(tools_file):
    with ToolRunner(tools_file, timeout=5.0, max_chars=CUT) as r:
        yield r


CUT = 120  # the shared runner's max_chars


def error_of(text):
    return json.loads(text)["error"]


# ---------------------------------------------------------------- load_tools

def test_load_by_module_scan_keeps_definition_order_and_skips_imports_and_private(tools_file):
    names = [fn.__name__ for fn in load_tools(tools_file)]
    assert names == ["add", "echo", "info", "fail", "big", "spin", "sleep", "die", "pid", "heavy"]
    assert load_tools(tools_file)[0](2, 3) == 5


def test_load_by_tools_list(tmp_path):
    path = write(tmp_path, '''
        def b(x: int) -> int:
            """B.

            Args:
                x: A number.
            """
            return x

        def a():
            """A."""

        def not_listed():
            """Left out."""

        TOOLS = [a, b]
    ''')
    assert [fn.__name__ for fn in load_tools(path)] == ["a", "b"]


def test_each_load_is_a_fresh_module(tmp_path):
    path = write(tmp_path, 'STATE = []\ndef f():\n    """F."""\n    STATE.append(1)\n    return len(STATE)\n')
    first, second = load_tools(path)[0], load_tools(path)[0]
    assert first.__module__ != second.__module__
    assert (first(), first(), second()) == (1, 2, 1)


@pytest.mark.parametrize("text, words", [
    ("import json\n", "no tools found"),
    ("def _private():\n    pass\n", "no tools found"),
    ("TOOLS = []\n", "no tools found"),
    ("TOOLS = 'add'\n", "TOOLS must be a list"),
    ("TOOLS = [1]\n", "not a named function"),
    ("def f():\n    pass\ndef g():\n    pass\ng.__name__ = 'f'\n", "duplicate tool names: f"),
    ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
    ("def f(:\n", "SyntaxError"),
    ("import no_such_module_here\n", "No module named 'no_such_module_here'"),
])
def test_load_errors_name_the_file(tmp_path, text, words):
    path = write(tmp_path, text, "bad_tools.py")
    with pytest.raises(InputError) as e:
        load_tools(path)
    assert str(path) in str(e.value) and words in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no_such_tools.py: no such file"):
        load_tools(tmp_path / "no_such_tools.py")
    with pytest.raises(InputError, match="no such file"):
        ToolRunner(tmp_path / "no_such_tools.py")


# ---------------------------------------------------------------- tool_schemas

def test_schemas_are_transformers_own(tools_file):
    functions = load_tools(tools_file)
    assert tool_schemas(functions) == [get_json_schema(fn) for fn in functions]
    add = tool_schemas(functions)[0]["function"]
    assert add["name"] == "add" and add["parameters"]["required"] == ["a", "b"]
    assert add["parameters"]["properties"]["a"] == {"type": "integer", "description": "The first number."}


TEMPLATE = ("{% if tools %}<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n{% endif %}"
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}")


def test_chat_template_renders_schemas_as_it_renders_functions(tools_file):
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "model" / "tokenizer.json"), chat_template=TEMPLATE)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    functions = load_tools(tools_file)[:3]
    with_functions = tokenizer.apply_chat_template(messages, tools=functions, tokenize=False)
    with_schemas = tokenizer.apply_chat_template(messages, tools=tool_schemas(functions), tokenize=False)
    assert with_functions == with_schemas
    assert '"name": "add"' in with_schemas and with_schemas.endswith("<|user|>What is 2 + 3?\n")


@pytest.mark.parametrize("source, missing", [
    ("def f(x: int):\n    return x\n", "needs a docstring"),
    ('def f(x):\n    """F.\n\n    Args:\n        x: A number.\n    """\n', "needs a type hint for argument 'x'"),
    ('def f(x: int):\n    """F without Args."""\n', "needs a description of argument 'x'"),
])
def test_schema_errors_name_function_file_and_what_is_missing(tmp_path, source, missing):
    path = write(tmp_path, source, "schema_tools.py")
    with pytest.raises(InputError) as e:
        tool_schemas(load_tools(path))
    message = str(e.value)
    assert message.startswith(f"tool f in {path} {missing}")
    assert "Exception: " in message  # transformers' own message follows


def test_a_type_without_a_json_type_is_refused_where_transformers_refuses_it(tmp_path):
    """transformers 5's get_json_schema refuses a class as a type hint, 4.57's gives it an object schema: the
    trainer says what transformers says, naming the function and file, or uses transformers' schema."""
    from transformers.utils import get_json_schema
    path = write(tmp_path, 'class C:\n    pass\ndef f(x: C):\n    """F.\n\n    Args:\n        x: A C.\n    """\n',
                 "schema_tools.py")
    functions = load_tools(path)
    try:
        want = get_json_schema(functions[0])
    except Exception:
        with pytest.raises(InputError, match=f"tool f in {path} needs type hints that map"):
            tool_schemas(functions)
    else:
        assert tool_schemas(functions) == [want]


# ---------------------------------------------------------------- parse_tool_calls

def test_parse_good_calls_in_order():
    text = ('Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>{"name": "pid"}</tool_call>'
            '<tool_call>{"name": "echo", "arguments": "{\\"text\\": \\"hi\\"}"}</tool_call>')
    assert parse_tool_calls(text) == [{"name": "add", "arguments": {"a": 1, "b": 2}},
                                      {"name": "pid", "arguments": {}},
                                      {"name": "echo", "arguments": {"text": "hi"}}]
    assert parse_tool_calls("no calls here") == []


@pytest.mark.parametrize("inner, name, why", [
    ('{"name": "add", "arguments": {"a": 1}', None, "bad JSON"),
    ('[1, 2]', None, "not a JSON object"),
    ('{"arguments": {}}', None, "no name"),
    ('{"name": 7}', None, "invalid name"),
    ('{"name": "add", "arguments": [1, 2]}', "add", "arguments not a JSON object"),
    ('{"name": "add", "arguments": "{oops"}', "add", "bad JSON in arguments"),
    ('{"name": "add", "arguments": "[1]"}', "add", "arguments not a JSON object"),
])
def test_parse_bad_calls_say_why(inner, name, why):
    [call] = parse_tool_calls(f"<tool_call>\n{inner}\n</tool_call>")
    assert call["name"] == name and call["arguments"] == {} and call["error"].startswith(why)


def test_unclosed_tags_are_counted_not_parsed():
    text = '<tool_call>{"name": "add", "arguments": {}}</tool_call> and <tool_call>{"name": "pid"}'
    assert parse_tool_calls(text) == [{"name": "add", "arguments": {}}]
    assert count_unbalanced(text) == 1
    assert count_unbalanced("</tool_call></tool_call>") == 2
    assert count_unbalanced("<tool_call>x</tool_call>") == 0


# ---------------------------------------------------------------- ToolRunner

def test_runner_names_and_schemas(runner, tools_file):
    assert runner.names == [fn.__name__ for fn in load_tools(tools_file)]
    assert runner.schemas == [get_json_schema(fn) for fn in load_tools(tools_file)]


def test_runner_results(runner):
    assert runner.run({"name": "add", "arguments": {"a": 2, "b": 3}}) == "5"
    assert runner.run({"name": "echo", "arguments": {"text": "héllo"}}) == "héllo"
    assert json.loads(runner.run({"name": "info", "arguments": {"city": "Paris"}})) == {
        "city": "Paris", "population": 2100000, "name_zh": "巴黎"}
    assert "巴黎" in runner.run({"name": "info", "arguments": {"city": "Paris"}})  # ensure_ascii=False
    calls = parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 1}"}</tool_call>')
    assert [runner.run(c) for c in calls] == ["2"]


def test_runner_errors(runner):
    assert error_of(runner.run({"name": "fail", "arguments": {"message": "no luck"}})) == "ValueError: no luck"
    assert error_of(runner.run({"name": "add", "arguments": {"a": 1}})) == \
        "bad arguments for add: missing a required argument: 'b'"
    assert error_of(runner.run({"name": "add", "arguments": {"a": 1, "b": 2, "c": 3}})) == \
        "bad arguments for add: got an unexpected keyword argument 'c'"
    assert error_of(runner.run({"name": "nope", "arguments": {}})) == \
        "unknown tool 'nope'; available: add, echo, info, fail, big, spin, sleep, die, pid, heavy"
    [bad] = parse_tool_calls("<tool_call>{not json}</tool_call>")
    assert error_of(runner.run(bad)).startswith("invalid tool call: bad JSON")


def test_runner_cuts_output(runner):
    assert runner.run({"name": "big", "arguments": {"n": 5000}}) == "x" * CUT
    assert runner.run({"name": "big", "arguments": {"n": 7}}) == "x" * 7
    cut = runner.run({"name": "fail", "arguments": {"message": "m" * 500}})  # made in the worker
    room = CUT - len('{"error": ""}') - len("ValueError: ")
    assert len(cut) == CUT and error_of(cut) == "ValueError: " + "m" * room  # shortened, still JSON
    cut = runner.run({"name": "n\"" * 60, "arguments": {}, "error": "no name"})  # made here
    assert error_of(cut) == "invalid tool call: no name"
    cut = runner.run({"name": "n\"" * 60, "arguments": {}})  # escaped quotes count twice
    assert len(cut) <= CUT and error_of(cut).startswith("unknown tool 'n\"n\"")


def test_worker_imports_neither_torch_nor_transformers(runner):
    assert runner.run({"name": "heavy", "arguments": {}}) == "[]"


def test_worker_start_problems_are_errors(tmp_path):
    slow = write(tmp_path, 'import time\ntime.sleep(100)\ndef f():\n    """F."""\n', "slow_tools.py")
    with ToolRunner(slow, start_timeout=0.5) as runner:  # the tools file is not imported here
        assert error_of(runner.run({"name": "f", "arguments": {}})) == "tool worker did not start within 0.5s"
    broken = write(tmp_path, "def f(:\n", "broken_tools.py")
    with ToolRunner(broken) as runner:
        message = error_of(runner.run({"name": "f", "arguments": {}}))
        assert message.startswith(f"could not load tools: tools file {broken} failed to import: SyntaxError")


def test_invalid_call_does_not_start_the_worker(tools_file):
    runner = ToolRunner(tools_file)
    assert error_of(runner.run({"name": None, "arguments": {}, "error": "no name"})) == "invalid tool call: no name"
    assert runner._process is None


@pytest.mark.parametrize("tool", ["spin", "sleep"])
def test_timeout_kills_the_worker_and_the_next_call_restarts_it(tools_file, tool):
    with ToolRunner(tools_file, timeout=0.5) as runner:
        first = int(runner.run({"name": "pid", "arguments": {}}))
        start = time.monotonic()
        assert error_of(runner.run({"name": tool, "arguments": {}})) == f"{tool} timed out after 0.5s"
        assert time.monotonic() - start < 4
        assert runner._process is None and not pid_alive(first)
        assert runner.run({"name": "add", "arguments": {"a": 1, "b": 1}}) == "2"
        assert int(runner.run({"name": "pid", "arguments": {}})) != first


class Interrupted(BaseException):
    """What the trainer's stop-signal handler raises mid-rollout."""


def test_interrupted_call_does_not_leave_its_answer_for_the_next(tools_file):
    def interrupt(signum, frame):
        raise Interrupted()
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with ToolRunner(tools_file, timeout=5.0) as runner:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(Interrupted):
                runner.run({"name": "sleep", "arguments": {}})
            assert runner._process is None
            assert runner.run({"name": "add", "arguments": {"a": 1, "b": 1}}) == "2"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_worker_exit_in_a_tool_is_an_error_and_restarts(tools_file):
    with ToolRunner(tools_file) as runner:
        assert error_of(runner.run({"name": "die", "arguments": {}})) == \
            "tool worker died while running die (exit code 3)"
        assert runner.run({"name": "add", "arguments": {"a": 4, "b": 4}}) == "8"


def test_close_stops_the_worker_and_a_later_call_restarts_it(tools_file):
    runner = ToolRunner(tools_file)
    pid = int(runner.run({"name": "pid", "arguments": {}}))
    runner.close()
    assert runner._process is None and not pid_alive(pid)
    runner.close()  # twice is fine
    assert runner.run({"name": "add", "arguments": {"a": 1, "b": 2}}) == "3"
    runner.close()


def test_worker_exits_when_the_parent_is_killed(tools_file, tmp_path):
    """A worker busy in an endless tool notices its parent's death (SIGKILL: no atexit, no close). The parent
    is a script with no __main__ guard, which the worker must not re-run (spawn's default)."""
    script = write(tmp_path, f'''
        import sys
        print("main ran", flush=True)
        sys.path.insert(0, {str(ROOT)!r})
        from tools import ToolRunner
        runner = ToolRunner({str(tools_file)!r}, timeout=100)
        print(runner.run({{"name": "pid", "arguments": {{}}}}), flush=True)
        runner.run({{"name": "spin", "arguments": {{}}}})
    ''', "parent.py")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline() == "main ran\n"
        worker = int(parent.stdout.readline())
        time.sleep(0.2)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while pid_alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(worker)
        assert parent.stdout.read() == ""
    finally:
        parent.kill()
        parent.stdout.close()


def pid_alive(pid):
    """Whether a process runs (a zombie waiting for its reaper does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False

"""Tools for multi-turn tool-use RL: load a user's Python tools file, describe its functions as the JSON
schemas chat templates render, parse the `<tool_call>` blocks a model writes (Qwen / MiniMind-3 format),
and run the calls in a separate worker process so that no tool can crash or hang the trainer.

Only the standard library is imported at the top: the worker process imports this module too, and it
should start in a fraction of a second (no torch, no transformers)."""
import importlib.util
import inspect
import itertools
import json
import multiprocessing
import os
import re
import signal
import sys
import threading

_module_ids = itertools.count()


def _input_error(message):
    # Imported here, not at the top: trainer_utils imports torch, which the worker must not pay for.
    from trainer_utils import InputError
    return InputError(message)


# ---------------------------------------------------------------- loading and schemas

def load_tools(path):
    """The tool functions of the Python file at `path`: its `TOOLS` list when it defines one, else every
    public function defined in the file itself (imported ones excluded), in definition order. The file is
    imported under a fresh module name, so loading it twice, or two files with one name, never collide.
    Raises InputError (naming the file) for a missing file, an import error, no tools or duplicate names."""
    return _load_tools(path, _input_error)


def _load_tools(path, error):
    """load_tools with `error(message)` making its exceptions: the worker reports a load error as text and
    uses a plain one, since trainer_utils (for InputError) would import torch there."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise error(f"tools file {path}: no such file")
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    name = f"_ppo_tools_{next(_module_ids)}_{stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise error(f"tools file {path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickle and typing resolve names through sys.modules
    try:
        spec.loader.exec_module(module)
    except BaseException as e:  # SystemExit / KeyboardInterrupt from the file's top level count as errors too
        del sys.modules[name]
        if isinstance(e, KeyboardInterrupt):
            raise
        raise error(f"tools file {path} failed to import: {type(e).__name__}: {e}") from e

    if hasattr(module, "TOOLS"):
        tools = module.TOOLS
        if not isinstance(tools, (list, tuple)):
            raise error(f"tools file {path}: TOOLS must be a list of functions, not {type(tools).__name__}")
        for fn in tools:
            if not callable(fn) or not isinstance(getattr(fn, "__name__", None), str):
                raise error(f"tools file {path}: TOOLS holds {fn!r}, which is not a named function")
        tools = list(tools)
    else:
        tools, seen = [], set()
        for key, value in vars(module).items():
            if (not key.startswith("_") and inspect.isfunction(value) and value.__module__ == module.__name__
                    and id(value) not in seen):  # `alias = fn` lists fn once
                seen.add(id(value))
                tools.append(value)
    if not tools:
        raise error(f"tools file {path}: no tools found (define TOOLS = [...] or public functions)")
    names = [fn.__name__ for fn in tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise error(f"tools file {path}: duplicate tool names: {', '.join(duplicates)}")
    return tools


def _missing(fn, error):
    """What a function lacks for get_json_schema, in words, from the exception transformers raised."""
    message = str(error)
    if "has no docstring" in message:
        return "a docstring"
    found = re.search(r"no description for the argument '([^']+)'", message)
    if found:
        return f"a description of argument '{found.group(1)}' in the docstring's Args: section"
    found = re.search(r"Argument (\S+) is missing a type hint", message)
    if found:
        return f"a type hint for argument '{found.group(1)}'"
    if type(error).__name__ == "TypeHintParsingException":
        return "type hints that map to JSON types (str, int, float, bool, list, dict, Literal, Optional, ...)"
    return "a signature and docstring transformers can describe"


def _file_of(fn):
    code = getattr(fn, "__code__", None)
    if code is not None:
        return code.co_filename
    try:
        return inspect.getsourcefile(fn) or "?"
    except TypeError:  # a builtin
        return "?"


def tool_schemas(functions):
    """The JSON schema of each function, exactly as transformers' chat templates get it for `tools=[fn]`
    (transformers.utils.get_json_schema), so the prompts the trainer renders match inference. Raises
    InputError naming the function, its file and what it lacks (docstring, type hint, argument description)."""
    from transformers.utils import get_json_schema
    schemas = []
    for fn in functions:
        try:
            schemas.append(get_json_schema(fn))
        except Exception as e:
            where = _file_of(fn)
            raise _input_error(f"tool {getattr(fn, '__name__', fn)!s} in {where} needs {_missing(fn, e)} "
                               f"for its JSON schema ({type(e).__name__}: {e})") from e
    return schemas


# ---------------------------------------------------------------- parsing

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _parse_one(inner):
    try:
        call = json.loads(inner)
    except ValueError as e:
        return {"name": None, "arguments": {}, "error": f"bad JSON: {e}"}
    if not isinstance(call, dict):
        return {"name": None, "arguments": {}, "error": f"not a JSON object: {type(call).__name__}"}
    name = call.get("name")
    if not isinstance(name, str) or not name.strip():
        return {"name": None, "arguments": {}, "error": "no name" if name is None else "invalid name"}
    arguments = call.get("arguments", {})
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI's API does
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as e:
            return {"name": name, "arguments": {}, "error": f"bad JSON in arguments: {e}"}
    if not isinstance(arguments, dict):
        return {"name": name, "arguments": {}, "error": f"arguments not a JSON object: {type(arguments).__name__}"}
    return {"name": name, "arguments": arguments}


def parse_tool_calls(text):
    """Every `<tool_call>...</tool_call>` block of `text`, in order, as {"name", "arguments"}; a malformed
    block gives {"name": <name or None>, "arguments": {}, "error": "<why>"} instead of being dropped, so the
    model is told what went wrong (and the reward can count it)."""
    return [_parse_one(m.group(1).strip()) for m in TOOL_CALL_RE.finditer(text)]


def count_unbalanced(text):
    """How many `<tool_call>` / `</tool_call>` tags lack a partner (an unclosed call is not parsed)."""
    return abs(text.count("<tool_call>") - text.count("</tool_call>"))


# ---------------------------------------------------------------- running

def _error(message, max_chars):
    """{"error": message} as JSON of at most max_chars characters: a long message is shortened rather than the
    JSON cut, so the error still parses as one (as callers check)."""
    text = json.dumps({"error": message}, ensure_ascii=False)
    while len(text) > max_chars and message:
        message = message[:max(0, len(message) - (len(text) - max_chars))]
        text = json.dumps({"error": message}, ensure_ascii=False)
    return text[:max_chars]  # only when even an empty message does not fit


def _text_of(value):
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):  # not JSON-serialisable (a set, an object) or circular
        return str(value)


def _call_tool(tools, name, arguments, load_error, max_chars):
    """One call inside the worker, as the text the model gets back (at most max_chars); never raises."""
    if load_error is not None:
        return _error(load_error, max_chars)
    fn = tools.get(name)
    if fn is None:
        return _error(f"unknown tool '{name}'; available: {', '.join(tools)}", max_chars)
    try:
        inspect.signature(fn).bind(**arguments)
    except TypeError as e:
        return _error(f"bad arguments for {name}: {e}", max_chars)
    except ValueError:  # no signature to check (some builtins): let the call itself decide
        pass
    try:
        return _text_of(fn(**arguments))[:max_chars]
    except BaseException as e:  # SystemExit from sys.exit() in a tool is a tool error, not the worker's end
        try:
            text = str(e)
        except Exception:
            text = repr(e)
        return _error(f"{type(e).__name__}: {text}", max_chars)


_spawning = threading.local()
_hook_lock = threading.Lock()


def _skip_main_in_worker():
    """Start the worker without re-running the parent's main script. Spawn normally imports it in every child
    (for targets defined there): for train_ppo.py that is torch and transformers on each (re)start, and a
    script without an `if __name__ == "__main__":` guard would even fail to start its worker. The worker's
    target lives here, so it needs none of it. Done by dropping the main-module entries from the data spawn
    hands the child, for the worker started by this thread only; other spawns are left as they are."""
    from multiprocessing import spawn
    with _hook_lock:
        if getattr(spawn.get_preparation_data, "_tools_hook", False):
            return
        original = spawn.get_preparation_data

        def get_preparation_data(name):
            data = original(name)
            if getattr(_spawning, "worker", False):
                data.pop("init_main_from_path", None)
                data.pop("init_main_from_name", None)
            return data
        get_preparation_data._tools_hook = True
        spawn.get_preparation_data = get_preparation_data


def _watch_parent(parent_pid):
    """Ends the worker once its parent is gone, even while a tool loops forever (the pipe's EOF is only
    seen between calls)."""
    import time
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(1.0)


def _worker(path, conn, parent_pid, max_chars):
    """The worker process: load the tools, say ready, then answer (name, arguments) until None or EOF."""
    # Ctrl-C reaches the whole process group: the trainer decides what to do, and stops the worker itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    tools, load_error = {}, None
    try:
        tools = {fn.__name__: fn for fn in _load_tools(path, Exception)}
    except BaseException as e:
        load_error = f"could not load tools: {e}"
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            break
        if request is None:
            break
        name, arguments = request
        try:
            conn.send(_call_tool(tools, name, arguments, load_error, max_chars))
        except OSError:  # the parent is gone
            break
    conn.close()


class ToolRunner:
    """Runs parsed tool calls in one persistent worker process and returns the text for the `tool` message.

    The worker is started with multiprocessing's "spawn" context (a fresh interpreter: no forked torch or
    CUDA state), lazily on the first call. A call that outlives `timeout` seconds gets the worker killed
    (a pure-Python loop cannot be interrupted any other way); the next call starts a new one. `run` never
    raises: every failure comes back as a JSON {"error": ...} string. Results are cut to `max_chars`
    characters (an error's message is shortened instead, so that it stays valid JSON).
    `start_timeout` bounds the worker's start-up (interpreter start plus importing the tools file), which is
    not counted in `timeout`."""

    def __init__(self, path, timeout=5.0, max_chars=2048, start_timeout=60.0):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(self.path):
            raise _input_error(f"tools file {self.path}: no such file")
        self.timeout = float(timeout)
        self.max_chars = int(max_chars)
        self.start_timeout = float(start_timeout)
        self._context = multiprocessing.get_context("spawn")
        self._process = None
        self._conn = None
        self._functions = None
        self._schemas = None
        self._lock = threading.Lock()

    # -- what the prompts need, loaded in this process only when asked

    @property
    def functions(self):
        if self._functions is None:
            self._functions = load_tools(self.path)
        return self._functions

    @property
    def names(self):
        return [fn.__name__ for fn in self.functions]

    @property
    def schemas(self):
        if self._schemas is None:
            self._schemas = tool_schemas(self.functions)
        return self._schemas

    # -- the worker

    def _start(self):
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(target=_worker, args=(self.path, child_conn, os.getpid(), self.max_chars),
                                        name="tool-worker", daemon=True)
        _skip_main_in_worker()
        _spawning.worker = True
        try:
            process.start()
        except Exception as e:  # out of processes or memory: a tool error, not the trainer's end
            parent_conn.close()
            child_conn.close()
            return f"tool worker failed to start: {type(e).__name__}: {e}"
        finally:
            _spawning.worker = False
        child_conn.close()  # so that the worker's death reads as EOF here
        self._process, self._conn = process, parent_conn
        if not parent_conn.poll(self.start_timeout):
            self._stop()
            return f"tool worker did not start within {self.start_timeout:g}s"
        try:
            if parent_conn.recv() != "ready":
                raise EOFError
        except (EOFError, OSError):
            code = self._stop()
            return f"tool worker failed to start (exit code {code})"
        return None

    def _stop(self):
        """Kill the worker (terminate, then kill) and forget it; returns its exit code."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        if process.is_alive():
            process.terminate()
            process.join(2.0)
            if process.is_alive():  # a tool that ignores SIGTERM
                process.kill()
        process.join()
        code = process.exitcode
        process.close()
        return code

    def run(self, call):
        """The result text of one call from parse_tool_calls (never raises, never waits past the timeout)."""
        if not isinstance(call, dict):
            return _error(f"invalid tool call: not a dict: {type(call).__name__}", self.max_chars)
        if "error" in call:
            return _error(f"invalid tool call: {call['error']}", self.max_chars)
        name, arguments = call.get("name"), call.get("arguments") or {}
        if not isinstance(name, str) or not isinstance(arguments, dict):
            return _error("invalid tool call: name must be a string and arguments an object", self.max_chars)
        with self._lock:
            try:
                return self._run(name, arguments)[:self.max_chars]
            except Exception as e:  # anything unforeseen in the pipe: a fresh worker for the next call
                self._stop()
                return _error(f"tool runner failed on {name}: {type(e).__name__}: {e}", self.max_chars)
            except BaseException:  # interrupted mid-call (Ctrl-C, the trainer's stop signal): without this the
                self._stop()       # worker's late answer would be read as the next call's
                raise

    def _run(self, name, arguments):
        if self._process is None or not self._process.is_alive():
            self._stop()
            problem = self._start()
            if problem is not None:
                return _error(problem, self.max_chars)
        try:
            self._conn.send((name, arguments))
        except OSError:  # a broken pipe: the worker is gone
            code = self._stop()
            return _error(f"tool worker died before running {name} (exit code {code})", self.max_chars)
        except Exception as e:  # arguments that cannot be pickled (never so for parsed JSON); nothing was sent
            return _error(f"bad arguments for {name}: {type(e).__name__}: {e}", self.max_chars)
        if not self._conn.poll(self.timeout):
            self._stop()
            return _error(f"{name} timed out after {self.timeout:g}s", self.max_chars)
        try:
            return self._conn.recv()
        except (EOFError, OSError):  # the tool ended the process (os._exit, a crash, the OOM killer)
            code = self._stop()
            return _error(f"tool worker died while running {name} (exit code {code})", self.max_chars)

    def close(self):
        """Stop the worker: ask it to exit, then kill it if it does not within a second."""
        with self._lock:
            if self._process is not None and self._process.is_alive():
                try:
                    self._conn.send(None)
                    self._process.join(1.0)
                except (OSError, ValueError):
                    pass
            self._stop()

    def __del__(self):
        try:
            self._stop()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------- flags

def add_tool_flags(parser):
    """The tool-use flags, shared by train_ppo.py and scripts/eval_policy.py (same names, same meaning)."""
    group = parser.add_argument_group("tool use (multi-turn rollouts, docs/tools.md)")
    group.add_argument("--tools", default=None, metavar="FILE.py",
                       help="Python functions the policy may call (the file's TOOLS list, else its public "
                            "functions; schemas from their signatures and docstrings). Each response is then up "
                            "to --max_turns turns: the policy's <tool_call>{json}</tool_call>s run between "
                            "them and their results come back as tool messages, read but never trained on. "
                            "Rows may declare their own tools (a 'tools' column, or MiniMind's system message "
                            "field); default: none (one turn)")
    group.add_argument("--max_turns", type=int, default=None,
                       help="with --tools: the policy's turns per response, each up to --max_gen_len tokens "
                            "(default 3, as minimind-3's agent RL)")
    group.add_argument("--tool_timeout", type=float, default=5.0,
                       help="seconds a tool call may run; then it is stopped and the policy reads an error")
    group.add_argument("--tool_max_chars", type=int, default=2048,
                       help="a tool's result is cut to this many characters (minimind-3's 2048)")
    return group


def check_tool_flags(args, error):
    """Resolve --max_turns (3 with --tools) and refuse what cannot be meant; `error(message)` stops (argparse's)."""
    if args.max_turns is not None and not args.tools:
        error(f"--max_turns {args.max_turns} needs --tools FILE.py: without tools a response is one turn")
    if args.tools:
        args.max_turns = 3 if args.max_turns is None else args.max_turns
        if args.max_turns < 1 or not args.tool_timeout > 0 or args.tool_max_chars < 1:
            error("--max_turns and --tool_max_chars must be >= 1 and --tool_timeout > 0")

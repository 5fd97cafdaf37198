"""The python tool: argument validation, observations, error kinds and images, over a shared pool."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from axpo_nemo.agent.sandbox import SandboxConfig, SandboxPool, SandboxResult
from axpo_nemo.agent.tools.base import Tool, ToolContext, ToolResult
from axpo_nemo.agent.tools.python_tool import ERROR_KINDS, PythonTool

pytestmark = pytest.mark.timeout(120)

CONFIG = SandboxConfig(
    pool_size=2,
    timeout_s=1.5,
    cpu_time_s=1,
    memory_mb=256,
    output_kill_bytes=1 << 20,
    max_code_chars=1000,
    max_images=3,
)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(CONFIG) as p:
        yield p


@pytest.fixture(scope="module")
def tool(pool):
    return PythonTool(pool=pool)


def call(
    tool: PythonTool, code: str, images: list[Image.Image] | None = None, timeout_s: float = 30.0
) -> ToolResult:
    return tool({"code": code}, ToolContext(images=images or [], question_id="q", timeout_s=timeout_s))


def test_implements_the_tool_protocol(tool):
    assert isinstance(tool, Tool) and tool.name == "python"
    schema = tool.schema()
    assert schema["type"] == "function"
    fn = schema["function"]
    assert fn["name"] == "python"
    assert fn["parameters"]["required"] == ["code"]
    assert fn["parameters"]["properties"]["code"]["type"] == "string"
    for word in ("`image`", "`images`", "image_1", "show(", "plt.show()", "1.5 s", "no network"):
        assert word in fn["description"]
    json.dumps(schema)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "missing required argument 'code'"),
        (None, "not NoneType"),
        ([], "not list"),
        ("not json", "JSON object"),
        ({"code": 1}, "must be a string, not int"),
        ({"code": None}, "must be a string, not NoneType"),
        ({"code": ""}, "is empty"),
        ({"code": "  \n\t"}, "is empty"),
        ({"code": "x" * 1001}, "the limit is 1,000"),
        ({"code": "print(1)", "language": "python"}, "unexpected argument(s) language; the python tool takes only 'code'"),
    ],
)
def test_bad_arguments_are_explained(tool, arguments, message):
    result = tool(arguments, ToolContext())
    assert result.error == "bad_arguments" and not result.ok
    assert result.text.startswith("Error: ") and message in result.text


def test_json_string_arguments_are_accepted(tool):
    result = tool('{"code": "print(6 * 7)"}', ToolContext())
    assert result.ok and result.text == "42"


def test_success_shows_stdout_and_stderr(tool):
    result = call(tool, "import sys\nprint('out')\nprint('warn', file=sys.stderr)")
    assert result.ok and result.error is None
    assert result.text == "out\n[stderr]\nwarn"
    assert result.metadata["exit_code"] == 0 and result.metadata["failure"] is None


def test_no_output_says_so(tool):
    result = call(tool, "x = 1")
    assert result.ok and "no output" in result.text


def test_context_images_are_preloaded_and_results_returned(tool):
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    result = call(tool, "print(image.size)\nshow(image.crop((0, 0, 10, 10)).convert('L'))", images=[img])
    assert result.ok, result.text
    assert result.text == "(40, 30)\n[1 image(s) returned]"
    assert len(result.images) == 1 and result.images[0].size == (10, 10)


def test_dropped_images_are_mentioned(tool):
    result = call(tool, "for i in range(5): show(Image.new('L', (4, 4)))")
    assert result.ok and len(result.images) == 3
    assert "2 image(s) not returned" in result.text


@pytest.mark.parametrize(
    ("code", "kind", "phrase"),
    [
        ("import time; time.sleep(100)", "timeout", "did not finish within 1.5 s"),
        ("while True: pass", "timeout", "was stopped"),
        ("x = bytearray(10**10)", "memory", "ran out of memory"),
        ("while True: print('y' * 1000)", "output_limit", "printed more than"),
        ("1 / 0", "exception", "raised ZeroDivisionError"),
        ("def (:", "exception", "raised SyntaxError"),
        ("import os; os._exit(4)", "crashed", "exited with status 4"),
        ("import sys; sys.exit(1)", "crashed", "exited with status 1"),
        ("import os; os.kill(os.getpid(), 9)", "crashed", "killed (SIGKILL)"),
        ("import ctypes; ctypes.string_at(0)", "crashed", "crashed (SIGSEGV)"),
        ("open('/tmp/axpo-tool-evil.txt', 'w')", "exception", "raised PermissionError"),
        ("import socket; socket.create_connection(('1.1.1.1', 80))", "exception", "raised PermissionError"),
    ],
)
def test_failures_become_error_observations(tool, code, kind, phrase):
    result = call(tool, code)
    assert result.error == kind, result.text
    assert result.text.startswith("Error: ") and phrase in result.text


def test_exception_text_has_the_traceback(tool):
    result = call(tool, "def f():\n    raise ValueError('bad value')\nprint('before')\nf()")
    assert result.error == "exception"
    assert (
        "before" in result.text and "ValueError: bad value" in result.text and "line 2, in f" in result.text
    )


def test_a_huge_exception_name_is_not_echoed(tool):
    result = call(tool, "raise type('E' * 2_000_000, (Exception,), {})('x')")
    assert result.error == "exception" and result.text.startswith("Error: the code raised an exception")
    assert len(result.text) < 2 * CONFIG.max_output_bytes + 500


def test_context_timeout_is_respected(tool):
    result = call(tool, "import time; time.sleep(100)", timeout_s=0.3)
    assert result.error == "timeout" and "within 0.3 s" in result.text


def test_every_sandbox_failure_has_an_error_kind(tool):
    for failure in ERROR_KINDS:
        result = tool.observation(SandboxResult(failure=failure, notes=["why"]), 1.0)
        assert result.error == ERROR_KINDS[failure] and result.text.startswith("Error: ")


def test_a_closed_pool_gives_a_sandbox_error_not_an_exception():
    pool = SandboxPool(SandboxConfig(pool_size=1), start=False)
    pool.close()
    result = PythonTool(pool=pool)({"code": "print(1)"}, ToolContext())
    assert result.error == "sandbox_error" and result.text.startswith("Error: ")


def test_tool_owned_pool_is_created_lazily_and_closed():
    tool = PythonTool(config=SandboxConfig(pool_size=1, timeout_s=5))
    assert tool._pool is None  # nothing started until the first call
    with tool:
        assert tool({"code": "print('lazy')"}, ToolContext()).text == "lazy"
        pool = tool.pool
    assert tool._pool is None and pool.workdir is None


def test_pool_and_config_are_exclusive(pool):
    with pytest.raises(ValueError):
        PythonTool(pool=pool, config=SandboxConfig())

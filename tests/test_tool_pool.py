"""The Ray tool pool runs the real tools (zoom, python in its sandbox) on a real local Ray cluster.

Results must be identical to the local tools, through the agent loop too; a hung call times out,
its actor is replaced and the pool keeps working.
"""

from __future__ import annotations

import sys
import time

import pytest
from image_helpers import random_image as _image

ray = pytest.importorskip("ray")

from axpo_nemo.agent.loop import AgentLoopConfig, Continuation, per_state_params, run_rollouts  # noqa: E402
from axpo_nemo.agent.protocol import IM_END, ChatProtocol, format_assistant_turn  # noqa: E402
from axpo_nemo.agent.sandbox import SandboxConfig  # noqa: E402
from axpo_nemo.agent.tools.base import ToolContext, ToolResult  # noqa: E402
from axpo_nemo.agent.tools.registry import ToolsConfig, build_tools  # noqa: E402
from axpo_nemo.agent.trajectory import TrajectoryState  # noqa: E402
from axpo_nemo.models import build_tiny_processor, build_tiny_tokenizer  # noqa: E402
from axpo_nemo.nemo.tool_pool import RayToolPool  # noqa: E402

pytestmark = pytest.mark.timeout(240)

TOOLS_CFG = ToolsConfig(
    enabled=["image_zoom_in", "python"],
    timeout_s=20.0,
    python=SandboxConfig(pool_size=1, timeout_s=1.5, cpu_time_s=1, memory_mb=256, max_images=2),
)


class Hang:
    """A tool that never returns in time."""

    name = "hang"

    def schema(self):
        return {"type": "function", "function": {"name": self.name, "parameters": {"type": "object"}}}

    def __call__(self, arguments, context):
        time.sleep(60)
        return ToolResult(text="late")


def hanging_tools(cfg):
    return {"hang": Hang(), **build_tools(cfg)}


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False
        )  # never join another cluster
    # The test module's factory and tool must reach the actors without the tests being a package.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def pool(cluster):
    with RayToolPool(TOOLS_CFG, workers=2, num_cpus=0.5) as p:
        yield p


@pytest.fixture(scope="module")
def local():
    with build_tools(TOOLS_CFG) as tools:
        yield tools


CALLS = [
    ("image_zoom_in", {"bbox_2d": [100, 100, 600, 700]}),
    ("image_zoom_in", {"bbox_2d": "not a box"}),
    ("python", {"code": "print(image.size, sum(range(10)))"}),
    ("python", {"code": "show(image.rotate(90, expand=True)); print('rotated')"}),
    ("python", {"code": "import time\ntime.sleep(30)"}),  # the sandbox's own 1.5 s limit
    ("python", {"code": "raise ValueError('bad')"}),
]


def _summary(result: ToolResult):
    return result.text, result.error, [(i.size, i.tobytes()) for i in result.images]


def test_pool_results_equal_the_local_tools(pool, local):
    assert set(pool) == set(local) and pool.schemas() == local.schemas()
    context = ToolContext(images=[_image(200, 150)], question_id="q", timeout_s=TOOLS_CFG.timeout_s)
    for name, arguments in CALLS:
        remote, here = pool[name](arguments, context), local[name](arguments, context)
        assert _summary(remote) == _summary(here), (name, arguments)
    errors = [pool[name](args, context).error for name, args in CALLS]
    assert errors == [None, "bad_arguments", None, None, "timeout", "exception"]


class Scripted:
    """Replays ``state.metadata["script"][turn]`` (a minimal scripted generator)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, states, params):
        out = []
        for s, p in zip(states, per_state_params(states, params), strict=True):
            ids = self.tokenizer(s.metadata["script"][s.num_turns], add_special_tokens=False)["input_ids"]
            stops = {self.tokenizer.convert_tokens_to_ids(t): t for t in p.stop_token_texts}
            cut = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
            stop = stops.get(ids[cut - 1])
            out.append(Continuation(ids[:cut], [-0.5] * cut, "stop" if stop else "length", stop))
        return out


def test_agent_loop_gives_identical_trajectories_with_the_pool(pool, local):
    proto = ChatProtocol(build_tiny_processor(build_tiny_tokenizer()))
    prompt = proto.build_prompt("How big is it?", [_image(120, 90, seed=1)], list(local.values()))
    scripts = [
        [
            format_assistant_turn("Zoom.", tool_calls=[("image_zoom_in", {"bbox_2d": [0, 0, 500, 500]})]),
            format_assistant_turn("Measure.", tool_calls=[("python", {"code": "print(image.width * 2)"})]),
            format_assistant_turn("Done.", answer="240") + IM_END,
        ],
        [format_assistant_turn("Run.", tool_calls=[("python", {"code": "while True: pass"})]),
         format_assistant_turn("Gave up.", answer="0") + IM_END],
    ]  # fmt: skip
    cfg = AgentLoopConfig(max_new_tokens=128, max_total_tokens=4096, tool_timeout_s=20.0)

    def run(tools):
        states = [
            TrajectoryState.from_prompt(prompt, seed=i, index=i, metadata={"script": s})
            for i, s in enumerate(scripts)
        ]
        run_rollouts(states, Scripted(proto.tokenizer), tools, cfg, protocol=proto)
        return states

    remote, here = run(pool), run(local)
    for a, b in zip(remote, here, strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert [(r.name, r.error, r.response_text, r.num_images) for r in a.tool_calls] == [
            (r.name, r.error, r.response_text, r.num_images) for r in b.tool_calls
        ]
        assert [s.image.fingerprint for s in a.images] == [s.image.fingerprint for s in b.images]
    assert [r.error for r in remote[1].tool_calls] == ["timeout"]  # the sandbox's CPU limit


@pytest.mark.slow
def test_a_hung_call_times_out_and_its_actor_is_replaced(cluster):
    with RayToolPool(TOOLS_CFG, workers=1, timeout_s=2.0, num_cpus=0.5, factory=hanging_tools) as pool:
        context = ToolContext(images=[_image(64, 64)], timeout_s=2.0)
        result = pool["hang"]({}, context)
        assert result.error == "timeout" and "did not finish within 2 s" in result.text
        assert pool.replaced == 1 and pool.size == 1
        # The call waits for the replacement to start (not charged to its timeout), then runs on it.
        ok = pool["python"]({"code": "print(6 * 7)"}, context)
        assert ok.error is None and ok.text.strip().endswith("42")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        RayToolPool(TOOLS_CFG, workers=0)

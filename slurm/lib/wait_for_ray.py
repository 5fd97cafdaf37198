"""Wait until every node of a SLURM job has joined the Ray cluster with its GPUs.

Run by slurm/launch.sh on the head node after it started Ray on every node::

    python slurm/lib/wait_for_ray.py --address 10.0.0.1:6379 --nodes n1,n2 --gpus-per-node 8 --timeout 900

Each node registers under its SLURM node name (``ray start --node-name``). Exit 0 when every
node is alive with at least ``--gpus-per-node`` GPUs; exit 1 after ``--timeout`` seconds with one
line naming each missing node and why (not registered, or too few GPUs).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def missing_nodes(
    expected: Sequence[str], ray_nodes: Iterable[Mapping[str, Any]], gpus_per_node: int
) -> dict[str, str]:
    """The expected nodes that are not ready, each with the reason: ``{name: reason}``.

    ``ray_nodes`` is what ``ray.nodes()`` returns: dicts with ``Alive``, ``NodeName``,
    ``NodeManagerHostname`` and ``Resources``. A node is matched by its Ray node name, else by
    its short host name; it is ready when alive with at least ``gpus_per_node`` GPUs.
    """
    gpus: dict[str, float] = {}
    for node in ray_nodes:
        if not node.get("Alive", False):
            continue
        count = float(node.get("Resources", {}).get("GPU", 0.0))
        for name in (node.get("NodeName"), str(node.get("NodeManagerHostname", "")).split(".")[0]):
            if name:
                gpus[name] = max(count, gpus.get(name, 0.0))
    out = {}
    for name in expected:
        if name not in gpus:
            out[name] = "not registered"
        elif gpus[name] < gpus_per_node:
            out[name] = f"{gpus[name]:g}/{gpus_per_node} GPUs"
    return out


def describe(missing: Mapping[str, str]) -> str:
    """``'node3 (not registered), node4 (2/8 GPUs)'``."""
    return ", ".join(f"{name} ({why})" for name, why in missing.items())


def _connect(address: str, deadline: float):
    import ray

    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            return ray
        except (ConnectionError, RuntimeError) as exc:  # the head's GCS is not listening yet
            last = exc
            time.sleep(5)
    raise TimeoutError(f"could not connect to the Ray head at {address}: {last}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="the Ray head, HOST:PORT")
    parser.add_argument("--nodes", required=True, help="comma-separated SLURM node names")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs each node must register")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before giving up")
    parser.add_argument("--poll", type=float, default=5, help="seconds between checks")
    args = parser.parse_args(argv)
    expected = [n for n in args.nodes.split(",") if n]
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    try:
        ray = _connect(args.address, deadline)
    except TimeoutError as exc:
        print(f"[wait-for-ray] error: {exc}; missing nodes: {', '.join(expected)}", file=sys.stderr)
        return 1
    missing = missing_nodes(expected, ray.nodes(), args.gpus_per_node)
    last_report = 0.0
    while missing and time.monotonic() < deadline:
        if time.monotonic() - last_report > 30:
            ready = len(expected) - len(missing)
            print(
                f"[wait-for-ray] {ready}/{len(expected)} nodes ready; waiting for {describe(missing)}",
                flush=True,
            )
            last_report = time.monotonic()
        time.sleep(args.poll)
        missing = missing_nodes(expected, ray.nodes(), args.gpus_per_node)
    ray.shutdown()
    if missing:
        print(
            f"[wait-for-ray] error: after {args.timeout:g} s, {len(missing)} of {len(expected)} nodes are not "
            f"ready: {describe(missing)}. Check their logs (ray-<node>.log); too few GPUs usually means "
            "the job did not ask for them (sbatch --gres=gpu:N or --gpus-per-node=N) or GPUS_PER_NODE is wrong.",
            file=sys.stderr,
        )
        return 1
    print(f"[wait-for-ray] all {len(expected)} nodes ready after {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A stand-in trainer for the launcher's Ray test: joins the job's Ray cluster and runs one task.

slurm/launch.sh starts it as it would start the NeMo-RL trainer (RAY_ADDRESS set, the config
overrides as arguments). It prints the Ray nodes by name and the task's result, and exits 0.
"""

import os
import sys

import ray


@ray.remote
def _double(x: int) -> int:
    return 2 * x


if __name__ == "__main__":
    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING")
    names = sorted(n.get("NodeName", "?") for n in ray.nodes() if n.get("Alive"))
    print(f"ray nodes: {','.join(names)}")
    print(f"arguments: {' '.join(sys.argv[1:])}")
    print(f"task result: {ray.get(_double.remote(21))}")
    ray.shutdown()

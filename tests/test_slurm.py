"""The SLURM launcher (slurm/launch.sh and its wrappers) under a real SLURM, plus cheap static checks.

Tests marked ``slurm`` submit ``slurm/cpu_demo.sh`` (the launcher with the local backend, no Ray,
no GPU) with a tiny config to the SLURM cluster on PATH; CI starts a one-node cluster on localhost
with ``tests/slurm/start_cluster.sh``. They skip when ``sbatch`` is missing or no cluster answers.

* A whole job (data → SFT → RL → eval) ends COMPLETED with its metrics, checkpoints, eval report
  and log folder (resolved config, driver log, job record) where the launcher promises them.
* The pre-timeout signal (``scancel --signal=USR1 --batch``, what ``#SBATCH --signal=B:USR1@N``
  sends) reaches the trainer through the launcher, which checkpoints and exits 75; the job requeues
  itself, the next attempt resumes from exactly that checkpoint in the same run folder, and the job
  ends COMPLETED with every RL step logged once.
* With Ray installed: the launcher's Ray path (``AXPO_RAY=1``, ``GPUS_PER_NODE=0``: a CPU Ray
  cluster) starts the head, waits for the node, runs a stand-in trainer that joins the cluster
  (tests/slurm/ray_driver.py) and keeps each node's Ray logs; asking for a GPU the node does not
  have fails after the timeout with the node named.

Jobs run with one intra-op thread (see tests/test_pipeline.py on small shared CPUs).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from script_loader import load_script

from axpo_nemo.run.checkpoint import CheckpointManager
from axpo_nemo.run.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "slurm"
CPU_JOB = SLURM_DIR / "cpu_demo.sh"
SIZES = ("2b", "4b", "8b", "32b")
WRAPPERS = [f"{kind}_{size}.sh" for kind in ("axpo", "grpo", "sft") for size in SIZES] + [
    "eval.sh",
    "cpu_demo.sh",
]
SCRIPTS = sorted(
    [*SLURM_DIR.glob("*.sh"), *SLURM_DIR.glob("lib/*.sh"), *(ROOT / "tests" / "slurm").glob("*.sh"),
     *(ROOT / "containers").glob("*.sh"), ROOT / ".ci" / "run"]
)  # fmt: skip

#: A few seconds of real training on two CPU cores: 2 SFT steps, then RL on 2 questions x 2 rollouts.
TINY = (
    "model.tiny.num_layers=2",  # the 2 x 128 model and no SFT warm-ups: the job, not learning, is tested
    "model.tiny.hidden_size=128",
    "model.tiny.head_dim=32",
    "model.tiny.intermediate_size=256",
    "sft.copy_warmup_steps=0",
    "sft.short_context_epochs=0",
    "data.synth.num_sft=16",
    "data.synth.num_rl=8",
    "data.synth.num_eval=2",
    "sft.epochs=1",
    "sft.batch_size=8",
    "sft.micro_batch_size=8",
    "rollout.questions_per_step=2",
    "rollout.group_size=2",
    "rollout.max_new_tokens=16",
    "tools.enabled=[image_zoom_in]",
    "eval.samples_per_question=2",
    "eval.ks=[1,2]",
    "logging.console_every=1",
)
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


# ------------------------------------------------------------------------------ static checks


@pytest.mark.parametrize("name", WRAPPERS)
def test_wrappers_request_the_signal_and_requeue_and_hard_code_no_site(name):
    text = (SLURM_DIR / name).read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    assert "--requeue" in directives and "--open-mode=append" in directives
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives), directives
    # Partition, account and GPUs are the site's: sbatch flags or SBATCH_* variables, never edits.
    assert not [
        d for d in directives if d.startswith(("--partition", "-p", "--account", "-A", "--gres", "--gpus"))
    ]
    assert 'exec bash "$AXPO_REPO/slurm/launch.sh" "$@"' in text
    config = re.search(r"AXPO_CONFIG=\$\{AXPO_CONFIG:-([^}]+)\}", text).group(1)
    assert (ROOT / "conf" / f"{config}.yaml").is_file(), f"{name}: conf/{config}.yaml does not exist"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_passes_on_every_script():
    proc = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_launcher_outside_slurm_says_to_use_sbatch(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / "launch.sh")], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 2 and "through sbatch" in proc.stderr


def test_ray_wait_names_each_missing_node_and_why():
    wait = load_script(SLURM_DIR / "lib" / "wait_for_ray.py", "slurm_wait_for_ray")
    nodes = [
        {
            "Alive": True,
            "NodeName": "gpu01",
            "NodeManagerHostname": "gpu01.cluster",
            "Resources": {"GPU": 8.0},
        },
        {
            "Alive": True,
            "NodeName": "gpu02",
            "NodeManagerHostname": "gpu02",
            "Resources": {"GPU": 2.0, "CPU": 96},
        },
        {"Alive": False, "NodeName": "gpu03", "NodeManagerHostname": "gpu03", "Resources": {"GPU": 8.0}},
        {"Alive": True, "NodeManagerHostname": "gpu05.cluster", "Resources": {"GPU": 8.0}},  # no node name
    ]
    expected = ["gpu01", "gpu02", "gpu03", "gpu04", "gpu05"]
    missing = wait.missing_nodes(expected, nodes, gpus_per_node=8)
    assert missing == {"gpu02": "2/8 GPUs", "gpu03": "not registered", "gpu04": "not registered"}
    assert wait.describe(missing) == "gpu02 (2/8 GPUs), gpu03 (not registered), gpu04 (not registered)"
    assert wait.missing_nodes(expected[:1], nodes, gpus_per_node=8) == {}
    # A CPU-only Ray cluster (GPUS_PER_NODE=0) only needs every node registered.
    assert wait.missing_nodes(["gpu02", "gpu05"], nodes, gpus_per_node=0) == {}


# ------------------------------------------------------------------------------ on a real SLURM


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (subprocess.TimeoutExpired, OSError) as exc:
        return f"sinfo failed: {exc}"
    if proc.returncode != 0:
        return f"no SLURM cluster answers: {proc.stderr.strip()}"
    if not re.search(r"^(idle|mixed|allocated|completing)", proc.stdout, flags=re.M):
        return f"no usable SLURM node (states: {' '.join(proc.stdout.split()) or 'none'})"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"{problem} (CI starts one with tests/slurm/start_cluster.sh)")


def _submit(tmp_path: Path, *overrides: str, **env_vars: str) -> str:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "AXPO_PYTHON": sys.executable,
        **env_vars,
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv's `ray` command
    proc = subprocess.run(
        ["sbatch", "--parsable", "--time=15", f"--output={tmp_path}/slurm-%j.out", str(CPU_JOB), *TINY, *overrides],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job(job_id: str) -> dict[str, str]:
    proc = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, f"scontrol show job {job_id}: {proc.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def _wait(job_id: str, timeout: float = 400) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _job(job_id)
        if info["JobState"] in TERMINAL:
            return info
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s")


def _diagnostics(tmp_path: Path) -> str:
    parts = []
    for path in sorted([*tmp_path.glob("slurm-*.out"), *tmp_path.glob("logs/*/attempt-*/*")]):
        if path.is_file():
            parts.append(f"--- {path.relative_to(tmp_path)}\n{path.read_text()[-3000:]}")
    return "\n".join(parts)


@pytest.fixture
def jobs(slurm_cluster):
    """Job ids a test submitted; any still queued or running at its end is cancelled."""
    submitted: list[str] = []
    yield submitted
    for job_id in submitted:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


@pytest.mark.slurm
def test_cpu_job_completes_with_metrics_checkpoints_and_log_folder(tmp_path, jobs):
    t0 = time.monotonic()
    job = _submit(tmp_path, "train.stages=[data,sft,rl,eval]", "rl.steps=2", "checkpoint.every=1")
    jobs.append(job)
    info = _wait(job)
    print(f"job {job}: {info['JobState']} in {time.monotonic() - t0:.0f} s")
    assert info["JobState"] == "COMPLETED", _diagnostics(tmp_path)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"

    run = tmp_path / "runs" / f"cpu_demo-{job}"
    assert [r["step"] for r in read_metrics(run, "sft")] == [1, 2]
    assert [r["step"] for r in read_metrics(run, "rl")] == [1, 2]
    (evaluation,) = read_metrics(run, "eval")
    assert 0.0 <= evaluation["pass@1"] <= evaluation["pass@2"] <= 1.0
    assert [s for s, _ in CheckpointManager(run / "rl" / "checkpoints").checkpoints()][-1] == 2
    assert CheckpointManager(run / "rl" / "checkpoints").load_latest()[0] == 2
    assert (run / "sft" / "final.pt").is_file() and (run / "eval" / "report.json").is_file()

    logs = tmp_path / "logs" / f"cpu_demo-{job}"
    resolved = yaml.safe_load((logs / "resolved.yaml").read_text())
    assert resolved["output_dir"] == str(run) and resolved["backend"] == "local"
    assert resolved["rl"]["steps"] == 2 and resolved["rollout"]["group_size"] == 2
    driver = (logs / "attempt-0" / "driver.log").read_text()
    assert f"run folder: {run}" in driver and "[rl] step 2/2" in driver
    record = (logs / "job.txt").read_text()
    assert "attempt 0 started" in record and "trainer exit 0" in record and "rl.steps=2" in record
    assert not (logs / "attempt-1").exists()

    # tools/collect.py reads the finished run as it lies on disk.
    out = tmp_path / "results.csv"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "collect.py"), str(tmp_path / "runs"), "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"| {run} |" in proc.stdout and "eval/pass@2" in out.read_text().splitlines()[0]


@pytest.mark.slurm
def test_pre_timeout_signal_checkpoints_requeues_and_resumes(tmp_path, jobs):
    t0 = time.monotonic()
    # checkpoint.every=0: only the signal (and the end of the stage) writes an RL checkpoint.
    job = _submit(tmp_path, "train.stages=[data,sft,rl]", "rl.steps=6", "checkpoint.every=0")
    jobs.append(job)
    run = tmp_path / "runs" / f"cpu_demo-{job}"
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and read_metrics(run, "rl")):
        state = _job(job)["JobState"]
        assert state not in TERMINAL, f"job {job} ended ({state}) before RL began\n{_diagnostics(tmp_path)}"
        assert time.monotonic() < deadline, f"no RL step after 300 s\n{_diagnostics(tmp_path)}"
        time.sleep(0.2)
    # What `#SBATCH --signal=B:USR1@N` sends before the time limit: SIGUSR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    info = _wait(job)
    print(
        f"job {job}: {info['JobState']} after {info['Restarts']} restart(s) in {time.monotonic() - t0:.0f} s"
    )
    assert info["JobState"] == "COMPLETED", _diagnostics(tmp_path)
    assert info["Restarts"] == "1", _diagnostics(tmp_path)

    logs = tmp_path / "logs" / f"cpu_demo-{job}"
    record = (logs / "job.txt").read_text()
    assert "attempt 0 ended" in record and "trainer exit 75 after SIGUSR1" in record
    assert "attempt 0: requeued" in record and "attempt 1 ended" in record and "trainer exit 0" in record
    assert "got SIGUSR1" in (tmp_path / f"slurm-{job}.out").read_text()

    train_log = (run / "train.log").read_text()
    stopped = re.search(r"rl: stopping on SIGUSR1 after step (\d+) \(checkpoint written\)", train_log)
    assert stopped, train_log
    step = int(stopped.group(1))
    assert 1 <= step < 6
    # The second attempt resumed from exactly that checkpoint, in the same run folder.
    assert f"rl: resumed from step {step}" in train_log
    assert f"run folder: {run}" in (logs / "attempt-1" / "driver.log").read_text()
    assert "stopped by a signal after checkpointing" in (logs / "attempt-0" / "driver.log").read_text()
    assert [r["step"] for r in read_metrics(run, "rl")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_metrics(run, "sft")] == [1, 2]  # SFT ran once: the resume skipped it
    assert CheckpointManager(run / "rl" / "checkpoints").load_latest()[0] == 6
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]  # one folder for both attempts


def _ray_problem() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed"
    if shutil.which("ray", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}") is None:
        return "the ray command is not on PATH"
    return None


RAY_DRIVER = ROOT / "tests" / "slurm" / "ray_driver.py"


@pytest.mark.slurm
def test_ray_cluster_starts_and_the_trainer_joins_it(tmp_path, jobs):
    if problem := _ray_problem():
        pytest.skip(problem)
    job = _submit(
        tmp_path, "rl.steps=1", AXPO_RAY="1", GPUS_PER_NODE="0", AXPO_RAY_TIMEOUT="120",
        AXPO_ENTRY=f"{sys.executable} {RAY_DRIVER}",
    )  # fmt: skip
    jobs.append(job)
    info = _wait(job, timeout=300)
    assert info["JobState"] == "COMPLETED", _diagnostics(tmp_path)
    node = info["NodeList"]
    attempt = tmp_path / "logs" / f"cpu_demo-{job}" / "attempt-0"
    driver = (attempt / "driver.log").read_text()
    assert f"ray nodes: {node}" in driver and "task result: 42" in driver
    assert f"arguments: output_dir={tmp_path / 'runs' / f'cpu_demo-{job}'} " in driver  # overrides follow
    assert driver.rstrip().splitlines()[-2].endswith(" rl.steps=1")
    assert "all 1 nodes ready" in (tmp_path / f"slurm-{job}.out").read_text()
    assert "starting the Ray head" in (attempt / f"ray-{node}.log").read_text()
    assert (attempt / "ray" / node / "gcs_server.out").is_file(), "the node's Ray logs were not kept"


@pytest.mark.slurm
def test_ray_wait_fails_naming_the_node_that_lacks_gpus(tmp_path, jobs):
    if problem := _ray_problem():
        pytest.skip(problem)
    job = _submit(
        tmp_path, "rl.steps=1", AXPO_RAY="1", GPUS_PER_NODE="1", AXPO_RAY_TIMEOUT="10",
        AXPO_ENTRY=f"{sys.executable} {RAY_DRIVER}",
    )  # fmt: skip
    jobs.append(job)
    info = _wait(job, timeout=300)
    assert info["JobState"] == "FAILED", _diagnostics(tmp_path)
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert f"1 of 1 nodes are not ready: {info['NodeList']} (0/1 GPUs)" in out, out
    assert not (tmp_path / "logs" / f"cpu_demo-{job}" / "attempt-0" / "driver.log").exists()

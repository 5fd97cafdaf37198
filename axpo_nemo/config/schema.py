"""The typed schema of the one config tree that drives every backend.

Each section is a dataclass whose fields document themselves (``setting(default, help, ...)``).
The algorithm sections (`AXPOConfig`, `AdvantageConfig`, `LossConfig`) are the core's own
dataclasses, embedded unchanged. Later subsystems add their sections here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from axpo_nemo.agent.rewards import RewardConfig
from axpo_nemo.agent.tools.base import MAX_OBSERVATION_CHARS
from axpo_nemo.agent.tools.config import ToolsConfig
from axpo_nemo.config.checkpoint import CheckpointConfig
from axpo_nemo.config.cluster import ClusterConfig, NemoConfig
from axpo_nemo.config.evaluation import EvalConfig
from axpo_nemo.config.logs import LoggingConfig
from axpo_nemo.config.rl import RLConfig
from axpo_nemo.config.sft import SFTConfig
from axpo_nemo.config.synth import SynthConfig
from axpo_nemo.core.config import AdvantageConfig, AXPOConfig, LossConfig, setting


@dataclass
class TinyModelConfig:
    """Size of the tiny Qwen3-VL built offline when ``model.name`` is ``tiny``."""

    num_layers: int = setting(2, "Text decoder layers.", ge=1)
    hidden_size: int = setting(128, "Text hidden size.", ge=8)
    num_heads: int = setting(4, "Attention heads.", ge=1)
    num_kv_heads: int = setting(2, "Key/value heads (grouped-query attention); must divide num_heads.", ge=1)
    head_dim: int = setting(32, "Per-head size; even, at least 8 (M-RoPE splits it three ways).", ge=8)
    intermediate_size: int = setting(256, "MLP inner size.", ge=8)
    rope_theta: float = setting(
        5_000_000.0,
        "Rotary base. Qwen3-VL's 5e6 leaves a head_dim-32 model few fast-turning frequencies; "
        "a small base lets a tiny model tell nearby positions apart (copying operands).",
        gt=1.0,
    )
    vision_depth: int = setting(2, "Vision transformer blocks.", ge=1)
    vision_hidden_size: int = setting(64, "Vision transformer hidden size.", ge=8)
    vision_num_heads: int = setting(4, "Vision attention heads; must divide vision_hidden_size.", ge=1)


@dataclass
class ModelConfig:
    """Which policy to train."""

    name: str = setting(
        "tiny",
        "'tiny' builds a small random Qwen3-VL offline (tests, the demo); otherwise a local folder "
        "holding a Hugging Face Qwen3-VL checkpoint, e.g. a downloaded Qwen3-VL-2B-Thinking.",
    )
    dtype: str = setting(
        "auto",
        "Parameter dtype: 'auto' is bfloat16 on a GPU and float32 on CPU.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    device: str = setting("auto", "'auto' (first GPU if any, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    cpu_threads: int = setting(
        0,
        "torch intra-op threads for training on the CPU; 0: torch's default. Use 1 when other "
        "processes share the cores (OpenMP threads then mostly wait on each other), or to make a "
        "run repeat bit for bit (with more threads, two runs agree only to float rounding).",
        ge=0,
    )
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class RolloutConfig:
    """How rollouts are sampled (shared by the original and the resampled rollouts)."""

    questions_per_step: int = setting(64, "Questions B drawn per RL step.", ge=1)
    group_size: int = setting(
        8, "Rollouts N per question. A budget-matched GRPO baseline uses N·(1+r).", ge=1
    )
    max_turns: int = setting(3, "Assistant turns per rollout at most.", ge=1)
    max_new_tokens: int = setting(1024, "Tokens generated per assistant turn at most.", ge=1)
    max_total_tokens: int = setting(8192, "Tokens per trajectory (prompt, turns, observations) at most.", ge=16)
    max_images: int = setting(8, "Images per trajectory (question and tool results) at most.", ge=0)
    max_observation_chars: int = setting(
        MAX_OBSERVATION_CHARS,
        "Characters of one tool response at most, whatever the tool returns (the middle is elided "
        "before tokenizing).",
        ge=256,
    )
    temperature: float = setting(1.0, "Sampling temperature.", gt=0.0)
    top_p: float = setting(1.0, "Nucleus sampling mass.", gt=0.0, le=1.0)


@dataclass
class DataConfig:
    """Where the datasets come from."""

    dir: str | None = setting(
        None,
        "Folder holding sft.jsonl, rl.jsonl and eval.jsonl (image paths are relative to it); "
        "null: <output_dir>/data.",
    )
    synthesize: bool = setting(
        True,
        "Generate the synthetic tool task (data.synth) into data.dir first; reused when the folder "
        "already holds a dataset made with the same settings.",
    )
    synth: SynthConfig = field(default_factory=SynthConfig)
    sft_file: str = setting("sft.jsonl", "SFT trajectories, relative to data.dir: a JSONL file or a shard folder.")
    rl_file: str = setting("rl.jsonl", "RL questions, relative to data.dir: a JSONL file or a shard folder.")
    eval_file: str = setting("eval.jsonl", "Evaluation questions, relative to data.dir: a JSONL file or a shard folder.")


STAGES = ("data", "sft", "rl", "eval", "export", "plots")


@dataclass
class TrainConfig:
    """What `axpo train` runs."""

    stages: list[str] = setting(
        list(STAGES),
        "Pipeline stages in order: data (synthesize), sft, rl, eval, export (Hugging Face folder), "
        "plots. Drop a stage to skip it; sft and rl resume from their checkpoints.",
        choices=STAGES,
    )


ALGORITHMS = ("axpo", "grpo")
BACKENDS = ("local", "nemo")


@dataclass
class Config:
    """The whole run configuration."""

    algorithm: str = setting(
        "axpo", "'axpo' (GRPO + tool-call resampling) or 'grpo' (resampling off).", choices=ALGORITHMS
    )
    backend: str = setting(
        "local",
        "'local' (Hugging Face transformers, CPU or one GPU) or 'nemo' (NeMo-RL: Megatron + vLLM).",
        choices=BACKENDS,
    )
    seed: int = setting(0, "Seed for sampling, selection and data order.")
    output_dir: str = setting("runs/axpo", "Where the run writes checkpoints, metrics and plots.")
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    axpo: AXPOConfig = field(default_factory=AXPOConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    nemo: NemoConfig = field(default_factory=NemoConfig)

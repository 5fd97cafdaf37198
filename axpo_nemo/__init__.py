"""axpo-nemo: AXPO (Agent eXplorative Policy Optimization) for tool-using vision-language models.

Packages:
    core    framework-free AXPO: rollout data model, triggers, selection and budget, advantage
            assembly, PPO-clip/KL loss, metrics, pass@k. Every backend calls it unchanged.
    config  the typed configuration schema and the YAML loader with overrides.
    models  Qwen3-VL construction: a tiny offline model for tests and the demo, and real
            checkpoints from a local path.
"""

__version__ = "0.1.0"

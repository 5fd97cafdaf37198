"""One OmegaConf config tree, validated against typed dataclass schemas.

    from axpo_nemo.config import load_config
    cfg = load_config("demo", ["axpo.r=0.5", "++rollout.group_size=16"])
    cfg.axpo.r   # 0.5, typed

Errors are `ConfigError`s with one line naming the key: ``unknown config key 'axpo.rr'
(override 'axpo.rr=1'); did you mean 'axpo.r'?``.
"""

from axpo_nemo.config.loader import (
    DEFAULT_CONFIG,
    ConfigError,
    apply_overrides,
    find_config,
    load_config,
    load_config_tree,
    to_yaml,
)
from axpo_nemo.config.schema import Config, ModelConfig, RolloutConfig, TinyModelConfig

__all__ = [
    "DEFAULT_CONFIG",
    "Config",
    "ConfigError",
    "ModelConfig",
    "RolloutConfig",
    "TinyModelConfig",
    "apply_overrides",
    "find_config",
    "load_config",
    "load_config_tree",
    "to_yaml",
]

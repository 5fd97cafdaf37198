"""NeMo-RL backend: Megatron-Core policy, colocated vLLM rollouts, the AXPO loss, cluster planning.

This is the only package that imports ``nemo_rl``, ``megatron``, ``vllm`` or ``transformer_engine``,
and it imports them only inside `axpo_nemo.nemo.adapter`, lazily: importing ``axpo_nemo.nemo``
(and the framework-free modules here, such as `plan`) works on a machine without NeMo-RL.
"""

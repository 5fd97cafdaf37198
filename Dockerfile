# syntax=docker/dockerfile:1
# axpo-nemo on the NeMo-RL v0.7.0 release image, its pinned stack left as it is.
# Build and convert to an Enroot .sqsh: containers/build.sh. Running it on SLURM: containers/README.md.
#
# The image's Python environments (NeMo-RL v0.7.0's docker/Dockerfile):
#   /opt/nemo_rl_venv         the driver's venv: `python` on PATH, uv project env of /opt/nemo-rl
#   /opt/ray_venvs/<actor>/   the prefetched venvs of NeMo-RL's Ray workers (Megatron policy, vLLM,
#                             ...), chosen per actor class by PY_EXECUTABLES (NEMO_RL_VENV_DIR)
# Our code runs in the driver and inside Ray workers (the AXPO loss is pickled to the Megatron
# workers, the tool environment is a Ray actor), so it is installed into every one of them.
# --no-deps: every runtime dependency of axpo-nemo is already a NeMo-RL dependency; nothing in the
# image is upgraded or downgraded. A check after the install fails the build if one is missing or
# outside our version range in any venv. Secrets (HF_TOKEN, WANDB_API_KEY) never enter the image:
# they are passed as environment variables at run time.
ARG NEMO_RL_IMAGE=nvcr.io/nvidia/nemo-rl:v0.7.0
FROM ${NEMO_RL_IMAGE}

LABEL org.opencontainers.image.title="axpo-nemo" \
      org.opencontainers.image.description="AXPO tool-use RL for vision-language models on NeMo-RL v0.7.0" \
      org.opencontainers.image.licenses="Apache-2.0"

WORKDIR /opt/axpo-nemo
COPY pyproject.toml README.md ./
COPY axpo_nemo/ ./axpo_nemo/
COPY conf/ ./conf/
COPY slurm/ ./slurm/
COPY tools/ ./tools/
COPY containers/check_deps.py ./containers/check_deps.py

# Editable install: one copy of the source for every venv, and `conf/` found next to the package.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN for venv in /opt/nemo_rl_venv /opt/ray_venvs/*/; do \
      venv=${venv%/}; \
      if [[ ! -x $venv/bin/python ]]; then continue; fi; \
      echo "installing axpo-nemo into $venv"; \
      uv pip install --python "$venv/bin/python" --no-deps --no-cache --editable /opt/axpo-nemo; \
      "$venv/bin/python" /opt/axpo-nemo/containers/check_deps.py axpo-nemo; \
    done \
 && python -c "import axpo_nemo, axpo_nemo.nemo.adapter as a; print('axpo-nemo', axpo_nemo.__version__, 'for NeMo-RL', a.NEMO_RL_VERSION)"

# Venvs NeMo-RL creates at start-up (a worker type that was not prefetched) do not get the install:
# the launcher (slurm/launch.sh) puts the checkout on PYTHONPATH, which every Ray worker inherits.
ENV AXPO_IMAGE=1 \
    RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 \
    RAY_USAGE_STATS_ENABLED=0

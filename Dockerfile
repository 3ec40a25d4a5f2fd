# The fotlab image: Ray 2.60 (Python 3.11) + torch + fotlab, for the compose stack and KubeRay pods.
#   docker build -t fotlab:0.1.0-cpu .                                   # CPU (torch's CPU wheel)
#   docker build --build-arg VARIANT=gpu -t fotlab:0.1.0-gpu .           # CUDA (Ray's -gpu base, CUDA torch wheel)
#   docker build --build-arg VARIANT=tpu -t fotlab:0.1.0-tpu .           # TPU hosts: JAX (fotlab[jax] + jax[tpu])
# Every base tag is pinned; never `latest`.
ARG VARIANT=cpu
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311

FROM ${RAY_IMAGE}-cpu AS base-cpu
# torch's CPU build: the default PyPI wheel is the multi-GB CUDA one. (ENV, not ARG: ARGs end with their stage.)
ENV FOTLAB_TORCH_INDEX=https://download.pytorch.org/whl/cpu \
    FOTLAB_EXTRAS=faiss \
    FOTLAB_EXTRA_PIP=""

FROM ${RAY_IMAGE}-gpu AS base-gpu
ENV FOTLAB_TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
    FOTLAB_EXTRAS=faiss \
    FOTLAB_EXTRA_PIP=""

# TPU hosts (GKE TPU slices): Ray's CPU base; training runs in JAX (`train.framework: jax`), torch stays for data,
# evaluations and the model format.
FROM ${RAY_IMAGE}-cpu AS base-tpu
ENV FOTLAB_TORCH_INDEX=https://download.pytorch.org/whl/cpu \
    FOTLAB_EXTRAS=faiss,jax \
    FOTLAB_EXTRA_PIP="jax[tpu]"

FROM base-${VARIANT} AS fotlab
ARG TORCH_VERSION=2.13.0
ENV RAY_USAGE_STATS_ENABLED=0 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /home/ray/fotlab
RUN pip install --index-url "${FOTLAB_TORCH_INDEX}" "torch==${TORCH_VERSION}"
# Dependencies first (a layer that survives source edits), then the package itself.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users platform ./platform
RUN pip install ".[${FOTLAB_EXTRAS}]" ${FOTLAB_EXTRA_PIP} && python -c "import fotlab.cli, torch, ray; print('fotlab', fotlab.__version__, 'torch', torch.__version__, 'ray', ray.__version__)"
COPY --chown=ray:users experiments ./experiments

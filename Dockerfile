# vlmq: one image for every service (`vlmq api …`, `vlmq worker …`, `vlmq caption …`).
#
#   docker build -t vlmq .                                    # CPU torch (default)
#   docker build -t vlmq --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .   # CUDA torch
FROM python:3.11-slim

# Where torch comes from: the CPU wheels by default (small), a CUDA index for GPU workers.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/vlmq

# torch first, on its own layer: it is most of the image and changes least often.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch

COPY pyproject.toml README.md ./
COPY vlmq ./vlmq
COPY shared ./shared
COPY embedder_service ./embedder_service
COPY generator_service ./generator_service
COPY cuda_ext ./cuda_ext
RUN pip install .

# Workers read checkpoints from the `models` volume; nothing needs root at run time.
RUN useradd --create-home --uid 1000 vlmq && mkdir -p /models && chown vlmq /models
USER vlmq

ENTRYPOINT ["vlmq"]
CMD ["--help"]

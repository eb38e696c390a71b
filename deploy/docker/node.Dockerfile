# Site node image: runs `deferredseg node start`, which checks the site and starts flower-supernode.
#
# CUDA variant (default): PyTorch's published CUDA runtime image, whose torch is kept.
#   docker build -f deploy/docker/node.Dockerfile -t deferredseg-node:cuda .
# CPU variant: a slim Python image with torch from PyTorch's CPU wheel index.
#   docker build -f deploy/docker/node.Dockerfile -t deferredseg-node:cpu \
#     --build-arg BASE_IMAGE=python:3.11-slim \
#     --build-arg TORCH_INSTALL="torch==2.5.1 --index-url https://download.pytorch.org/whl/cpu" .
# Build from the repository root. NOTE: checked statically only; no container engine ran these builds.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG TORCH_INSTALL=""
ARG FLWR_VERSION=1.42.0

# Flower must not send telemetry, check for updates or install packages at run time.
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

RUN if [ -n "${TORCH_INSTALL}" ]; then pip install ${TORCH_INSTALL}; fi

WORKDIR /opt/deferredseg
COPY pyproject.toml README.md ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY cli ./cli
# The installed torch satisfies the project's requirement, so pip keeps it (CUDA or CPU build alike).
RUN pip install "flwr[simulation]==${FLWR_VERSION}" . \
    && python -c "import torch, flwr, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

RUN useradd --system --uid 10001 --home-dir /var/lib/deferredseg --create-home deferredseg
USER deferredseg

# Every path and port comes from the environment (see deploy/examples/node.env); mount the site folder,
# the state folder, ca.pem and the node key at these paths or change them.
ENV SITE_DIR=/data/site \
    STATE_DIR=/var/lib/deferredseg/state \
    SUPERLINK_ADDRESS=superlink:9092 \
    CA_CERT=/run/deferredseg/certs/ca.pem \
    NODE_KEY=/run/deferredseg/keys/node.key \
    CLIENTAPPIO_PORT=9094

# Shell form so that the variables above expand; exec keeps deferredseg as PID 1, which passes SIGTERM on.
CMD exec deferredseg node start --site-dir "$SITE_DIR" --state-dir "$STATE_DIR" \
    --superlink "$SUPERLINK_ADDRESS" --root-certificates "$CA_CERT" --auth-key "$NODE_KEY" \
    --clientappio-port "$CLIENTAPPIO_PORT"

# Coordinator image: Flower SuperLink with TLS, node authentication and a state database. The ServerApp runs
# inside it (Flower's subprocess isolation), so it carries torch (CPU build) and the project too.
#   docker build -f deploy/docker/coordinator.Dockerfile -t deferredseg-coordinator .
# Build from the repository root. NOTE: checked statically only; no container engine ran this build.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INSTALL="torch==2.5.1 --index-url https://download.pytorch.org/whl/cpu"
ARG FLWR_VERSION=1.42.0

# Flower must not send telemetry, check for updates or install packages at run time.
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

RUN pip install ${TORCH_INSTALL}

WORKDIR /opt/deferredseg
COPY pyproject.toml README.md ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY cli ./cli
RUN pip install "flwr[simulation]==${FLWR_VERSION}" .

RUN useradd --system --uid 10001 --home-dir /var/lib/deferredseg --create-home deferredseg
USER deferredseg

ENV CA_CERT=/run/deferredseg/certs/ca.pem \
    SUPERLINK_CERT=/run/deferredseg/certs/superlink.pem \
    SUPERLINK_KEY=/run/deferredseg/certs/superlink.key \
    SUPERLINK_DATABASE=/var/lib/deferredseg/superlink.db \
    SUPERLINK_HOST=0.0.0.0 \
    SUPERLINK_PORT=9092
EXPOSE 9092

CMD exec flower-superlink --ssl-ca-certfile "$CA_CERT" --ssl-certfile "$SUPERLINK_CERT" \
    --ssl-keyfile "$SUPERLINK_KEY" --enable-supernode-auth --database "$SUPERLINK_DATABASE" \
    --host "$SUPERLINK_HOST" --port "$SUPERLINK_PORT"

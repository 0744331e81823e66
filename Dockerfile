# ollama-meter: a small image, no build tools in the final stage, runs as a non-root user.
#   docker build -t ollama-meter .
#   docker run -p 11435:11435 -e OLLAMA_METER_UPSTREAM=http://gpu-box:11434 ollama-meter

FROM python:3.12.12-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# Wheels for ollama-meter and every dependency, so the final stage installs offline.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12.12-slim-bookworm
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin meter \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/ollama-meter
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl
ENV PYTHONUNBUFFERED=1 \
    OLLAMA_METER_LISTEN=0.0.0.0:11435
# The usage ledger, when on (OLLAMA_METER_LEDGER=/var/lib/ollama-meter/usage.sqlite), lives
# here; a volume mounted on it keeps the directory's owner (compose.yaml does).
VOLUME /var/lib/ollama-meter
USER 10001
EXPOSE 11435
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:11435/-/healthy', timeout=2)"]
ENTRYPOINT ["ollama-meter"]

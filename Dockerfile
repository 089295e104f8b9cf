# voicebook server image: slim, non-root, health-checked.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY voice_server ./voice_server
COPY booking ./booking
COPY integrations ./integrations
RUN python -m venv /opt/voicebook \
 && /opt/voicebook/bin/pip install --upgrade pip \
 && /opt/voicebook/bin/pip install .

FROM python:3.11-slim
ENV PATH=/opt/voicebook/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VOICEBOOK_HOST=0.0.0.0 \
    VOICEBOOK_PORT=8080 \
    VOICEBOOK_DATA_DIR=/var/lib/voicebook
RUN groupadd --system voicebook \
 && useradd --system --gid voicebook --home-dir /var/lib/voicebook --create-home voicebook
COPY --from=build /opt/voicebook /opt/voicebook
USER voicebook
WORKDIR /var/lib/voicebook
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"VOICEBOOK_PORT\", \"8080\")}/healthz', timeout=2)"
# Migrations run at start-up unless VOICEBOOK_AUTO_MIGRATE=false (then run `voicebook migrate` first).
CMD ["voicebook", "serve"]

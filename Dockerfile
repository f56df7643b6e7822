# One image for the API and the workers (the command differs).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DISTILLERY_HOME=/data STORAGE_DIR=/artifacts

RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY distillery distillery
COPY distillery_contract distillery_contract
COPY app app
COPY worker worker
COPY examples examples

# torch==2.14.1 from PyPI is the CUDA build (for GPU workers). For CPU-only images:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
ARG TORCH_INDEX_URL=
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -e '.[all]'

RUN useradd --create-home distillery && mkdir -p /data /artifacts \
    && chown distillery /data /artifacts
USER distillery
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)" || exit 1
CMD ["distillery", "api", "--host", "0.0.0.0", "--port", "8000"]

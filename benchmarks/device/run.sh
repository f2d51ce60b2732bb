#!/bin/bash
# The device side (see prepare.sh): install the carried wheels, then run the GPU checks, each bounded in time,
# results under $OUT. Usage there: bash .devrun/run.sh [JOB ...], JOB in gpu, gpu-dp, textgen, deploy100.
ROOT=$(cd "$(dirname "$0")/.." && pwd); cd "$ROOT/.devrun/src" || exit 1
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 MPLBACKEND=Agg \
  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 RAY_USAGE_STATS_ENABLED=0
START=$(date +%s); el() { echo "[$(( $(date +%s) - START )) s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$ROOT"/.whl/*.whl || exit 3
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
mkdir -p /usr/share/datasets/fashion-mnist && cp "$ROOT"/.data/fmnist/*.gz /usr/share/datasets/fashion-mnist/
python3 -c "import lzma,gzip,shutil; shutil.copyfileobj(lzma.open('$ROOT/.data/fmnist/train-images-idx3-ubyte.xz'), gzip.open('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz','wb',compresslevel=1))" || exit 6
el installed; mkdir -p "$OUT"
for job in "${@:-gpu gpu-dp}"; do
  case $job in
    gpu) timeout 90 python3 -m benchmarks.gpu_check --rounds 1 --out "$OUT/gpu_check.json" 2>&1 | grep -v INFO | tail -4 ;;
    gpu-dp) timeout 90 python3 -m benchmarks.gpu_check --dp --rounds 1 --out "$OUT/gpu_check_dp.json" 2>&1 | grep -v INFO | tail -4 ;;
    textgen) OMP_NUM_THREADS=2 timeout 240 python3 -m benchmarks.textgen --model lstm --clients 20 --rounds 6 \
        --variants none --batch-size 256 --device cuda --work /tmp/tg --out "$OUT/textgen_lstm_cuda.json" 2>&1 | tail -3 ;;
    # 100 SuperNodes of about 540 MB each (RESULTS.md): needs the 128 GB machine; fedpriv's pyproject says
    # Python 3.11, so deploy_rounds runs the checkout through PYTHONPATH rather than an installed fedpriv.
    deploy100) for extra in "" "--set secagg=true --set secagg-shares=11"; do
        timeout 280 python3 -m benchmarks.deploy_rounds --clients 100 --examples 100 --rounds 2 --variants default \
          --set fraction-evaluate=0.1 $extra --out "$OUT/deploy100_$( [ -z "$extra" ] && echo plain || echo secagg ).json" \
          2>&1 | grep -v INFO | tail -3
        pkill -9 -f simulations.cli; pkill -9 -f client.deploy; pkill -9 -f flower-super; sleep 1; done ;;
  esac
  el "$job done"
done

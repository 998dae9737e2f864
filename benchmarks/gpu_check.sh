#!/usr/bin/env bash
# One prepared run on a CUDA machine with no network (see BENCHMARKS.md, "How to run"). What it carries in
# .whl/ is built beforehand by benchmarks/gpu_prepare.sh, one part per call (64 MiB each at most):
#   PART=checks (default)  the CPU suite's CUDA-path tests, the signal-and-resume tests, benchmarks/gpu_checks.py
#                          on a tiny model (each check PASS/FAIL; Ray's GPU actors with the carried Ray), then the
#                          benchmark (old pipeline, qa-batch, bare loop, matmul peak) into $OUT
#   PART=trained           the trained model on CUDA float32/float16/bfloat16 against the CPU float32 answers
#                          made before the call, and its answer quality (F1) per dtype
set -uo pipefail  # every check runs; any failure makes the exit code 1 (see fail)
PART=${PART:-checks}
OUT=${OUT:-/tmp/qa-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
if compgen -G ".whl/site/*.whl" >/dev/null; then  # Ray and what it needs beyond the image
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/site/*.whl
fi
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi -L; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"

failed=0
fail() { echo "GPU CHECK FAILED: $*" | tee -a "$OUT/failures.txt"; failed=1; }

if [ "$PART" = checks ]; then
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ref .whl/transformers-*.whl .whl/tokenizers-*.whl
echo "== CUDA checks"
# --device auto is CUDA here: test_resume's SIGTERM/SIGINT, second-signal and crash-point runs resume on CUDA
python3 -m pytest -q -p no:cacheprovider tests/test_spans.py tests/test_engine.py tests/test_cuda_paths.py \
  tests/test_resume.py > "$OUT/pytest-cuda.log" 2>&1 || fail "pytest on CUDA (see pytest-cuda.log)"
tail -3 "$OUT/pytest-cuda.log"
python3 tests/tiny_models.py /tmp/tiny >/dev/null || fail "tiny checkpoint"
python3 benchmarks/gpu_checks.py --tiny /tmp/tiny --out "$OUT" 2>&1 | tee "$OUT/gpu_checks.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "gpu_checks.py (see gpu_checks.json)"

echo "== benchmark"
QA_BENCH_REF_PYTHONPATH=/tmp/ref QA_BENCH_TOKENIZER=$PWD/.whl/bert-tokenizer \
  timeout ${BENCH_TIMEOUT:-420} python3 benchmarks/run.py --device cuda --ref-python python3 --squad .whl/squad.json \
  --work /tmp/bench --rows "${BENCH_ROWS:-long=626,short=626}" --ref-rows "${BENCH_REF_ROWS:-long=60}" --no-append --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "benchmark (see bench.log)"
fi

if [ "$PART" = trained ]; then
echo "== trained model on CUDA against CPU float32 answers of commit $(cat .whl/cpu-answers/COMMIT)"
python3 benchmarks/gpu_checks.py --only trained --out "$OUT" --trained .whl/minilm-squad2 \
  --inputs .whl/trained-inputs --cpu-answers .whl/cpu-answers 2>&1 | tee "$OUT/gpu_checks.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "gpu_checks.py (see gpu_checks.json)"
echo "== answer quality on CUDA, trained MiniLM: float32 vs float16 vs bfloat16 (F1, same span)"
timeout ${QUALITY_TIMEOUT:-240} python3 benchmarks/quality.py --device cuda --model .whl/minilm-squad2 --squad .whl/squad.json \
  --ref-python '' --steps quality --variants "--dtype float16;--dtype bfloat16" --work /tmp/quality \
  --results "$OUT/quality-cuda.json" 2>&1 | tail -12
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "quality on CUDA"
fi

if [ "$failed" -ne 0 ]; then echo "== FAILED:"; cat "$OUT/failures.txt"; exit 1; fi
echo "== all GPU checks passed"

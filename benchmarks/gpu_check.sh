#!/usr/bin/env bash
# One prepared run on a CUDA machine with no network (see BENCHMARKS.md):
#   .whl/  transformers 5.2.0 + tokenizers 0.22.2 wheels (the old pipeline), bert-tokenizer/, squad.json;
#          optionally minilm-squad2/ (the trained model), trained-inputs/*.parquet and cpu-answers/*.parquet
#          (those inputs answered on the CPU in float32 with --top-k 3 --allow-null, before the call)
# 1. CUDA checks: the CPU suite's CUDA-path tests on the GPU, then benchmarks/gpu_checks.py (each check PASS/FAIL);
# 2. the benchmark (old pipeline, qa-batch, bare loop, matmul peak) into $OUT.
set -uo pipefail  # every check runs; any failure makes the exit code 1 (see fail)
OUT=${OUT:-/tmp/qa-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ref .whl/transformers-*.whl .whl/tokenizers-*.whl
nvidia-smi -L; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"

failed=0
fail() { echo "GPU CHECK FAILED: $*" | tee -a "$OUT/failures.txt"; failed=1; }

if [ -z "${SKIP_CHECKS:-}" ]; then
echo "== CUDA checks"
python3 -m pytest -q -p no:cacheprovider tests/test_spans.py tests/test_engine.py tests/test_cuda_paths.py \
  > "$OUT/pytest-cuda.log" 2>&1 || fail "pytest on CUDA (see pytest-cuda.log)"
tail -3 "$OUT/pytest-cuda.log"
python3 tests/tiny_models.py /tmp/tiny >/dev/null || fail "tiny checkpoint"
trained_args=()
if [ -d .whl/minilm-squad2 ] && [ -d .whl/cpu-answers ]; then  # CPU float32 answers made before the call
  trained_args=(--trained .whl/minilm-squad2 --inputs .whl/trained-inputs --cpu-answers .whl/cpu-answers)
fi
python3 benchmarks/gpu_checks.py --tiny /tmp/tiny --out "$OUT" "${trained_args[@]}" 2>&1 | tee "$OUT/gpu_checks.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "gpu_checks.py (see gpu_checks.json)"
fi

if [ -d .whl/minilm-squad2 ]; then  # the trained model (save it in float16 to fit what a run carries)
echo "== answer quality on CUDA, trained MiniLM: float32 vs float16 vs bfloat16 (F1, same span)"
timeout ${QUALITY_TIMEOUT:-240} python3 benchmarks/quality.py --device cuda --model .whl/minilm-squad2 --squad .whl/squad.json \
  --ref-python '' --steps quality --variants "--dtype float16;--dtype bfloat16" --work /tmp/quality \
  --results "$OUT/quality-cuda.json" 2>&1 | tail -12
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "quality on CUDA"
fi

echo "== benchmark"
QA_BENCH_REF_PYTHONPATH=/tmp/ref QA_BENCH_TOKENIZER=$PWD/.whl/bert-tokenizer \
  timeout ${BENCH_TIMEOUT:-420} python3 benchmarks/run.py --device cuda --ref-python python3 --squad .whl/squad.json \
  --work /tmp/bench --rows "${BENCH_ROWS:-long=626,short=626}" --ref-rows "${BENCH_REF_ROWS:-long=60}" --no-append --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "benchmark (see bench.log)"
if [ "$failed" -ne 0 ]; then echo "== FAILED:"; cat "$OUT/failures.txt"; exit 1; fi
echo "== all GPU checks passed"

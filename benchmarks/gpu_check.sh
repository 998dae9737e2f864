#!/usr/bin/env bash
# One prepared run on a CUDA machine with no network (see BENCHMARKS.md):
#   .whl/  transformers 5.2.0 + tokenizers 0.22.2 wheels (the old pipeline), bert-tokenizer/, squad.json
# 1. CUDA checks: the span-search tests on the GPU, and the sample job on cuda vs cpu;
# 2. the benchmark (old pipeline, qa-batch, bare loop, matmul peak) into $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/qa-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ref .whl/transformers-*.whl .whl/tokenizers-*.whl
nvidia-smi -L; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"

if [ -z "${SKIP_CHECKS:-}" ]; then
echo "== CUDA checks"
python3 -m pytest -q -p no:cacheprovider tests/test_spans.py tests/test_engine.py 2>&1 | tail -3
python3 tests/tiny_models.py /tmp/tiny >/dev/null
for dev in cpu cuda; do
  python3 -m jobs.cli run data/sample.parquet -o /tmp/sample-$dev.parquet --model /tmp/tiny --device $dev --dtype float32 --top-k 2 --overwrite
done
python3 -m jobs.cli run data/sample.parquet -o /tmp/sample-fp16.parquet --model /tmp/tiny --device cuda --overwrite --batch-size 7
# the worker-process path on one GPU: two workers share cuda:0; same table as one process
python3 -m jobs.cli run data/sample.parquet -o /tmp/sample-2w.parquet --model /tmp/tiny --devices cuda:0,cuda:0 --dtype float32 --top-k 2 --overwrite --rows-per-window 8
python3 -m jobs.cli run data/sample.parquet -o /tmp/sample-1w.parquet --model /tmp/tiny --device cuda:0 --dtype float32 --top-k 2 --overwrite --rows-per-window 8
# a real out-of-memory in the forward (most of the card taken by a ballast tensor), recovered
python3 benchmarks/oom_check.py /tmp/tiny || echo "OOM CHECK FAILED"
python3 -c "import pyarrow.parquet as pq; print('two workers on cuda:0 equal one:', pq.read_table('/tmp/sample-2w.parquet').equals(pq.read_table('/tmp/sample-1w.parquet')))"
python3 - <<'PY'
import pyarrow.parquet as pq
a, b, h = (pq.read_table(f"/tmp/sample-{d}.parquet").to_pylist() for d in ("cpu", "cuda", "fp16"))
src = pq.read_table("data/sample.parquet")["passage"].to_pylist()
same = sum((x["answer_start"], x["answer_end"]) == (y["answer_start"], y["answer_end"]) for x, y in zip(a, b))
near = max(abs(x["score"] - y["score"]) for x, y in zip(a, b))
exact = all(p[r["answer_start"]:r["answer_end"]] == r["answer"] for rows in (b, h) for p, r in zip(src, rows))
fp16 = sum((x["answer_start"], x["answer_end"]) == (y["answer_start"], y["answer_end"]) for x, y in zip(a, h))
print(f"cuda fp32 vs cpu: same span {same}/{len(a)}, max score diff {near:.2e}; fp16 same span {fp16}/{len(a)}; offsets exact: {exact}")
PY
fi

if [ -d .whl/minilm-squad2 ]; then  # the trained model (save it in float16 to fit what a run carries)
echo "== answer quality on CUDA, trained MiniLM: float32 vs float16 vs bfloat16 (F1, same span)"
timeout ${QUALITY_TIMEOUT:-240} python3 benchmarks/quality.py --device cuda --model .whl/minilm-squad2 --squad .whl/squad.json \
  --ref-python '' --steps quality --variants "--dtype float16;--dtype bfloat16" --work /tmp/quality \
  --results "$OUT/quality-cuda.json" 2>&1 | tail -12
fi

echo "== benchmark"
QA_BENCH_REF_PYTHONPATH=/tmp/ref QA_BENCH_TOKENIZER=$PWD/.whl/bert-tokenizer \
  timeout ${BENCH_TIMEOUT:-420} python3 benchmarks/run.py --device cuda --ref-python python3 --squad .whl/squad.json \
  --work /tmp/bench --rows "${BENCH_ROWS:-long=626,short=626}" --ref-rows "${BENCH_REF_ROWS:-long=60}" --no-append --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"

#!/usr/bin/env bash
# Builds what one GPU call carries in .whl/ (the device machine has no network, and a call carries
# at most 64 MiB), on this machine, before any device time is spent. Two parts, one call each:
#
#   benchmarks/gpu_prepare.sh checks    the tiny-model CUDA checks, Ray's GPU actors and the benchmark:
#                                       the old pipeline's wheels, Ray (its Java jars and source maps left
#                                       out) and what Ray needs beyond the image, a BERT tokenizer, SQuAD
#   benchmarks/gpu_prepare.sh trained   the trained model's checks: ../shared/models/minilm-squad2 saved
#                                       in float16, the SQuAD inputs (paragraphs, whole articles) and their
#                                       CPU float32 answers made here with this commit (--top-k 3 --allow-null)
#
# Then, on the device (each call names .whl in carry):
#   checks:  bash benchmarks/gpu_check.sh
#   trained: PART=trained bash benchmarks/gpu_check.sh
set -euo pipefail
PART=${1:?usage: gpu_prepare.sh checks|trained}
ROOT=$(cd "$(dirname "$0")/.." && pwd); cd "$ROOT"
SHARED=${SHARED:-$ROOT/../shared}
PY=${PYTHON:-python}
rm -rf .whl; mkdir -p .whl/site
# the device's python: 3.12 on x86-64 (see the device README); wheels for it, whatever this machine runs
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"
}
cp "$SHARED/data/squad_v2_dev_2articles.json" .whl/squad.json

case "$PART" in
checks)
  download .whl transformers==5.2.0 tokenizers==0.22.2  # the old pipeline, installed apart (/tmp/ref)
  "$PY" - <<'EOF'  # a BERT-uncased tokenizer for the benchmark's random-weight BERTs
import sys; sys.path.insert(0, "benchmarks")
from make_checkpoints import tokenizer_dir
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(".whl/bert-tokenizer")
EOF
  RAY=$("$PY" -c "import ray; print(ray.__version__)")
  download /tmp/qa-ray-wheel "ray==$RAY"
  download .whl/site jsonschema jsonschema-specifications referencing rpds-py  # Ray's needs the image lacks
  "$PY" - "$RAY" <<'EOF'  # the same wheel without what a Python driver never loads: 79 MB -> about 45
import glob, sys, zipfile
src = glob.glob(f"/tmp/qa-ray-wheel/ray-{sys.argv[1]}-*.whl")[0]
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(".whl/site/" + src.rsplit("/", 1)[1], "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if item.filename.startswith("ray/jars/") or item.filename.endswith(".js.map"):
            continue
        zout.writestr(item, zin.read(item.filename))
EOF
  ;;
trained)
  "$PY" - "$SHARED/models/minilm-squad2" <<'EOF'  # float16 halves it; the CUDA runs load it in each dtype
import sys, torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer
AutoModelForQuestionAnswering.from_pretrained(sys.argv[1], dtype=torch.float16).save_pretrained(".whl/minilm-squad2")
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(".whl/minilm-squad2")
EOF
  "$PY" benchmarks/make_inputs.py .whl/squad.json /tmp/qa-trained-inputs >/dev/null
  mkdir -p .whl/trained-inputs .whl/cpu-answers
  for name in short long; do  # paragraphs, whole articles
    cp "/tmp/qa-trained-inputs/$name.parquet" ".whl/trained-inputs/$name.parquet"
    "$PY" -m jobs.cli run ".whl/trained-inputs/$name.parquet" -o ".whl/cpu-answers/$name.parquet" \
      --model .whl/minilm-squad2 --device cpu --dtype float32 --top-k 3 --allow-null --overwrite --quiet
  done
  git rev-parse --short HEAD > .whl/cpu-answers/COMMIT  # the answers hold for this commit's code only
  ;;
*) echo "usage: gpu_prepare.sh checks|trained" >&2; exit 2 ;;
esac
size=$(du -sm .whl | cut -f1)
echo "$PART: .whl holds ${size} MiB (a call carries at most 64 MiB with the working tree)"
[ "$size" -lt 60 ] || { echo "too large to carry" >&2; exit 1; }

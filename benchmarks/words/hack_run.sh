#!/usr/bin/env bash
# The words task's pre-registered hack run (issue #24): an aggressive, unanchored Neighbor GRPO run on the OCR proxy,
# with the gold (Tesseract) read on the same held-out samples as a monitor it never trains on. Registered in
# docs/benchmarks.md (with its prediction) before it was first run. Needs Tesseract (apt-get install tesseract-ocr;
# pip install pytesseract). Usage: bash benchmarks/words/hack_run.sh OUT_DIR [KEY=VALUE ...]   (about 20 CPU-minutes;
# extra overrides come last and win, e.g. optim.lr=3.0e-3 for the registered run 2)
set -euo pipefail
out=${1:?usage: hack_run.sh OUT_DIR [KEY=VALUE ...]}
shift
python -c "from neighbor_grpo.rewards.tesseract import tesseract_missing as m; import sys; r = m(); r and sys.exit('hack run needs Tesseract: ' + r)"
export OMP_NUM_THREADS=1
ngrpo train neighbor_grpo/builtin/configs/words_demo.yaml --out "$out" \
  iterations=120 optim.lr=1.0e-2 neighbor_grpo.ref_beta=0 eval.every=20 eval.samples_per_prompt=4 \
  'eval.monitor_rewards=[{name: ocr_tesseract}]' "$@"

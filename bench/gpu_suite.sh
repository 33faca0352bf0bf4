#!/usr/bin/env bash
# Every GPU figure of the issues in one call (sized for a 15-minute device lease; each step has its own time cap).
#   OUT=/tmp/gpu bash bench/gpu_suite.sh        # writes $OUT/gpu_suite.jsonl and prints a table at the end
# Steps: LARP-L-Long encode/decode (batch 64) and train step (batch 16), bf16, eager and torch.compile;
# the trainer's G/D step (batch 16, bf16); video-token generation with a Qwen2.5-0.5B-shaped LLM (1024 tokens, CFG 1.25).
set -u
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
LOG="$OUT/gpu_suite.jsonl"
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
step() {  # step SECONDS NAME CMD...: run CMD with a time cap, keep its JSON lines
  local cap=$1 name=$2; shift 2
  echo "== $name (cap ${cap}s)"
  local t0=$SECONDS
  timeout "$cap" "$@" 2>"$OUT/$name.err" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "{\"bench\": \"gpu_suite\", \"step\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - t0))}" | tee -a "$LOG"
  [ "$rc" = 0 ] || tail -5 "$OUT/$name.err"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step 120 tok_eager $PY bench/tokenizer_speed.py --preset larp-l-long --batch 64 --train-batch 16 --dtype bf16 --iters 10 --warmup 3
step 240 tok_compiled $PY bench/tokenizer_speed.py --preset larp-l-long --batch 64 --train-batch 16 --dtype bf16 --iters 10 --warmup 3 --compile
step 90 train_gd $PY bench/train_speed.py --preset larp-l-long --batch 16 --dtype bf16 --steps 10 --warmup 3 --device cuda
step 200 generate $PY bench/generate_speed.py --config qwen2.5-0.5b --dtype bf16 --batch-sizes 1,64 --paths fast,fast-compiled
$PY - "$LOG" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"\n{'bench':<16}{'metric':<40}{'batch':>6}{'value':>12}  unit        peak GB  device")
for r in rows:
    if r.get("bench") == "gpu_suite":
        continue
    m = (r["phase"] + " " if "phase" in r else "") + r.get("metric", "") + (f" [{r['path']}]" if "path" in r else "") + (" compiled" if r.get("compile") else "")
    v, u = (r["videos_per_s"], "videos/s") if "videos_per_s" in r else (r.get("value"), r.get("unit", ""))
    pk = r.get("peak_mem_gb")
    print(f"{r.get('bench', ''):<16}{m:<40}{r.get('batch', ''):>6}{str(v if v is None else round(v, 3)):>12}  {u:<11}"
          f"{str('-' if pk is None else round(pk, 1)):>8}  {r.get('device', '')}")
print([(r["step"], r["rc"], r["wall_s"]) for r in rows if r.get("bench") == "gpu_suite"])
PYEOF

#!/usr/bin/env bash
# GPU smoke test: fcpass on TensorRT and on ONNX Runtime CUDA against ONNX Runtime CPU.
#
#   bash tools/gpu_smoke.sh                       # full: 50 steps, 10 samples, --calibrate 4
#   FCPASS_SMOKE_QUICK=1 bash tools/gpu_smoke.sh  # a few steps and samples (minutes on a CPU)
#
# Reports what the machine has (nvidia-smi, tensorrt, onnxruntime's providers, torch CUDA) and runs
# what it can; every missing piece is named with what it skips. On the bundled digits model: optimize
# and calibrate, `fcpass check --target tensorrt`, then for each backend (CPU always; TensorRT engines
# via `fcpass build` + `fcpass sample --engine`; ONNX Runtime `--provider cuda`) sample the original
# graph and the compiled one under the policies none, fora and fastcache, compare every GPU output
# with the CPU's (`fcpass compare`) and print the speedups from the reports' wall_seconds; the same
# graph lowered to segments, on every backend (TensorRT: a folder of engines, with and without CUDA
# graphs), against the If lowering on that backend. Then DiT-S/2
# at 256x256 (random weights): tools/bench_overhead.py (ONNX Runtime CPU, the only provider it has)
# and the same original-vs-compiled timing on every backend present.
# Environment: PYTHON (default python), FCPASS_SMOKE_OUT (default out/gpu), FCPASS_SMOKE_QUICK=1,
# FCPASS_SMOKE_SKIP_DITS2=1 (skip the DiT-S/2 part). Exit status 1 if any step failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
OUT=${FCPASS_SMOKE_OUT:-out/gpu}
QUICK=${FCPASS_SMOKE_QUICK:-0}
mkdir -p "$OUT"

if [[ $QUICK == 1 ]]; then
  STEPS=6; CLASSES=(1 7); CALIB=(--calibrate 1 --calib-steps 8); ITERS=2; DITS2_CLASSES=(1)
else
  STEPS=50; CLASSES=(0 1 2 3 4 5 6 7 8 9); CALIB=(--calibrate 4); ITERS=10; DITS2_CLASSES=(1 2)
fi

SUMMARY=()
FAILURES=()
note() { echo "$*"; SUMMARY+=("$*"); }
fcpass() { "$PY" -m fcpass.cli "$@"; }
jget() { "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
ratio() { "$PY" -c 'import sys; a, b = map(float, sys.argv[1:]); print(f"{a / b:.2f}x")' "$1" "$2"; }
lastline() { tr '\r' '\n' < "$1" | grep -v '^[[:space:]]*$' | tail -n 1; }  # past tqdm's \r updates
maxdiff() {
  "$PY" -c 'import numpy as np, sys; a, b = (np.load(p) for p in sys.argv[1:]); print(f"{np.abs(a - b).max():.3g}")' "$1" "$2"
}

echo "== what this machine has"
HAVE_GPU=0; HAVE_TRT=0; HAVE_TORCH_CUDA=0; HAVE_ORT_CUDA=0
if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi > /dev/null 2>&1; then
  HAVE_GPU=1
  note "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
else
  note "GPU: none (nvidia-smi missing or failing): TensorRT and CUDA runs are skipped"
fi
if v=$("$PY" -c 'import tensorrt; print(tensorrt.__version__)' 2> /dev/null); then
  HAVE_TRT=1; note "tensorrt: $v"
else
  note "tensorrt: not installed (pip install 'fcpass[trt]'): fcpass build and --engine runs are skipped"
fi
if v=$("$PY" -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2> /dev/null); then
  [[ $v == *True ]] && HAVE_TORCH_CUDA=1
  note "torch: $v (version, cuda available)"
else
  note "torch: not installed"
fi
if [[ $HAVE_TRT == 1 && $HAVE_TORCH_CUDA == 0 ]]; then
  HAVE_TRT=0
  note "  -> TensorRT runs skipped: fcpass sample --engine needs torch with CUDA for device buffers"
fi
if [[ $HAVE_TRT == 1 && $HAVE_GPU == 0 ]]; then
  HAVE_TRT=0
  note "  -> TensorRT runs skipped: no GPU"
fi
if PROVIDERS=$("$PY" -c 'import onnxruntime as o; print(",".join(o.get_available_providers()))' 2> /dev/null); then
  note "onnxruntime providers: $PROVIDERS"
else
  PROVIDERS=""; note "onnxruntime: not installed (pip install 'fcpass[cpu]'): every sampling run will fail"
fi
if [[ $PROVIDERS == *CUDAExecutionProvider* && $HAVE_GPU == 1 ]]; then
  HAVE_ORT_CUDA=1
else
  note "  -> no usable CUDAExecutionProvider (pip install 'fcpass[gpu]' on a GPU machine): --provider cuda runs skipped"
fi
BACKENDS=(cpu)
[[ $HAVE_TRT == 1 ]] && BACKENDS+=(trt)
[[ $HAVE_ORT_CUDA == 1 ]] && BACKENDS+=(cuda)
note "backends to run: ${BACKENDS[*]}; $STEPS steps, ${#CLASSES[@]} digit samples$([[ $QUICK == 1 ]] && echo ' (quick)')"

# run NAME CMD...: run a step, log to $OUT/NAME.log; a failure is recorded, never fatal.
run() {
  local name=$1; shift
  if "$@" > "$OUT/$name.log" 2>&1; then
    return 0
  fi
  note "FAILED $name: $(lastline "$OUT/$name.log") (log: $OUT/$name.log)"
  FAILURES+=("$name")
  return 1
}

# build_engine NAME ONNX: a TensorRT engine $OUT/NAME.engine (timing cache shared per model).
build_engine() {
  if run "build_$1" fcpass build "$2" -o "$OUT/$1.engine" --timing-cache "$OUT/$1.timing.cache"; then
    echo "  built $OUT/$1.engine: $(head -n 1 "$OUT/build_$1.log")"
  else
    return 1
  fi
}

# suite MODEL BACKEND ORIG FC "POLICIES" [sample args...]: the original graph (plain) and the compiled
# one under each policy on BACKEND; GPU outputs compared with the CPU's; speedups from wall_seconds.
suite() {
  local m=$1 b=$2 orig=$3 fc=$4 policies=$5; shift 5
  local orig_args=() fc_args=() p tag base
  case $b in
    trt) orig_args=(--engine "$OUT/$m.engine"); fc_args=(--engine "$OUT/$m.fc.engine") ;;
    cuda) orig_args=(--provider cuda); fc_args=(--provider cuda) ;;
  esac
  echo "-- $m on $b"
  base="${m}_${b}_orig"
  if run "$base" fcpass sample "$orig" "$@" "${orig_args[@]+"${orig_args[@]}"}" \
      --out-npy "$OUT/$base.npy" --report "$OUT/$base.json"; then
    note "$m $b original: $(jget "$OUT/$base.json" wall_seconds | cut -c1-6) s"
  fi
  for p in $policies; do
    tag="${m}_${b}_$p"
    run "$tag" fcpass sample "$fc" --policy "$p" "$@" "${fc_args[@]+"${fc_args[@]}"}" \
      --out-npy "$OUT/$tag.npy" --report "$OUT/$tag.json" || continue
    local wall line
    wall=$(jget "$OUT/$tag.json" wall_seconds)
    line="$m $b $p: $(printf '%.3f' "$wall") s, $(jget "$OUT/$tag.json" macs_fraction | cut -c1-5) of the MACs"
    [[ -f $OUT/$base.json ]] && line+=", speedup vs original $(ratio "$(jget "$OUT/$base.json" wall_seconds)" "$wall")"
    [[ $p != none && -f $OUT/${m}_${b}_none.json ]] &&
      line+=", vs compiled-none $(ratio "$(jget "$OUT/${m}_${b}_none.json" wall_seconds)" "$wall")"
    if [[ $b != cpu && -f $OUT/${m}_cpu_$p.npy ]]; then
      line+="; vs CPU: $(fcpass compare "$OUT/${m}_cpu_$p.npy" "$OUT/$tag.npy" | cut -d'(' -f1)"
      line+="max|diff| $(maxdiff "$OUT/${m}_cpu_$p.npy" "$OUT/$tag.npy")"
    fi
    note "$line"
  done
  return 0
}

# model MODEL ORIG FC "POLICIES" [sample args...]: check, build engines if TensorRT, run every backend.
model() {
  local m=$1 orig=$2 fc=$3 policies=$4; shift 4
  local b ok_check=1
  echo "== $m: fcpass check --target tensorrt"
  if fcpass check "$fc" --target tensorrt; then
    note "$m: fcpass check --target tensorrt: no violations"
  else
    ok_check=0; FAILURES+=("check_$m"); note "FAILED $m: fcpass check --target tensorrt (above)"
  fi
  for b in "${BACKENDS[@]}"; do
    if [[ $b == trt ]]; then
      if [[ $ok_check == 0 ]]; then note "$m trt: skipped (the compiled graph fails the TensorRT checks)"; continue; fi
      echo "-- $m: fcpass build (TensorRT)"
      build_engine "$m" "$orig" && build_engine "$m.fc" "$fc" || { note "$m trt: skipped (build failed)"; continue; }
    fi
    suite "$m" "$b" "$orig" "$fc" "$policies" "$@"
  done
  return 0
}

# segments MODEL FC "POLICIES" [sample args...]: FC lowered to If-free segments, run on every backend
# (TensorRT: a folder of engines, with and without CUDA graphs) and compared with the If lowering on the
# same backend: outputs, and wall time (the target: segments with CUDA graphs no slower than the If graph).
segments() {
  local m=$1 fc=$2 policies=$3; shift 3
  local seg="$OUT/$m.seg" b p tag ref variant args=() variants=()
  echo "== $m: --lowering segments"
  run "lower_$m" fcpass optimize "$fc" -o "$seg" --lowering segments || return 0
  run "check_$m.seg" fcpass check "$seg" --target tensorrt && note "$m segments: $(lastline "$OUT/check_$m.seg.log")"
  for b in "${BACKENDS[@]}"; do
    case $b in
      cpu) variants=("cpu") ;;
      cuda) variants=("cuda") ;;
      trt)
        run "build_$m.seg" fcpass build "$seg" -o "$OUT/$m.engines" --timing-cache "$OUT/$m.timing.cache" || continue
        note "$m segments: $(grep -m 1 '^wrote' "$OUT/build_$m.seg.log")"
        variants=("trt" "trt-nographs") ;;
    esac
    for variant in "${variants[@]}"; do
      case $variant in
        cpu) args=() ;;
        cuda) args=(--provider cuda) ;;
        trt) args=(--engine "$OUT/$m.engines") ;;
        trt-nographs) args=(--engine "$OUT/$m.engines" --no-cuda-graphs) ;;
      esac
      for p in $policies; do
        tag="${m}_seg_${variant}_$p"; ref="$OUT/${m}_${b}_$p"
        run "$tag" fcpass sample "$seg" --policy "$p" "$@" "${args[@]+"${args[@]}"}" \
          --out-npy "$OUT/$tag.npy" --report "$OUT/$tag.json" || continue
        local line="$m segments $variant $p: $(printf '%.3f' "$(jget "$OUT/$tag.json" wall_seconds)") s"
        if [[ -f $ref.json ]]; then
          line+=", speedup vs the If lowering on $b $(ratio "$(jget "$ref.json" wall_seconds)" "$(jget "$OUT/$tag.json" wall_seconds)")"
          line+=", max|diff| vs it $(maxdiff "$ref.npy" "$OUT/$tag.npy")"
        fi
        note "$line"
      done
    done
  done
  return 0
}

echo "== digits: fcpass optimize ${CALIB[*]}"
DIGITS=models/digits/dit_digits.onnx
if run optimize_digits fcpass optimize "$DIGITS" -o "$OUT/digits.fc.onnx" "${CALIB[@]}"; then
  note "digits: $(lastline "$OUT/optimize_digits.log")"
  model digits "$DIGITS" "$OUT/digits.fc.onnx" "none fora fastcache fbcache teacache magcache" --steps "$STEPS" --class "${CLASSES[@]}"
  segments digits "$OUT/digits.fc.onnx" "none fora fastcache" --steps "$STEPS" --class "${CLASSES[@]}"
fi
# Token mechanisms: DuCa's token-level cache and FastCache's motion tokens, each on its own stack graph.
if run optimize_digits_tokens fcpass optimize "$DIGITS" -o "$OUT/digits.tok.fc.onnx" --regions stack --tokens duca; then
  model digits-tokens "$DIGITS" "$OUT/digits.tok.fc.onnx" "none duca" --steps "$STEPS" --class "${CLASSES[@]}"
fi
if run optimize_digits_motion fcpass optimize "$DIGITS" -o "$OUT/digits.motion.fc.onnx" --regions stack --motion-ratio 0.5 \
    "${CALIB[@]}"; then
  model digits-motion "$DIGITS" "$OUT/digits.motion.fc.onnx" "none fastcache:regions=stack,motion=1" --steps "$STEPS" \
    --class "${CLASSES[@]}"
fi

if [[ ${FCPASS_SMOKE_SKIP_DITS2:-0} == 1 ]]; then
  note "dit-s-2: skipped (FCPASS_SMOKE_SKIP_DITS2=1)"
else
  echo "== dit-s-2 256x256 (random weights): export, optimize"
  D2=$OUT/dit-s-2.onnx
  if run export_dits2 fcpass export --arch dit-s-2 --image-size 256 --exporter legacy -o "$D2" &&
     run optimize_dits2 fcpass optimize "$D2" -o "$OUT/dit-s-2.fc.onnx" --scheduler-config models/digits/scheduler_config.json; then
    echo "== dit-s-2: tools/bench_overhead.py (ONNX Runtime CPU: the tool has no other provider)"
    if run bench_overhead_dits2 "$PY" tools/bench_overhead.py --model "$D2" --iters "$ITERS"; then
      tail -n 4 "$OUT/bench_overhead_dits2.log"
      note "dit-s-2 bench_overhead (CPU): $(grep 'compiled / original' "$OUT/bench_overhead_dits2.log" | tr -s ' ')"
    fi
    # The same overhead (policy none) and FORA's speedup on every backend, a short run.
    model dit-s-2 "$D2" "$OUT/dit-s-2.fc.onnx" "none fora" --steps "$STEPS" --class "${DITS2_CLASSES[@]}" \
      --scheduler-config models/digits/scheduler_config.json
  fi
fi

echo
echo "== summary"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
if ((${#FAILURES[@]})); then
  echo "  ${#FAILURES[@]} step(s) failed: ${FAILURES[*]}"
  exit 1
fi
echo "  all steps that this machine can run passed"

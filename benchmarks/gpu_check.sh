#!/usr/bin/env bash
# One-GPU check of jbyz's speed, in under five minutes (after the optional pip install):
#   1. the bare-gradient floor of a grid of 64 runs of the mlp workload (Fashion-MNIST MLP
#      784-100-10, n = 10, f = 3, batch 32, ALIE, worker momentum) and the grid's throughput
#      against it for three rules (median, trimmed_mean, krum): benchmarks/floor.py, vmap over the
#      64 runs (jbyz's default off CPU);
#   2. the same for the CIFAR-10 CNN of the distributed-momentum grid (dm_cnn, n = 25, f = 11,
#      batch 50; median; a grid of GPU_CHECK_CNN_R = 8 runs);
#   3. a compact table (run-steps/s, jbyz / floor, GFLOP/s of the honest workers' gradients) and a
#      JSON file of every figure: $OUT/gpu_check.json when $OUT is set, else
#      benchmarks/results/gpu_check.json (smoke mode: gpu_check_smoke.json).
#
#   bash benchmarks/gpu_check.sh                    # on the GPU machine
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh  # tiny sizes, any backend, no pip: tests the script
#
# If `jax.default_backend()` is not "gpu", it says so and runs `pip install -U "jax[cuda12]"`
# (not in smoke mode), then stops if there is still no GPU. Datasets missing on the machine
# (Fashion-MNIST, CIFAR-10) are replaced by random stand-ins of their shapes (`--data auto`),
# which cost the same to train on; the output says when. Every step runs under `timeout`.
# Environment: PYTHON (default python), OUT, GPU_CHECK_SMOKE, GPU_CHECK_CNN_R,
# GPU_CHECK_PEAK_GFLOPS (the card's fp32 peak, for the floor's %peak column; default 0 = not shown).
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
SMOKE=${GPU_CHECK_SMOKE:-0}
CNN_R=${GPU_CHECK_CNN_R:-8}
PEAK=${GPU_CHECK_PEAK_GFLOPS:-0}
[ "$PEAK" = 0 ] && PEAK_ARG=() || PEAK_ARG=(--peak-gflops "$PEAK")
if [ -n "${OUT:-}" ]; then OUTDIR=$OUT; else OUTDIR=benchmarks/results; fi
NAME=gpu_check; [ "$SMOKE" = 1 ] && NAME=gpu_check_smoke
mkdir -p "$OUTDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
T_START=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - T_START ))s] $*"; }

INFO=$WORK/jax.txt
backend() {  # prints the backend; writes jax / jaxlib versions and the devices to $INFO
  timeout 180 "$PY" -c "import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices()); print(jax.default_backend())" \
    > "$INFO" 2>/dev/null
  tail -n 1 "$INFO"; sed -i '$d' "$INFO"
}

B=$(backend)
say "jax backend: '${B:-none}'"
if [ "$B" != gpu ]; then
  if [ "$SMOKE" = 1 ]; then
    say "smoke mode: no pip install; running the tiny sizes on '$B'"
  else
    say "the backend is '$B', not gpu: pip install -U \"jax[cuda12]\""
    timeout 600 "$PY" -m pip install -U "jax[cuda12]" || say "pip install failed (rc $?)"
    B=$(backend)
    say "jax backend after pip: '${B:-none}'"
    if [ "$B" != gpu ]; then
      say "no usable GPU: stopping (GPU_CHECK_SMOKE=1 runs the tiny sizes on any backend)"
      exit 1
    fi
  fi
fi
T0=$(date +%s)  # the five minutes count from here
command -v nvidia-smi >/dev/null && timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader > "$WORK/nvidia_smi.txt" 2>&1
say "devices: $(cat "$WORK/jax.txt")"
[ -s "$WORK/nvidia_smi.txt" ] && say "nvidia-smi: $(cat "$WORK/nvidia_smi.txt")"

if [ "$SMOKE" = 1 ]; then
  MLP=(--R 2 --steps 3 --repeats 1)
  CNN=(--R 2 --steps 1 --repeats 1 --n 3 --f 1 --batch 2)
  TO_MLP=600; TO_CNN=600
else
  MLP=(--R 64 --steps 100 --repeats 3)
  CNN=(--R "$CNN_R" --steps 10 --repeats 3)
  TO_MLP=160; TO_CNN=120  # with the start-up above: under five minutes
fi

declare -A RC SECS
step() {  # step NAME TIMEOUT CMD...
  local name=$1 to=$2; shift 2
  local t=$(date +%s)
  say "== $name (timeout ${to}s): $*"
  timeout "$to" "$@" 2>&1 | tee "$WORK/$name.log" | grep -v -e "^WARNING" -e "^I0000" -e "^W0000"
  RC[$name]=${PIPESTATUS[0]}
  SECS[$name]=$(( $(date +%s) - t ))
  say "== $name: rc ${RC[$name]} in ${SECS[$name]}s"
}

step mlp "$TO_MLP" "$PY" benchmarks/floor.py --workload mlp --rules median trimmed_mean krum \
  "${MLP[@]}" --data auto "${PEAK_ARG[@]}" --out "$WORK/floor_mlp.json" --key gpu_check
step cifar_cnn "$TO_CNN" "$PY" benchmarks/floor.py --workload cifar_cnn --rules median \
  "${CNN[@]}" --data auto "${PEAK_ARG[@]}" --out "$WORK/floor_cifar_cnn.json" --key gpu_check

T_TOTAL=$(( $(date +%s) - T0 ))
export GC_WORK=$WORK GC_OUT="$OUTDIR/$NAME.json" GC_SMOKE=$SMOKE GC_TOTAL=$T_TOTAL \
  GC_RC_MLP=${RC[mlp]} GC_RC_CNN=${RC[cifar_cnn]} GC_S_MLP=${SECS[mlp]} GC_S_CNN=${SECS[cifar_cnn]}
timeout 60 "$PY" - <<'EOF'
import datetime, json, os
from pathlib import Path

work = Path(os.environ["GC_WORK"])
read = lambda p: (work / p).read_text().strip() if (work / p).exists() else None
out = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
           smoke=os.environ["GC_SMOKE"] == "1", jax=read("jax.txt"), nvidia_smi=read("nvidia_smi.txt"),
           seconds_after_install=int(os.environ["GC_TOTAL"]), steps={}, table=[])
for name, rc, secs in (("mlp", "GC_RC_MLP", "GC_S_MLP"), ("cifar_cnn", "GC_RC_CNN", "GC_S_CNN")):
    p = work / f"floor_{name}.json"
    res = json.loads(p.read_text()).get("gpu_check") if p.exists() else None
    out["steps"][name] = dict(rc=int(os.environ[rc]), seconds=int(os.environ[secs]), floor_json=res)
    for r in (res or {}).get("rows", []):
        out["table"].append(dict(
            workload=name, shape=res.get("shape"), rule=r["rule"], R=r["R"], width=r["width"],
            steps=r["steps"], jbyz_run_steps_per_s=r["jbyz_run_steps_per_s"],
            floor_run_steps_per_s=r["floor_run_steps_per_s"],
            jbyz_over_floor=r["jbyz_run_steps_per_s"] / r["floor_run_steps_per_s"],
            jbyz_gflops=r["jbyz_gflops"], floor_gflops=r["floor_gflops"],
            compile_jbyz_s=r["compile_jbyz_s"], compile_floor_s=r["compile_floor_s"]))
Path(os.environ["GC_OUT"]).parent.mkdir(parents=True, exist_ok=True)
Path(os.environ["GC_OUT"]).write_text(json.dumps(out, indent=1))
print(f"\n{'workload':<10}{'rule':<14}{'R':>4}{'jbyz run-steps/s':>18}{'floor run-steps/s':>19}"
      f"{'jbyz/floor':>12}{'jbyz GFLOP/s':>14}{'floor GFLOP/s':>15}")
for r in out["table"]:
    print(f"{r['workload']:<10}{r['rule']:<14}{r['R']:>4}{r['jbyz_run_steps_per_s']:>18.1f}"
          f"{r['floor_run_steps_per_s']:>19.1f}{r['jbyz_over_floor']:>12.2f}{r['jbyz_gflops']:>14.1f}"
          f"{r['floor_gflops']:>15.1f}")
for name, s in out["steps"].items():
    if s["rc"]:
        print(f"{name}: FAILED or timed out (rc {s['rc']}, {s['seconds']} s); see its log above")
print(f"{out['seconds_after_install']} s after the install check"
      + (" (smoke mode: tiny sizes, not a GPU measurement)" if out["smoke"] else "")
      + f"; wrote {os.environ['GC_OUT']}")
EOF
RC_SUM=$(( RC[mlp] + RC[cifar_cnn] ))
rm -rf "$WORK"
[ "$RC_SUM" = 0 ]

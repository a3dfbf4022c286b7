#!/usr/bin/env bash
# The serving benchmarks on an accelerator, as one command: the environment, then bench.multi_tenant
# (small, large and ragged requests, capacity) and bench.rl_workload, each under its own time limit so
# that one slow part cannot starve the rest. Logs and the JSON lines land in $OUT (default bench_out/).
#
#     SUITE_PARTS="small large ragged capacity" bash bench/accelerator_suite.sh   # ~5 min on an H200
#     SUITE_PARTS=rl XLA_FLAGS=--xla_gpu_autotune_level=0 bash bench/accelerator_suite.sh   # ~5 min
#
# (The whole suite runs past a 10-minute command limit: split it as above. On a GPU a compile takes
# seconds; autotune level 0 shortens them, and affects both sides of every ratio alike.)
#
# Programs compiled by one part are reused by the next through JAX's persistent compilation cache.
# Wheels a machine lacks (pydantic on a bare CUDA image) may be carried in .whl/: they are installed into
# /tmp/site first. Run it from the repository root.
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
PARTS=${SUITE_PARTS:-"small rl large ragged capacity"}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}  # device peaks become readable
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_compilation_cache}

if [ -d .whl ] && ! "$PY" -c "import pydantic" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

"$PY" - <<'EOF' 2>&1 | tee "$OUT/environment.txt"
import importlib.metadata as md, jax
print("jax", jax.__version__, "devices", jax.devices())
for name in ("jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy", "pydantic"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
EOF

# part name, time limit (s), command
run_part() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date +%T)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - t0))s"
    grep -v "^\s*$" "$OUT/$name.log" | tail -n 4
    tail -c 3000 "$OUT/$name.json"
    echo
}

for part in $PARTS; do
    case $part in
        small) run_part small "${LIMIT_SMALL:-220}" "$PY" -m bench.multi_tenant --skip large,ragged,capacity \
            --tenants "${TENANTS:-1,2,4,8,16,32}" --repeats "${REPEATS:-3}" ;;
        rl) run_part rl "${LIMIT_RL:-290}" "$PY" -m bench.rl_workload --warmup "${WARMUP:-2}" \
            --iterations "${ITERATIONS:-3}" ;;
        large) run_part large "${LIMIT_LARGE:-60}" "$PY" -m bench.multi_tenant --skip small,ragged,capacity \
            --repeats "${REPEATS:-3}" ;;
        ragged) run_part ragged "${LIMIT_RAGGED:-60}" "$PY" -m bench.multi_tenant --skip small,large,capacity \
            --repeats "${REPEATS:-3}" ;;
        capacity) run_part capacity "${LIMIT_CAPACITY:-150}" "$PY" -m bench.multi_tenant --skip small,large,ragged \
            --repeats "${REPEATS:-3}" --capacity-rounds "${CAPACITY_ROUNDS:-2}" --trace-steps "${TRACE_STEPS:-10}" ;;
        *) echo "unknown part $part (small rl large ragged capacity)" ;;
    esac
done

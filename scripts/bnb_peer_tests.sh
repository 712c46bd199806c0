#!/usr/bin/env bash
# bitsandbytes' own tests (../shared/peer-tests/bitsandbytes: its files unchanged, MIT licence
# beside them) against the installed bitsandbytes, twice: stock (QLORA_KERNELS_BNB=0) and
# with our backend plugin. Passes when the plugin run has no failure, the same number of
# passes as the stock run, and our kernels handled calls (the report shows how many, and
# every fallback to bitsandbytes' default kernel). The files are run from where they are,
# never copied (BNB_PEER_TESTS names another checkout of them).
#
#   bash scripts/bnb_peer_tests.sh            # the CI subset below
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
# Where the project's shared folder sits: beside this checkout, or the workplace's own.
PEER=${BNB_PEER_TESTS:-}
for cand in "$ROOT/../shared/peer-tests/bitsandbytes" /work/shared/peer-tests/bitsandbytes; do
  [ -z "$PEER" ] && [ -f "$cand/tests/test_ops.py" ] && PEER=$cand
done
if [ -z "$PEER" ] || [ ! -f "$PEER/tests/test_ops.py" ]; then
  echo "bnb peer tests: bitsandbytes' test files are not at ../shared/peer-tests/bitsandbytes (set BNB_PEER_TESTS)" >&2
  exit 1
fi
OUT=${OUT:-$ROOT/bnb-peer-results}
mkdir -p "$OUT"
# bitsandbytes' CPU subset: the ops, Linear4bit, autograd, and the 4-bit and blockwise parts
# of test_functional (their own markers deselect the slow, benchmark and deprecated ones).
SELECT=(tests/test_ops.py tests/test_linear4bit.py tests/test_autograd.py
        "tests/test_functional.py::Test8BitBlockwiseQuantizeFunctional"
        "tests/test_functional.py::TestQuantize4BitFunctional")
run() {  # $1: label, $2: QLORA_KERNELS_BNB
  echo "bnb peer tests: $1 (QLORA_KERNELS_BNB=$2)"
  rm -f "$OUT/$1.json"  # a run that dies before pytest's session end writes none: never judge an old one
  # TORCHDYNAMO_DISABLE: bitsandbytes wraps its pure-torch CPU kernels in torch.compile,
  # which compiles again for every test shape (most of a stock run's time); eager torch
  # gives the same results, in both runs alike.
  (cd "$PEER" && PYTHONDONTWRITEBYTECODE=1 TORCHDYNAMO_DISABLE=1 QLORA_KERNELS_BNB=$2 QK_BNB_REPORT="$OUT/$1.json" \
     PYTHONPATH="$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}" \
     "$PY" -m pytest -q -p no:cacheprovider -p bnb_peer_report -o addopts= -o "markers=slow deprecated benchmark" \
     -m "not slow and not benchmark and not deprecated" "${SELECT[@]}" > "$OUT/$1.log" 2>&1) || true
  tail -n 1 "$OUT/$1.log"
}
run stock 0
run plugin 1
"$PY" - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
try:
    stock, plugin = (json.load(open(f"{out}/{k}.json")) for k in ("stock", "plugin"))
except FileNotFoundError as e:
    sys.exit(f"bnb peer tests: no report {e.filename}: that run died before its end (its .log says why)")
s, p = stock["outcomes"], plugin["outcomes"]
print(f"stock bitsandbytes: {s}")
print(f"with qlora-kernels: {p}")
st = plugin["plugin"]
print(f"ours: {', '.join(st['ours'])}; calls: {st['calls']}")
print(f"fallbacks to bitsandbytes' default kernels: {st['fallbacks'] or 'none'}")
# exit status 1: tests failed, judged below; any other: that run did not run through
problems = [f"the {k} run ended with pytest exit status {r['exitstatus']}"
            for k, r in (("stock", stock), ("plugin", plugin)) if r.get("exitstatus") not in (0, 1)]
if p.get("failed", 0) or p.get("error", 0):
    problems.append(f"{p.get('failed', 0)} failed, {p.get('error', 0)} errors with the plugin")
if p.get("passed", 0) != s.get("passed", 0):
    problems.append(f"passed {p.get('passed', 0)} with the plugin vs {s.get('passed', 0)} stock")
if not st["active"] or not sum(st["calls"].values()):
    problems.append("the plugin handled no call")
if problems:
    sys.exit("bnb peer tests: " + "; ".join(problems))
print("bnb peer tests: ok")
PYEOF

#!/usr/bin/env bash
# The one command for a GPU node without internet (README, "GPU"): from the repository's root, with the
# wheelhouse beside it (make wheelhouse), install perpneg3d into the node's Python without touching its torch,
# record the node's packages, then run the GPU check (nerfacc's kernel build included).
#
#   bash scripts/gpu_node.sh OUT_DIR [gpu_check options]        # PYTHON=python3 unless set
#
# OUT_DIR receives gpu_report.md/.json, node-pip-freeze.txt (it replaces gpu/node-packages.txt) and one log
# per install step: at most 8 files, so a remote run can return all of them. Exits as gpu_check does (1 when
# a check failed), or 3 when the install failed.
set -u
out=${1:?usage: bash scripts/gpu_node.sh OUT_DIR [gpu_check options]}
shift
py=${PYTHON:-python3}
mkdir -p "$out"
step() {  # name, command...: one line per step with its time, and the first error line when it fails
    local name=$1 t0
    shift
    t0=$(date +%s)
    if "$@" >"$out/$name.log" 2>&1; then
        echo "ok     $name ($(( $(date +%s) - t0 )) s)"
    else
        echo "FAILED $name ($(( $(date +%s) - t0 )) s): $(grep -m1 -E 'ERROR|[Ee]rror|conflict' "$out/$name.log" || tail -n 1 "$out/$name.log")"
        return 1
    fi
}
step install "$py" -m pip install --no-index --find-links wheelhouse -r wheelhouse/requirements.txt || exit 3
step install-nodeps "$py" -m pip install --no-index --no-deps --find-links wheelhouse -r wheelhouse/requirements-nodeps.txt || exit 3
step install-project "$py" -m pip install --no-index --no-deps --no-build-isolation -e . || exit 3
pip_check() {  # clip-anytorch is installed without its requirements on purpose (the tests read its vocabulary)
    local broken
    broken=$("$py" -m pip check 2>&1 | grep -v -e '^clip-anytorch .* requires ' -e '^No broken requirements')
    if [ -n "$broken" ]; then echo "$broken"; return 1; fi
    echo "no broken requirements"
}
step pip-check pip_check  # a requirement the node's own packages miss is named here; the check goes on
exec "$py" scripts/gpu_check.py --out "$out" "$@"

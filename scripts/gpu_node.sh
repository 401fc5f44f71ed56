#!/usr/bin/env bash
# The one command for a GPU node without internet (README, "GPU"): from the repository's root, with the
# wheelhouse beside it (make wheelhouse), install perpneg3d into the node's Python without touching its torch,
# record the node's packages, then run the GPU check (nerfacc's kernel build included), all within
# GPU_NODE_LIMIT_S seconds (570: a 10-minute call with room to spare).
#
#   bash scripts/gpu_node.sh OUT_DIR [gpu_check options]        # PYTHON=python3 unless set
#
# OUT_DIR receives gpu_report.md/.json, node-pip-freeze.txt (it replaces gpu/node-packages.txt) and one log
# per install step (pip-check, install, install-nodeps, install-project): at most 8 files, so a remote run can
# return all of them. A report is written whatever happens. Exits as gpu_check does (1 when a check failed),
# or 3 when the wheelhouse is missing or the project could not be installed.
set -u
out=${1:?usage: bash scripts/gpu_node.sh OUT_DIR [gpu_check options]}
shift
py=${PYTHON:-python3}
limit=${GPU_NODE_LIMIT_S:-570}
started=$(date +%s)
mkdir -p "$out"
rm -f "$out"/*.log "$out/gpu_report.json" "$out/gpu_report.md"

report_without_check() {  # reason: gpu_check could not run; the report says why, with each log's last lines
    "$py" - "$out" "$1" <<'EOF' || echo "could not write $out/gpu_report.json either"
import json, pathlib, sys
out, reason = pathlib.Path(sys.argv[1]), sys.argv[2]
logs = {p.stem: "\n".join(p.read_text(errors="replace").splitlines()[-80:]) for p in sorted(out.glob("*.log"))}
(out / "gpu_report.json").write_text(json.dumps(dict(failed_checks=[reason], install_logs=logs), indent=2))
(out / "gpu_report.md").write_text(f"# perpneg3d GPU check\n\n**Failed checks: 1**\n- {reason}\n")
EOF
}

if [ ! -f wheelhouse/requirements.txt ]; then
    echo "no wheelhouse in $(pwd): make it where there is network (make wheelhouse) and copy the wheelhouse/ folder next to the repository's scripts/ (README, GPU)"
    report_without_check "no wheelhouse/requirements.txt in $(pwd)"
    exit 3
fi
echo "wheelhouse: $(ls wheelhouse/*.whl 2>/dev/null | wc -l) wheels, $(du -sh wheelhouse | cut -f1)"

step() {  # name, command...: one line per step with its time, and the first error line when it fails
    local name=$1 t0
    shift
    t0=$(date +%s)
    if "$@" >>"$out/$name.log" 2>&1; then
        echo "ok     $name ($(( $(date +%s) - t0 )) s)"
    else
        echo "FAILED $name ($(( $(date +%s) - t0 )) s): $(grep -m1 -E 'ERROR|[Ee]rror|conflict' "$out/$name.log" || tail -n 1 "$out/$name.log")"
        return 1
    fi
}
pip_check() {  # clip-anytorch is installed without its requirements on purpose (the tests read its vocabulary)
    local broken
    echo "== pip check, $1"
    broken=$("$py" -m pip check 2>&1 | grep -v -e '^clip-anytorch .* requires ' -e '^No broken requirements')
    if [ -n "$broken" ]; then echo "$broken"; return 1; fi
    echo "no broken requirements"
}
# pip's resolver also checks what the node already has (torch's exact pins): an image whose own packages
# disagree makes it refuse the install, so that is looked at first, and logged
step pip-check pip_check "before the install" || echo "       the node's own packages have broken requirements (pip-check.log): the install may fall back to --no-deps"
install_all() { "$py" -m pip install --no-index --find-links wheelhouse -r wheelhouse/requirements.txt; }
install_nodeps() { "$py" -m pip install --no-index --no-deps --find-links wheelhouse -r wheelhouse/requirements.txt; }
if ! step install install_all; then
    echo "       installing the same wheels without dependency checks (--no-deps): the wheelhouse was resolved against this node's packages"
    step install install_nodeps || { report_without_check "install failed: $(tail -n 1 "$out/install.log")"; exit 3; }
fi
step install-nodeps "$py" -m pip install --no-index --no-deps --find-links wheelhouse -r wheelhouse/requirements-nodeps.txt \
    || { report_without_check "install failed: $(tail -n 1 "$out/install-nodeps.log")"; exit 3; }
step install-project "$py" -m pip install --no-index --no-deps --no-build-isolation -e . \
    || { report_without_check "install of perpneg3d failed: $(tail -n 1 "$out/install-project.log")"; exit 3; }
step pip-check pip_check "after the install"  # a requirement the node's own packages miss is named here; the check goes on
# what is left of the limit, less gpu_check's grace for a section past its budget (15 s) and its start and end
budget=$(( limit - ($(date +%s) - started) - 35 ))
case " $* " in *" --budget-s "*) budget_args=() ;; *) budget_args=(--budget-s "$budget") ;; esac
"$py" scripts/gpu_check.py --out "$out" "${budget_args[@]}" "$@"
code=$?
[ -f "$out/gpu_report.json" ] || report_without_check "gpu_check exited $code without a report (see its output)"
exit $code

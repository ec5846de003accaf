#!/usr/bin/env bash
# Build (or bring up to date) the project's virtual environment.
#   tools/setup_env.sh PYTHON VENV [SYSTEM_SITE_PACKAGES]
# The environment is trusted only once VENV/.ready exists; it is written last. An environment
# without it (set-up interrupted, or failed) is deleted and built again from scratch.
set -euo pipefail

python=${1:-python3}
venv=${2:-.venv}
system_site=${3:-0}
ready="$venv/.ready"
root=$(cd "$(dirname "$0")/.." && pwd)

current="starting"
step() { current=$*; printf '\n==> %s\n' "$*"; }
# Every failure names the step it stopped at (the command's own message is printed above it).
failed() {
    printf '\nsetup_env.sh: FAILED (exit %s) at step "%s". %s is incomplete: the next run\n' \
        "$1" "$current" "$venv" >&2
    printf 'deletes it and builds it again.\n' >&2
}
trap 'failed $?' ERR

if [ -d "$venv" ] && [ ! -f "$ready" ]; then
    step "removing $venv: its last set-up did not finish"
    rm -rf "$venv"
fi
rm -f "$ready"

if [ ! -x "$venv/bin/python" ]; then
    step "creating $venv with $($python --version 2>&1)"
    args=()
    if [ "$system_site" = 1 ]; then args+=(--system-site-packages); fi
    "$python" -m venv "${args[@]}" "$venv"
fi
py="$venv/bin/python"

step "installing the pinned stack (requirements/constraints.txt)"
"$py" -m pip install --quiet --disable-pip-version-check \
    -c "$root/requirements/constraints.txt" -r "$root/requirements/dev.txt"

"$py" -m pip install --quiet --disable-pip-version-check --no-deps \
    -c "$root/requirements/constraints.txt" -r "$root/requirements/no-deps.txt"

step "provisioning Detectron2"
"$py" "$root/tools/provision_detectron2.py" --python "$py"

step "installing nl_detectron (editable)"
"$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$root"

step "checking the environment"
"$py" - <<'PY'
import detectron2, torch, torchvision
import nl_detectron  # noqa: F401  (registers the project's components)
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"detectron2 {detectron2.__version__}: environment ready")
PY
touch "$ready"

#!/usr/bin/env bash
# ansible-test sanity on the collection as users get it: build the tarball, install it into a
# throwaway ansible_collections tree (ansible-test must run from <root>/ansible_collections/<ns>/<name>)
# and test that. ansible-test keeps its per-test venvs under .cache/ansible-test (reused by later runs).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
bin="$top/.venv/bin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$bin/ansible-galaxy" collection build --force --output-path "$work" "$top" >/dev/null
# --force: the checkout itself counts as an installed copy of this version (ansible.cfg's collections_path).
"$bin/ansible-galaxy" collection install --force --no-deps --offline -p "$work/ansible_collections" "$work"/esp32_fleet-mqtt_fleet-*.tar.gz >/dev/null

# ansible-test bootstraps pip in each venv with a script from a host this machine cannot reach; it
# looks for a cached copy first. scripts/ansible-test-get-pip.py is that stand-in (see its docstring).
home="$top/.cache/ansible-test"
cache="$home/.ansible/test/cache"
reqs=$("$bin/python" -c 'import ansible_test, os; print(os.path.dirname(ansible_test.__file__))')/_internal/python_requirements.py
pip_version=$(grep -oP "pip='\K[0-9.]+" "$reqs" | head -n 1)
mkdir -p "$cache/bootstrap-pip"
ln -sfn "$("$bin/python" -c 'import os, pip; print(os.path.dirname(pip.__file__))')" "$cache/bootstrap-pip/pip"
cp "$top/scripts/ansible-test-get-pip.py" "$cache/get_pip_${pip_version//./_}.py"

cd "$work/ansible_collections/esp32_fleet/mqtt_fleet"
HOME="$home" PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME/.cache/pip}" \
  "$bin/ansible-test" sanity --python 3.11 --color no "$@"

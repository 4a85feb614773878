"""Offline stand-in for ansible-test's pip bootstrap script (get-pip.py from ci-files.testing.ansible.com,
a host this machine cannot reach; PyPI itself is reachable).

ansible-test creates each sanity venv without pip and runs its cached bootstrap script under the NEW
venv's interpreter with pip's own arguments (e.g. `pip==24.2 --no-setuptools --no-wheel`). get-pip.py
carries a zipped pip and runs `pip install <args>`; this runs the pip package of the interpreter that
made the tests' .venv (the directory `bootstrap-pip` beside this file holds only a `pip` link to it; the
environment is cleared, so nothing else can say where it is), which installs into the interpreter
running it: the new venv. `make sanity` puts both where ansible-test caches its bootstrap script.
"""

import os
import runpy
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap-pip"))
# get-pip's own flags: it would otherwise add setuptools and wheel; this never does.
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.argv = ["pip", "install", *args]
runpy.run_module("pip", run_name="__main__", alter_sys=True)

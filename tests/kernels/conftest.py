"""Triton kernel tests run on the CPU through the interpreter.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels (the decorator picks the
interpreter then), so it is set here, at conftest import; kernel modules imported earlier by other
test folders are reloaded so their kernels are re-decorated for the interpreter.
"""
import importlib
import os
import sys

if os.environ.get("FASTADAPTERS_TEST_GPU_RUN") != "1":  # see tests/conftest.py: `-m gpu` runs real kernels
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

for _name in ("fastadapters.kernels._common", "fastadapters.kernels.lora", "fastadapters.kernels.lora_group",
              "fastadapters.kernels.bottleneck", "fastadapters.kernels.multi"):
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])

import json  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

# ---------------------------------------------------------------------------------------------
# offline compilation for test_triton_compile.py
# ---------------------------------------------------------------------------------------------
# The interpreter's kernels cannot be compiled, so the compiles run in a subprocess without
# TRITON_INTERPRET. It is started when collection finishes (if the compile tests were collected)
# and the compile tests are moved to the end of the run, so on two cores it overlaps the
# interpreter tests; the `compile_reports` fixture waits for it.

from kernel_checks import COMPILE_JOBS, COMPILE_MODULES  # noqa: E402

# names in the jobs are "module:spec"; compile_report takes the spec part per module
_COMPILE_CODE = """
import json, sys
from fastadapters.kernels._common import compile_report
out = []
for mods, dtype, cc, names in json.loads(sys.argv[1]):
    for mod in mods:
        short = mod.rsplit('.', 1)[-1]
        want = None if names is None else [n.split(':', 1)[1] for n in names if n.split(':', 1)[0] == short]
        if want is None or want:
            out += compile_report([mod], dtype, cc, want)
print('REPORT' + json.dumps(out))
"""
_compile_proc = None


def _start_compiles():
    global _compile_proc
    if _compile_proc is None:
        jobs = [[COMPILE_MODULES, dtype, cc, names] for dtype, cc, names in COMPILE_JOBS]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        _compile_proc = subprocess.Popen([sys.executable, "-c", _COMPILE_CODE, json.dumps(jobs)], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _compile_proc


def pytest_collection_modifyitems(session, config, items):
    # the compile checks wait for the subprocess: run them last so it overlaps everything else
    compile_items = [it for it in items if it.path.name == "test_triton_compile.py"]
    if compile_items:
        rest = [it for it in items if it.path.name != "test_triton_compile.py"]
        items[:] = rest + compile_items


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    if any(item.path.name == "test_triton_compile.py" for item in session.items):
        _start_compiles()


@pytest.fixture(scope="session")
def compile_reports():
    """{(name, dtype, cc): report dict} from `_common.compile_report` for every shipped spec."""
    proc = _start_compiles()
    stdout, stderr = proc.communicate(timeout=1200)
    line = [ln for ln in stdout.splitlines() if ln.startswith("REPORT")]
    assert proc.returncode == 0 and line, f"compile subprocess failed:\n{stderr[-3000:]}"
    return {(r["name"], r["dtype"], r["cc"]): r for r in json.loads(line[-1][len("REPORT"):])}

"""The C++ CPU kernels on inputs outside the happy path: NaN, allocation failures, out-of-range indices, mixed dtypes.

Helpers of csrc/ are also compiled here on their own with the undefined-behaviour sanitizer (a C++ compiler is
needed, as for the build), so undefined behaviour fails a test instead of passing by luck.
"""

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def run_sanitized(tmp_path, source: str, *extra_sources: str) -> str:
    """Compiles `source` (a C++ main) with csrc/ on the include path and UBSan, runs it; returns its stdout."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler (needed to build the extension too)")
    main = tmp_path / "main.cpp"
    main.write_text(textwrap.dedent(source))
    binary = tmp_path / "main"
    flags = ["-std=c++17", "-O1", "-fopenmp", "-fsanitize=undefined,float-cast-overflow",
             "-fno-sanitize-recover=all", f"-I{CSRC}"]
    subprocess.run([compiler, *flags, str(main), *(str(CSRC / s) for s in extra_sources), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    return done.stdout


# ---- the fast exp ------------------------------------------------------------------------------------------

def test_exp_le0_is_defined_for_nan_and_accurate(tmp_path):
    out = run_sanitized(tmp_path, """
        #include <cstdio>
        #include "common.h"
        int main() {
          volatile float nan = std::numeric_limits<float>::quiet_NaN();
          std::printf("nan %d\\n", headkv::exp_le0(nan) != headkv::exp_le0(nan));
          std::printf("-inf %g\\n", headkv::exp_le0(-std::numeric_limits<float>::infinity()));
          std::printf("-100 %g\\n", headkv::exp_le0(-100.f));
          double worst = 0;
          for (int i = 0; i <= 86000; ++i) {
            volatile float x = -i * 1e-3f;
            const double want = std::exp(static_cast<double>(x));
            worst = std::max(worst, std::abs(headkv::exp_le0(x) - want) / want);
          }
          std::printf("rel %g\\n", worst);
        }
    """)
    got = dict(line.split() for line in out.splitlines())
    assert got["nan"] == "1", "exp_le0(NaN) must be NaN"
    assert float(got["-inf"]) == 0.0 and float(got["-100"]) == 0.0
    assert float(got["rel"]) < 5e-7

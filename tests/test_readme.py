"""The README's quick start runs as written: its ```python blocks, in order, in one fresh Python
process without the test suite's float64 setting, as a user pasting them would run them."""
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

# Runs the blocks one by one in one namespace and names the block that fails.
RUNNER = """
import re, sys
blocks = re.findall(r"```python\\n(.*?)```", open(sys.argv[1]).read(), flags=re.DOTALL)
namespace = {}
for index, block in enumerate(blocks):
    try:
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    except Exception:
        print(f"README python block {index} fails:\\n{block}", file=sys.stderr)
        raise
"""


def test_quick_start_runs():
    assert re.search(r"```python\n", README.read_text()), "the README has no ```python block"
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    done = subprocess.run([sys.executable, "-c", RUNNER, str(README)], capture_output=True,
                          text=True, env={**env, "MPLBACKEND": "Agg"}, timeout=600,
                          cwd=README.parent)
    assert done.returncode == 0, done.stderr[-4000:]

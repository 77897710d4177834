"""The README's quick start runs as written: its ```python blocks, in order, in one namespace."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_quick_start_runs():
    blocks = python_blocks(README.read_text())
    assert blocks, "the README has no ```python block"
    namespace: dict = {}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {index}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README python block {index} fails:\n{block}") from error

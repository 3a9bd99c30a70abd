"""The README's Python example runs as printed and shows what it claims."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_setup_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_readme_python_example_runs_and_the_midpoint_works(capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 16
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    from neuralign.train import evaluate

    mid = namespace["interpolate"](namespace["a"], namespace["b_aligned"], 0.5)
    assert evaluate(mid, namespace["data"].loader("test"))["accuracy"] > 0.85

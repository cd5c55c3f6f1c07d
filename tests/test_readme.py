"""README's Python example runs as written."""

import re
from pathlib import Path

import torch


def test_readme_python_example_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["identity"].shape == (1, 16, 32)
    assert scope["noise_pred"].shape == (1, 4, 16, 16) and torch.isfinite(scope["noise_pred"]).all()

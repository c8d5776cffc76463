"""Every python snippet in the README runs (in order, in one namespace)."""

import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_snippets_run():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert (namespace["y_int"] == namespace["y_train"]).all()

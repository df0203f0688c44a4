"""The README's Python example is part of the contract: run it as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    images = namespace["images"]
    assert images.shape == (8, 2) and images.isfinite().all()
    assert namespace["student"].steps_set == (1, 2, 4)


def test_readme_names_the_two_setup_commands_ci_runs():
    text = README.read_text()
    assert "bash run.sh demo" in text and "bash run.sh test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash run.sh test" in ci

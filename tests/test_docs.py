"""The examples in docs/extending.md run as written, in a fresh process (they register
blueprints and reward families process-wide)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_extending_guide_examples_run_in_order(tmp_path: Path) -> None:
    guide = ROOT / "docs" / "extending.md"
    blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 5, "the guide has an example per section"
    script = tmp_path / "extending_examples.py"
    script.write_text("\n\n".join(blocks))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "channel_scale parameters per env:" in result.stdout and "return" in result.stdout

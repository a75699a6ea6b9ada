"""Print the N-th command of README.md's opening code blocks (1-based)."""

import re
import sys
from pathlib import Path

readme = Path(__file__).resolve().parent.parent / "README.md"
blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme.read_text(), flags=re.S)
commands = [line for b in blocks for line in b.splitlines() if line.strip() and not line.lstrip().startswith("#")]
print(commands[int(sys.argv[1]) - 1])

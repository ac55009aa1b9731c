"""Build edgemoe/data/calibration.txt, the default calibration text, from what every Python
installation has: English documentation prose (pydoc_data.topics) and standard-library code.

    python scripts/make_calibration_text.py
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from pydoc_data import topics

OUT = Path(__file__).resolve().parents[1] / "edgemoe" / "data" / "calibration.txt"
PROSE_CHARS = 40_000
CODE_FILES = ("textwrap.py", "heapq.py", "bisect.py")


def main() -> None:
    prose = []
    for key in sorted(topics.topics):
        prose.append(topics.topics[key].strip())
        if sum(map(len, prose)) > PROSE_CHARS:
            break
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [(stdlib / name).read_text(encoding="utf-8") for name in CODE_FILES]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n\n".join(prose + code), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()

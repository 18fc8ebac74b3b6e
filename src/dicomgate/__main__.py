from __future__ import annotations

from dicomgate.cli import main

main()

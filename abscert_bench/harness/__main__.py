"""`python -m abscert_bench.harness run SPEC …` — the harness verbs without the main CLI."""
import sys

from .cli import main

sys.exit(main())

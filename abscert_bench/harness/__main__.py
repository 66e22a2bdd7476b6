"""`python -m abscert_bench.harness run SPEC …` — same as `abscert-bench run SPEC …`."""
import sys

from .cli import main

sys.exit(main())

"""`python -m ldm_core ...`: the command-line interface (see ldm_core.cli)."""

from .threads import prepare_process, thread_policy

prepare_process(thread_policy(None))  # OpenMP's wait policy, read once when torch loads (ldm_core.threads)

from .cli import main  # noqa: E402

raise SystemExit(main())

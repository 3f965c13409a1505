"""`python -m latent_merge_nnsight.cli ...`: the same as `lmn ...`."""

from latent_merge_nnsight.cli import main

raise SystemExit(main())

"""`lmn serve` whose decode steps are logged (and may be slowed), for the per-request and streaming tests.

    python tests/serve_steps.py LOG DELAY_S serve SYSTEM.yaml --port N ...

Every choice of next tokens (`Run.choose_next`, once per decode step of every engine) sleeps DELAY_S
first and then appends "<time.time()> <rows in the step>" to LOG, so a test can see how many rows shared
a step and compare when a token was chosen with when its chunk arrived.
"""

import sys
import time

from latent_merge_nnsight import cli
from latent_merge_nnsight.generation.loop import Run


def main() -> int:
    log, delay, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    chosen = Run.choose_next

    def slow_logged(self, logits, source_logits, rows):
        time.sleep(delay)
        out = chosen(self, logits, source_logits, rows)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{time.time()} {len(rows)}\n")
        return out

    Run.choose_next = slow_logged
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())

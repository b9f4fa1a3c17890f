"""`glmctl ARGS...` with every scored evaluation batch followed by a pause of DELAY seconds, so a
test can kill the run between batches:  python slow_evaluate.py DELAY evaluate MODEL TASK ..."""
import sys
import time

from glmctl import cli
from glmctl.evaluation import scoring

delay = float(sys.argv[1])
score_batch = scoring.run_batch


def slow_batch(*args, **kwargs):
    out = score_batch(*args, **kwargs)
    time.sleep(delay)
    return out


scoring.run_batch = slow_batch
cli.main(sys.argv[2:])

"""`glmctl ARGS...` whose model opening waits until the file GATE exists, so a test can talk to a
server that is still loading:  python gated_serve_load.py GATE serve MODEL ..."""
import sys
import time
from pathlib import Path

from glmctl import cli
from glmctl.stages import serve

gate = Path(sys.argv[1])
open_model = serve.open_model


def gated_open_model(*args, **kwargs):
    while not gate.exists():
        time.sleep(0.05)
    return open_model(*args, **kwargs)


serve.open_model = gated_open_model
cli.main(sys.argv[2:])

"""`glmctl ARGS` that hangs once N chunks are written, so a test can kill -9 it mid-run.

    python tests/scripts/tokenize_pause.py N tokenize CORPUS --tokenizer T --out OUT ...

Patches glmctl.shards.ShardWriter.add: after the N-th chunk has been added, prints
"glmctl-test: paused after N chunks" on stderr and sleeps until killed.
"""
import sys
import time

from glmctl import shards
from glmctl.cli import main


def pause_after(n: int) -> None:
    real_add, calls = shards.ShardWriter.add, [0]

    def add(self, *args, **kwargs):
        written = real_add(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            print(f"glmctl-test: paused after {n} chunks", file=sys.stderr, flush=True)
            while True:
                time.sleep(60)
        return written

    shards.ShardWriter.add = add


if __name__ == "__main__":
    pause_after(int(sys.argv[1]))
    main(sys.argv[2:])

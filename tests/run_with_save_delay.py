"""``python tests/run_with_save_delay.py SECONDS ARGS...``: ``python -m llmprune ARGS...`` with a
pause of SECONDS after each step of the save (llmprune.save.AFTER_SAVE_STEP), so that a test can
kill the process at chosen points inside the save."""

import sys
import time

import llmprune.save
from llmprune.__main__ import main

if __name__ == "__main__":
    delay = float(sys.argv[1])
    llmprune.save.AFTER_SAVE_STEP = lambda: time.sleep(delay)
    sys.exit(main(sys.argv[2:]))

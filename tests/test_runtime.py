"""Process-level helpers: the progress bars' switches."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# tqdm reads its TQDM_* switches when it is imported, so each setting is read in a fresh interpreter.
BARS = (
    "from types import SimpleNamespace as Process; from transformers_language.runtime import progress_bar; "
    "print(progress_bar(Process(is_local_main_process=True), []).disable, "
    "progress_bar(Process(is_local_main_process=False), []).disable)"
)


def test_the_main_process_bar_follows_tqdms_switch_and_the_others_never_show():
    shown = {}
    for switch in (None, "1"):
        env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
        env |= {"TQDM_DISABLE": switch} if switch else {}
        done = subprocess.run([sys.executable, "-c", BARS], cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        shown[switch] = done.stdout.split()
    assert shown == {None: ["False", "True"], "1": ["True", "True"]}  # (main disabled, other disabled)

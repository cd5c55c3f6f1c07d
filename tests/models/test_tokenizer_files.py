"""Building SD1.5's tokenizer offline leaves no temporary folder behind."""

import os
import subprocess
import sys


def test_no_tokenizer_folder_is_left_in_tmp(tmp_path):
    code = ("from fact_lightning.models.tokenizer import clip_tokenizer_from_open_clip as c; "
            "a, b = c(), c(); assert a is not b; print(a('a photo of').input_ids)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[49406, 320, 1125, 539, 49407]"
    assert list(tmp_path.iterdir()) == []

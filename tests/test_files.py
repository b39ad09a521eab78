"""utils/files.py: atomic writes and quiet downloads."""
import json
import os
import signal

import numpy as np
import pytest

from utils.files import atomic_write, copy_atomic, interrupts_deferred, quiet_output, write_json_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "weights.npy"
    with atomic_write(path) as f:
        np.save(f, np.arange(3))
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path) as f:
            f.write(b"half a file")
            raise RuntimeError("disk full")
    assert np.load(path).tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.npy"]


def test_json_and_copies_are_whole_files_with_the_usual_permissions(tmp_path):
    write_json_atomic(tmp_path / "results.json", {"status": "completed"})
    assert json.loads((tmp_path / "results.json").read_text()) == {"status": "completed"}
    copy_atomic(tmp_path / "results.json", tmp_path / "copy.json")
    assert (tmp_path / "copy.json").read_bytes() == (tmp_path / "results.json").read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "copy.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_signal_during_the_write_waits_for_the_rename(tmp_path):
    path = tmp_path / "checkpoint"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as f:
            os.kill(os.getpid(), signal.SIGINT)    # held until the file is in place
            f.write(b"complete")
    assert path.read_bytes() == b"complete"
    with interrupts_deferred():
        pass                                        # nothing received: nothing raised


def test_quiet_output_swallows_prints(capsys):
    with quiet_output():
        print("Downloading https://...")
    print("kept")
    assert capsys.readouterr().out == "kept\n"

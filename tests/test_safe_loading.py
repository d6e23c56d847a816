"""Checkpoints are data, never programs: every raydist command reads them with torch.load(weights_only=True).

A crafted file whose unpickling would run code (here: write a marker file) is refused in one line with exit 2
by `raydist eval`, `raydist train --resume` and `read_checkpoint`, and the code never runs; broken files
(empty, truncated, a directory, not a checkpoint) are one line naming the file too.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_job, write_job

from raydist.cli import main
from raydist.models import create_model, save_checkpoint
from raydist.models.checkpoint import CheckpointError, read_checkpoint


class _RunsCode:
    """Unpickling this calls exec(): what a malicious checkpoint from the internet would do."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _evil(path, marker, **fields) -> None:
    """A file that looks like a raydist checkpoint (format, epsilon, train_state) with a payload inside."""
    model = create_model("resnet18", num_classes=10, width=4, in_channels=1)
    state = {k: v for k, v in model.state_dict().items()}
    torch.save({"format": "raydist/1", "model": dict(model.spec), "state_dict": state, "epsilon": 8 / 255,
                "epoch": 1, "payload": _RunsCode(marker), **fields}, path)


def test_the_crafted_file_would_run_code_if_unpickled(tmp_path):
    """The control: the payload works, so the refusals below are what keeps it from running."""
    marker = tmp_path / "ran.txt"
    _evil(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("eps_flag", [[], ["--eps", "8/255"]], ids=["eps-from-file", "eps-given"])
def test_eval_refuses_a_checkpoint_that_would_run_code(tmp_path, capsys, eps_flag):
    marker = tmp_path / "ran.txt"
    evil = tmp_path / "downloaded.pt"
    _evil(evil, marker)
    assert main(["eval", str(evil), "--attacks", "clean", "--out", str(tmp_path / "ev"), *eps_flag]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(evil) in err and "refused" in err and "exec" in err, err
    assert not marker.exists()
    assert not (tmp_path / "ev").exists()


def test_resume_refuses_a_last_pt_that_would_run_code(tmp_path, capsys):
    job = tiny_job(tmp_path)
    path = write_job(tmp_path, job)
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    marker = tmp_path / "ran.txt"
    _evil(run_dir / "last.pt", marker, train_state={"epoch": 1})
    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err and "refused" in err and str(run_dir / "last.pt") in err, err
    assert not marker.exists()


def test_broken_files_are_one_line_naming_them(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", create_model("resnet18", num_classes=10, width=4, in_channels=1),
                           epoch=3, epsilon=0.1)
    assert read_checkpoint(good)["epoch"] == 3
    data = good.read_bytes()
    cases = {
        "empty.pt": (b"", "empty"),
        "truncated.pt": (data[: len(data) // 2], "truncated or corrupted"),
        "junk.pt": (bytes(range(256)) * 8, "cannot read checkpoint"),
    }
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "dir.pt").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    cases.update({"dir.pt": (None, "is a directory"), "foreign.pt": (None, "is not a raydist checkpoint"),
                  "missing.pt": (None, "not found")})
    for name, (_, needle) in cases.items():
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(tmp_path / name)
        msg = str(info.value)
        assert needle in msg and str(tmp_path / name) in msg and "\n" not in msg, (name, msg)
    with pytest.raises(CheckpointError, match="lacks train_state"):
        read_checkpoint(good, require=("train_state",))

"""WiSE-FT: interpolating a fine-tuned checkpoint with its zero-shot model."""

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from otclip.engine import load_model
from otclip.engine.model_loading import ModelIdentity
from otclip.training.wise_ft import interpolate


def tiny(weight: float, width: int = 3):
    model = torch.nn.Linear(width, 2)
    torch.nn.init.constant_(model.weight, weight)
    model.register_buffer("steps", torch.tensor(7))
    return SimpleNamespace(model=model, identity=ModelIdentity(f"m{weight}", "x"))


def test_interpolation_is_linear_in_the_floating_weights_only():
    for alpha, expected in ((0.0, 1.0), (0.25, 1.5), (1.0, 3.0)):
        merged = interpolate(tiny(1.0), tiny(3.0), alpha).model
        assert torch.allclose(merged.weight, torch.full((2, 3), expected))
        assert int(merged.steps) == 7
    with pytest.raises(ValueError, match="different architectures"):
        interpolate(tiny(1.0, width=4), tiny(3.0), 0.5)
    with pytest.raises(ValueError, match="--alpha 1.5"):
        interpolate(tiny(1.0), tiny(3.0), 1.5)


@pytest.mark.slow
def test_cli_writes_a_checkpoint_between_the_run_and_its_starting_model(small_corpus, tmp_path, capsys, default_model):
    from otclip.main import main
    from otclip.training.trainer import TrainConfig, Trainer

    run = tmp_path / "run"
    Trainer(TrainConfig(corpus=str(small_corpus), out=str(run), steps=30, batch_size=32, eval_every=30, lr=1e-2),
            progress=False).train()
    out = tmp_path / "wise.pt"
    done = subprocess.run([sys.executable, "-m", "otclip", "wise-ft", str(run / "best.pt"), "--alpha", "0.25",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    merged_model = load_model(str(out), device="cpu")
    start, tuned, merged = (default_model.model.state_dict(), load_model(str(run / "best.pt"), device="cpu").model
                            .state_dict(), merged_model.model.state_dict())  # the fixture: effnet-minilm, unchanged
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], tuned[k])]
    assert moved  # training changed the heads
    for k in moved:
        assert torch.allclose(merged[k], 0.75 * start[k] + 0.25 * tuned[k], atol=1e-6)
    assert merged_model.identity.name.startswith("effnet-minilm-wise0.25@")
    bad = subprocess.run([sys.executable, "-m", "otclip", "wise-ft", str(small_corpus / "train.jsonl"), "--out",
                          str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "train.jsonl: cannot read as a checkpoint (not a file torch.save wrote)" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1  # not torch's paragraphs, nor a traceback
    capsys.readouterr()  # a refused --alpha is the command's own check: in process (the process boundary is above)
    assert main(["wise-ft", str(run / "missing.pt"), "--alpha", "1.5", "--out", str(tmp_path / "x.pt")]) == 2
    assert capsys.readouterr().err.strip() == "otclip wise-ft: --alpha 1.5: must be in [0, 1]"


def test_the_model_a_run_started_from_is_found_from_any_folder_and_checked(small_corpus, tmp_path, monkeypatch,
                                                                          default_model):
    """A run fine-tuned from `--model base.pt` (a path relative to where it ran) had recorded only that path, so
    `wise-ft` from another folder could not find it (or found another file of that name); the run now records the
    absolute path and the weights' checksum, and refuses weights changed since."""
    from otclip.engine import save_checkpoint
    from otclip.training.trainer import TrainConfig, Trainer
    from otclip.training.wise_ft import wise_ft

    project = tmp_path / "project"
    base = save_checkpoint(default_model, project / "base.pt", name="base")
    monkeypatch.chdir(project)
    Trainer(TrainConfig(corpus=str(small_corpus), out="run", model="base.pt", steps=4, batch_size=16, eval_every=4,
                        lr=1e-2), progress=False).train()
    monkeypatch.chdir(tmp_path)
    out = wise_ft(project / "run" / "best.pt", 0.5, tmp_path / "wise.pt")
    start, tuned, merged = (load_model(str(m), device="cpu").model.state_dict() for m in (base, project / "run" /
                                                                                        "best.pt", out))
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], tuned[k])]
    assert moved
    for k in moved:
        assert torch.allclose(merged[k], 0.5 * start[k] + 0.5 * tuned[k], atol=1e-6)
    changed = copy.deepcopy(default_model)  # not the shared model itself
    with torch.no_grad():
        next(p for p in changed.model.parameters() if p.is_floating_point()).add_(1.0)
    save_checkpoint(changed, base, name="base")  # the same path, other weights
    with pytest.raises(ValueError, match="best.pt: the model it was fine-tuned from, .*base.pt, has other weights"):
        wise_ft(project / "run" / "best.pt", 0.5, tmp_path / "wise2.pt")

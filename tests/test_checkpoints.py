"""Checkpoint files: what a file torch cannot read is said to be, what a checkpoint holds,
and a misfit said in one line with the full list in a file."""
import pickle
import zipfile

import pytest
import torch

from rein.checkpoints import CheckpointError, checkpoint_kind, load_tensors, misfit


def _truncated(path, data: bytes):
    path.write_bytes(data[: len(data) // 2])
    return path


def test_files_torch_cannot_read_say_what_they_are(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"blocks.0.norm1.weight": torch.ones(4)}, good)
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(4)}, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "notes.txt").write_text("this is not a checkpoint")
    (tmp_path / "empty.pth").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as z:
        z.writestr("a.txt", "hello")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"w": [1.0, 2.0]}, f, protocol=4)
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "scripted.pt"))
    cases = {
        tmp_path / "notes.txt": "is not a PyTorch checkpoint file",
        tmp_path / "plain.pkl": "is not a PyTorch checkpoint file",
        tmp_path / "empty.pth": "is empty, not a PyTorch checkpoint file",
        tmp_path / "images.zip": "is a zip archive, not a PyTorch checkpoint file",
        _truncated(tmp_path / "cut.pth", good.read_bytes()): "is truncated or corrupt (download or save it again)",
        _truncated(tmp_path / "cut_legacy.pth", legacy.read_bytes()): "is truncated or corrupt (download or save "
                                                                        "it again)",
        tmp_path / "scripted.pt": "is a TorchScript archive, which is not read (loading it runs its code): save "
                                  "torch.jit.load(it, map_location='cpu').state_dict() with torch.save and pass that",
    }
    for path, says in cases.items():
        with pytest.raises(CheckpointError) as e:
            load_tensors(path)
        assert str(e.value) == f"{path} {says}"
    assert torch.equal(load_tensors(good)["blocks.0.norm1.weight"], torch.ones(4))
    assert torch.equal(load_tensors(legacy)["w"], torch.ones(4))


def test_what_a_checkpoint_holds():
    t = torch.zeros(2)
    assert checkpoint_kind({"config": {}, "rein": {}, "head": {}, "optimizer": {}}) == "rein.train"
    assert checkpoint_kind({"meta": {}, "state_dict": {"backbone.reins.scale": t, "decode_head.x": t}}) == "official"
    assert checkpoint_kind({"model": {"module.blocks.0.norm1.weight": t}}) == "backbone"  # wrapped, DDP prefix
    assert checkpoint_kind({"visual.conv1.weight": t}) == "backbone"  # OpenAI CLIP
    assert checkpoint_kind({"stages.0.blocks.0.conv_dw.weight": t}) == "backbone"  # ConvNeXt
    assert checkpoint_kind({"fc.weight": t}) is None and checkpoint_kind([t]) is None


def test_misfit_is_one_line_and_the_full_list_is_in_a_file():
    model = {f"blocks.{i}.w": torch.zeros(4) for i in range(40)} | {"norm.w": torch.zeros(4)}
    state = {f"blocks.{i}.w": torch.zeros(8) for i in range(40)} | {"extra.w": torch.zeros(1)}
    line = misfit(state, model)
    assert line.startswith("missing keys (1): norm.w; unexpected keys (1): extra.w; keys of another shape (40): "
                           "blocks.0.w: file (8,) vs model (4,), blocks.1.w: file (8,) vs model (4,), "
                           "blocks.10.w: file (8,) vs model (4,) (+37 more); all listed in ")
    assert "\n" not in line and len(line) < 300
    listed = open(line.rsplit("all listed in ", 1)[1]).read().splitlines()
    assert listed[0] == "# missing keys (1)" and "# keys of another shape (40)" in listed
    assert "blocks.39.w: file (8,) vs model (4,)" in listed and len(listed) == 3 + 1 + 1 + 40
    assert misfit(model, model) == ""
    assert "all listed in" not in misfit({"a": torch.zeros(1)}, {"b": torch.zeros(1)})  # nothing cut short

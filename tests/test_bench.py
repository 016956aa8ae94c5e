"""The bench suite cannot rot: its files run once (``--benchmark-disable``, smoke sizes, the tiny
preset, a cheap torch.compile backend) with every guard active, the fallback runner writes the same
JSON, and bench.report turns a known JSON into the expected table."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import report

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path, **extra):
    env = dict(os.environ, FASTDDPM_BENCH_SIZE="smoke", FASTDDPM_BENCH_COMPILE_BACKEND="eager",
               FASTDDPM_BENCH_LOG=str(tmp_path / "log.jsonl"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               FASTDDPM_CACHE=str(tmp_path / "cache"), **extra)
    env.pop("FASTDDPM_GIT_COMMIT", None)
    return env


def _logged(tmp_path):
    return [json.loads(line)["extra_info"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]


def test_bench_files_run_with_the_guard(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider",
                           "--benchmark-disable"], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    infos = _logged(tmp_path)
    seen = {(i["workload"], i["impl"], i["dtype"]) for i in infos}
    for workload in ("train_step", "sampling", "groupnorm_gelu", "reverse_step"):
        for impl in ("eager", "compiled", "fast"):
            for dtype in ("fp32", "fp16", "bf16"):  # the smoke size's model-level Triton paths: bf16 only
                whole_model = workload in ("train_step", "sampling") and impl == "fast"
                case = (workload, impl, dtype)
                assert (case in seen) == (dtype == "bf16" or not whole_model), case
    guarded = [i for i in infos if i["impl"] != "eager"]
    assert guarded and all(i["guard"]["value"] <= i["guard"]["tol"] for i in guarded)
    assert all(i["seconds"] is None and i["peak_bf16_tflops"] is None for i in infos)  # untimed, CPU
    # the batch sweep (bench/test_train_batch.py): every batch of the size, eager and compiled, guarded
    sweep = {(i["impl"], i["batch"]) for i in infos if i["workload"] == "train_step" and i["dtype"] == "bf16"}
    from bench import common

    assert {(impl, b) for impl in ("eager", "compiled") for b in common.SIZES["smoke"]["train_batches"]} <= sweep


def test_out_of_memory_is_a_skip_that_says_so():
    from bench import common

    def build():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(common.Unavailable, match="out of memory on .*Tried to allocate 20.00 GiB"):
        common.run(common.Timer("oom"), build)

    def compiled_build():  # as torch.compile reports it: the backend's error wrapped in its own
        try:
            build()
        except torch.OutOfMemoryError as e:
            raise RuntimeError("backend compiler failed") from e

    with pytest.raises(common.Unavailable, match="Tried to allocate 20.00 GiB"):
        common.run(common.Timer("oom"), compiled_build)

    def wrong():
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        common.run(common.Timer("other"), wrong)


def test_fallback_runner_writes_the_same_schema(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--only", "kernels", "-k", "fp32", "-k", "fwd+res",
                           "--json", str(out)], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert {b["extra_info"]["impl"] for b in doc["benchmarks"]} == {"eager", "compiled", "fast"}
    for b in doc["benchmarks"]:
        assert b["stats"]["median"] > 0 and b["extra_info"]["seconds"] > 0 and b["extra_info"]["items_per_s"] > 0
    assert "## Kernels" in proc.stdout and "3 passed, 0 failed" in proc.stdout


def test_paths_run_with_launch_settings(tmp_path):
    """A Triton path with GroupNorm launch settings ("fast@persistent=1": one program looping over
    every row on the CPU) is a case of the train and sampling benches (there the NHWC engine, guarded
    against eager's NCHW images): built, guarded and recorded under its own name with every knob in
    force, and tabled beside its defaults; the same path after it runs on the defaults again (the
    settings end with their case), and records them."""
    from fastddpm.kernels import groupnorm_gelu

    out, defaults = tmp_path / "settings.json", groupnorm_gelu.current_launch_settings()
    env = _env(tmp_path, FASTDDPM_BENCH_DTYPES="bf16", FASTDDPM_BENCH_TRAIN_IMPLS="fast@persistent=1,fast",
               FASTDDPM_BENCH_SAMPLE_IMPLS="fast-nhwc@persistent=1")
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--only", "train,sample", "-k", "fast", "--json",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    infos = {(b["extra_info"]["workload"], b["extra_info"]["impl"]): b["extra_info"]
             for b in json.loads(out.read_text())["benchmarks"]}
    assert sorted(infos) == [("sampling", "fast-nhwc@persistent=1"), ("train_step", "fast"),
                             ("train_step", "fast@persistent=1")]
    assert all(i["guard"]["value"] <= i["guard"]["tol"] for i in infos.values())
    with_settings, plain = infos[("train_step", "fast@persistent=1")], infos[("train_step", "fast")]
    assert with_settings["launch_settings"] == {**plain["launch_settings"], "persistent": 1}
    assert plain["launch_settings"]["persistent"] == defaults["persistent"] == 0  # back on the defaults
    assert infos[("sampling", "fast-nhwc@persistent=1")]["launch_settings"] == with_settings["launch_settings"]
    assert infos[("sampling", "fast-nhwc@persistent=1")]["layout"] == "nhwc"
    assert "## GroupNorm launch settings in the whole step" in proc.stdout


def test_launch_settings_are_checked_where_paths_are_named(monkeypatch):
    from bench import common

    assert common.split_impl("fast-graphs-nhwc@tile=8192+persistent=2") == \
        ("fast-graphs-nhwc", {"tile": 8192, "persistent": 2})
    assert common.split_impl("compiled") == ("compiled", {})
    paths, triton = ("compiled", "fast"), ("fast",)
    assert common.impl_error("fast@split=0", paths, triton) is None
    assert "launch settings apply to the Triton paths only (fast)" in \
        common.impl_error("compiled@tile=8", paths, triton)
    assert "unknown implementation 'fats'" in common.impl_error("fats", paths, triton)
    assert "tile='3': must be a power of two" in common.impl_error("fast@tile=3", paths, triton)
    assert "expected knob=value" in common.impl_error("fast@tile=8+persistent", paths, triton)
    monkeypatch.setenv("FASTDDPM_TEST_IMPLS", "fast@tile=8192,compiled@tile=8192")
    with pytest.raises(SystemExit, match="FASTDDPM_TEST_IMPLS=fast@tile=8192,compiled@tile=8192: compiled@tile=8192: "
                                         "launch settings apply"):
        common.impls_from_env("FASTDDPM_TEST_IMPLS", ("fast",), paths, triton)
    monkeypatch.delenv("FASTDDPM_TEST_IMPLS")
    assert common.impls_from_env("FASTDDPM_TEST_IMPLS", ("fast", "compiled"), paths, triton) == ("fast", "compiled")


def test_profile_categories_name_the_fused_kernels_by_their_main_op():
    """Kernel names from the H100 profile of 2026-11-27 (and the gather backward's, compiled since):
    an Inductor kernel is filed under the op it is for, not under the casts it fused."""
    from bench.profile_step import category

    assert [category(n) for n in (
        "triton_poi_fused__to_copy__unsafe_index_put_add_mul_neg_new_zeros_slice_1",  # upsampling's backward
        "triton_poi_fused__to_copy__unsafe_index_add_cat_clone_mul_sub_57",  # its forward, with the concat
        # the gather backward of the Triton path, as Inductor names it today (here, on the CPU)
        "cpp_fused__to_copy_add_arange_clamp_div_eq_expand_index_select_lift_fresh_lt_mul_pow_rsub_select_slice_sub_"
        "unsqueeze_view_where_zeros_like_0",
        "triton_poi_fused_add_group_norm_gelu_backward_max_pool2d_with_indices_backward_slice_34",
        "triton_poi_fused__to_copy_3",  # a weight cast alone
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64")] == [
        "upsampling", "upsampling", "upsampling", "groupnorm", "casts", "layout", "convolution"]


def test_profile_and_launch_sweep_tools_run(tmp_path, capsys):
    """The next GPU session's diagnosis tools, at the smoke size: the step profile splits the
    profiled time into categories that add up, for both layouts; the sampling profile times the
    network's forward in each engine's kernels; the GroupNorm sweep guards every setting against
    eager and tables one row per (variant, shape)."""
    prof, tune, fwd = tmp_path / "prof.json", tmp_path / "tune.json", tmp_path / "fwd.json"
    every_knob = "cudnn_benchmark+force_layout+cudagraphs+combo_kernels"
    for argv, out in ((["bench.profile_step", "--impls", "eager", "--steps", "1", "--knobs",
                        f"none,{every_knob}"], prof),
                      (["bench.profile_step", "--workload", "sample", "--impls", "eager,fast", "--layouts", "nhwc",
                        "--steps", "1"], fwd),
                      (["bench.tune_groupnorm", "--tile", "64", "--programs", "4", "--threads", "8", "--rounds", "1",
                        "--lane", "0", "--split", "0,4096", "--resident", "0,512", "--variants", "fwd+bwd",
                        "--layouts", "nchw,nhwc", "--lane-bwd-nhwc", "0,1", "--batch", "2", "--persistent",
                        "1"], tune)):
        proc = subprocess.run([sys.executable, "-m", *argv, "--json", str(out)], cwd=ROOT, env=_env(tmp_path),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(prof.read_text())["rows"]
    assert [(r["layout"], r["knobs"]) for r in rows] == [(lay, k) for lay in ("nchw", "nhwc")
                                                         for k in ("none", every_knob)]
    for r in rows:
        assert r["step_s"] > 0 and r["categories"]["convolution"] > 0
        assert sum(r["categories"].values()) == pytest.approx(r["profiled_s"], rel=1e-6)
    rows = json.loads(fwd.read_text())["rows"]  # the sampling network's forward, in each engine's kernels
    assert [(r["workload"], r["impl"], r["batch"]) for r in rows] == [("sample", "eager", 1), ("sample", "fast", 1)]
    assert all(r["categories"]["convolution"] > 0 for r in rows)
    assert any("group_norm_gelu" in k["name"] for k in rows[1]["kernels"])  # the Triton path ran
    assert not any("group_norm_gelu" in k["name"] for k in rows[0]["kernels"])
    assert not any("backward" in k["name"].lower() for r in rows for k in r["kernels"])  # no gradients
    rows = json.loads(tune.read_text())["rows"]
    # the defaults (the interpreter's here), which the sweep does not name, timed beside it once a layout
    assert [r["layout"] for r in rows if r["impl"] == "fast" and r["default"]] == ["nchw", "nhwc"]
    fast = [r for r in rows if r["impl"] == "fast" and not r["default"]]
    assert {r["knobs"]["lane"] for r in fast} == {False}
    assert {r["knobs"]["split"] for r in fast} == {0, 4096}  # the split path and one program per group
    assert {r["knobs"]["resident"] for r in fast} == {0, 512}  # off, and on for the smoke shape (8 x 64 groups)
    assert {r["knobs"]["persistent"] for r in fast} == {1}  # one program looping over every row
    # the channels_last knob is swept on channels_last inputs only: 4 NCHW settings, 8 NHWC ones
    assert [sum(r["layout"] == lay for r in fast) for lay in ("nchw", "nhwc")] == [4, 8]
    assert {r["knobs"]["lane_bwd_nhwc"] for r in fast if r["layout"] == "nhwc"} == {False, True}
    assert [r["layout"] for r in rows if r["impl"] == "compiled"] == ["nchw", "nhwc"]
    assert {tuple(r["shape"]) for r in rows} == {(2, 8, 8, 8)}  # --batch 2, the smoke shape
    assert all(r["guard"]["value"] <= r["guard"]["tol"] for r in rows if r["impl"] == "fast")
    for path, head in ((prof, "| step | impl |"), (tune, "| variant | shape |")):  # bench.report prints their tables
        assert report.main([str(path)]) == 0 and head in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="records the launches in Triton's interpreter")
def test_static_cost_reads_the_hot_loops_of_the_sm90_code(tmp_path, capsys, monkeypatch):
    """bench.static_cost on one U-Net call (128x32x32 with a residual and the GELU, NHWC, the training
    batch's split launch) with the kernels' own Phi and with libdevice's erf: each of the four kernels
    has the one hot loop its code has, loading 64 or 128 bits at a time, and nothing spills; the
    kernels' own Phi issues at most 80 % of libdevice's instructions an element in each GELU kernel
    (what the static figures in bench/results compare); the summary adds the calls up, times their
    count, and bench.report prints it. A kernel not defined under the interpreter is refused."""
    from bench import static_cost as S

    call = {"c": 128, "h": 32, "w": 32, "groups": 1, "residual": True, "t": False, "gelu": True, "count": 2}
    launches, settings = [], {"none": {}, "libdevice_erf=1": {"libdevice_erf": 1}}
    for name, knobs in settings.items():
        launches.append(S.record_calls([call], 256, "nhwc", knobs))
    results = S.compile_launches(launches[0] + launches[1], analyse=True)
    rows = S.rows_for(launches[0], results[:len(launches[0])], "nhwc", "none") + \
        S.rows_for(launches[1], results[len(launches[0]):], "nhwc", "libdevice_erf=1")
    kernels = ["_gn_stats_kernel", "_gn_fwd_kernel", "_gn_bwd_reduce_kernel", "_gn_bwd_dx_kernel"]
    by = {(r["setting"], r["kernel"]): r for r in rows}
    assert sorted(by) == sorted((s, k) for s in settings for k in kernels), sorted(by)
    for r in rows:
        assert r["loop"] and r["spill_bytes"] == 0, r
        assert all(b["wide_loads"] >= 1 for b in r["bodies"]), r
        assert r["gelu"] == (None if r["kernel"] == "_gn_stats_kernel" else 1 if r["setting"] == "none" else 2)
    for k in kernels[1:]:
        own, libdevice = (by[s, k]["bodies"][0]["instructions_per_element"] for s in settings)
        assert own <= 0.8 * libdevice, (k, own, libdevice)
    total = {s["setting"]: s["forward"] + s["backward"] for s in S.summary(rows)}
    per_sample = sum(by["none", k]["bodies"][0]["instructions_per_element"] for k in kernels) * 128 * 32 * 32 * 2
    assert total["none"] == pytest.approx(per_sample) and total["none"] < total["libdevice_erf=1"]
    i = next(i for i, launch in enumerate(launches[0]) if launch["kernel"] == "_gn_fwd_kernel")
    single = {**launches[0][i], "constexprs": {**launches[0][i]["constexprs"], "SINGLE": True}}  # two loops due
    assert S.rows_for([single], [results[i]], "nhwc", "none")[0]["error"] == "1 hot loops read in the code, 2 expected"
    out = tmp_path / "static.json"
    out.write_text(json.dumps({"tool": "bench.static_cost", "card": "no GPU", "rows": rows}))
    assert report.main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| none | nhwc |" in printed and "| libdevice_erf=1 | nhwc |" in printed
    from fastddpm.kernels import groupnorm_gelu as gng

    monkeypatch.setattr(gng, "_gn_fwd_kernel", object())  # as if compiled for a GPU: nothing to record
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before"), S.recorded_launches():
        pass


def test_report_reads_an_old_profile_by_today_s_categories_and_refuses_other_files(tmp_path, capsys):
    """A profile written before the "upsampling" category (and the workload axis) existed is tabled
    from its kernel list as a new one would be; anything else is refused in one line, exit code 2."""
    from bench.profile_step import CATEGORIES

    kernels = [{"name": "triton_poi_fused__to_copy__unsafe_index_put_add_mul_neg_new_zeros_slice_1", "s": 2e-3,
                "calls": 1, "category": "casts"}, {"name": "_gn_fwd_kernel", "s": 1e-3, "calls": 26,
                                                   "category": "groupnorm"}]
    row = {"impl": "fast", "dtype": "bf16", "layout": "nhwc", "knobs": "cudagraphs", "batch": 256, "step_s": 4e-3,
           "images_per_s": 64000.0, "profiled_s": 3e-3, "categories": {"casts": 2e-3, "groupnorm": 1e-3},
           "kernels": kernels}
    old = tmp_path / "old-profile.json"
    old.write_text(json.dumps({"tool": "bench.profile_step", "card": "GPU X", "commit": "abc", "rows": [row]}))
    assert report.main([str(old)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("| train (batch 256) | fast |"))
    cats = [c for c, _ in CATEGORIES] + ["other"]
    cells = dict(zip(cats, line.strip("| ").split(" | ")[7:]))
    assert (cells["upsampling"], cells["casts"], cells["groupnorm"]) == ("2.00", "0.00", "1.00")
    assert "GPU X" in out
    bench_file = tmp_path / "bench.jsonl"
    bench_file.write_text(json.dumps(_entry("train_step", "eager", "fp32", batch=2, items_per_s=1.0)) + "\n")
    (tmp_path / "q.json").write_text(json.dumps({"fid": 65.4}))
    (tmp_path / "notes.md").write_text("\n# notes\n")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 0.1}\n{"epoch": 2, "train_loss": 0.09}\n')
    for files, says in (([tmp_path / "q.json"], "neither benchmarks nor a known tool"),
                        ([tmp_path / "notes.md"], "line 2 is not a benchmark result"),
                        ([tmp_path / "metrics.jsonl"], "none is a benchmark result"),
                        ([old, bench_file], "is a bench.profile_step file")):
        assert report.main([str(f) for f in files]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err


def test_guard_refuses_a_wrong_implementation():
    from bench import common

    with pytest.raises(common.GuardError):
        common.guard("loss vs eager", 0.5, 1e-2)
    with pytest.raises(common.GuardError):
        common.guard("nan", float("nan"), 1e-2)


# --- bench.report on a synthetic JSON --------------------------------------------------------------
PEAKS = dict(peak_bf16_tflops=800.0, copy_gb_per_s=3000.0, device_type="cuda",
             device={"name": "NVIDIA H100 80GB HBM3", "driver": "580.1", "memory_bytes": 80 * 2**30},
             versions={"torch": "2.11", "triton": "3.6"}, git={"id": "abcdef1234567890", "dirty": False})


def _entry(workload, impl, dtype, **info):
    return {"name": f"{workload}-{impl}-{dtype}",
            "extra_info": {"workload": workload, "impl": impl, "dtype": dtype, **PEAKS, **info}}


def _synthetic():
    e = [_entry("train_step", "eager", "fp32", batch=256, preset="seed", items_per_s=1000.0, mfu=0.05),
         _entry("train_step", "eager", "bf16", batch=256, preset="seed", items_per_s=2000.0, mfu=0.1),
         _entry("train_step", "compiled", "bf16", batch=256, preset="seed", items_per_s=4000.0, mfu=0.2),
         _entry("train_step", "fast", "bf16", batch=256, preset="seed", items_per_s=5000.0, mfu=0.35),
         _entry("train_step", "compiled-graphs", "bf16", batch=256, preset="seed", items_per_s=8000.0, mfu=0.4),
         _entry("train_step", "fast-graphs", "bf16", batch=256, preset="seed", items_per_s=10000.0, mfu=0.5),
         # a batch sweep's points: rows of the table, never read as the headline by the targets
         _entry("train_step", "eager", "fp32", batch=64, preset="seed", items_per_s=500.0, mfu=0.05),
         _entry("train_step", "compiled", "bf16", batch=64, preset="seed", items_per_s=1000.0, mfu=0.05),
         _entry("train_step", "fast", "bf16", batch=64, preset="seed", items_per_s=9000.0, mfu=0.9)]
    for impl, ips in (("eager", 25_600.0), ("compiled", 51_200.0), ("fast", 128_000.0)):
        e.append(_entry("sampling", impl, "bf16", batch=2560, steps=10, items_per_s=ips, fixed_s=1.0, mfu=0.3))
    for impl, sec in (("eager", 300e-6), ("compiled", 150e-6), ("fast", 100e-6)):
        e.append(_entry("groupnorm_gelu", impl, "bf16", variant="fwd+bwd", shape=[256, 64, 32, 32], batch=256,
                        seconds=sec, gb_per_s=2700.0 if impl == "fast" else 900.0,
                        roofline=0.9 if impl == "fast" else 0.3))
    return e


def test_report_compares_sampling_engines_each_in_its_best_layout():
    """Once a sampling engine ran in NHWC: its columns, fast/compiled with each side in its faster
    layout (named), the 30 s target read from fast's faster layout, and a verdict only where the
    layouts it rests on were measured (fp32's fast engine ran in NCHW alone)."""
    e = [_entry("sampling", impl, "bf16", batch=2560, steps=10, items_per_s=ips, fixed_s=1.0, mfu=0.3)
         for impl, ips in (("eager", 25_600.0), ("compiled", 51_200.0), ("compiled-nhwc", 60_000.0),
                           ("fast", 64_000.0), ("fast-nhwc", 96_000.0))]
    e += [_entry("sampling", impl, "fp32", batch=2560, steps=10, items_per_s=10_000.0, fixed_s=1.0, mfu=0.1)
          for impl in ("compiled", "compiled-nhwc", "fast")]
    text = report.render(e)
    assert "| eager | compiled | fast | diffusers | compiled-nhwc | fast-nhwc | fast/eager | fast/compiled | " \
        "fast/compiled, best layouts |" in text
    row = next(line for line in text.splitlines() if line.startswith("| bf16 | 2560 |"))
    assert "| 60,000 | 96,000 | 2.50× | 1.25× | 1.60× (fast-nhwc / compiled-nhwc) |" in row
    assert "| fast-nhwc | bf16 | 54.3 | 108 | 1 |" in text  # 1 s + 2 x 1000 x 2560 / 96,000
    assert "sampling 5,120 images at T = 1000 (bf16 fast-nhwc) in ≤ 30 s: **54.3 s** — not met" in text
    assert ("fast ≥ 1.3× compiled in every dtype, each side's best layout: fp32 **1.00×** (fast / compiled), "
            "bf16 **1.60×** (fast-nhwc / compiled-nhwc) — not assessed (fast-nhwc not measured)") in text
    e.append(_entry("sampling", "fast-nhwc", "fp32", batch=2560, steps=10, items_per_s=9_000.0, fixed_s=1.0))
    assert "(fast / compiled), bf16 **1.60×** (fast-nhwc / compiled-nhwc) — not met" in report.render(e)
    # bf16 alone: "met" needs compiled's every layout; 54 s "not met" needs fast's every layout
    bf16 = [x for x in e if x["extra_info"]["dtype"] == "bf16"]
    fast_nchw_only = [x for x in bf16 if x["extra_info"]["impl"] != "fast-nhwc"] + \
        [_entry("sampling", "compiled-nhwc", "fp32", batch=2560, steps=10, items_per_s=1.0, fixed_s=1.0)]
    assert "(bf16 fast) in ≤ 30 s: **81.0 s** — not assessed (fast-nhwc not measured)" in \
        report.render(fast_nchw_only)
    text = report.render([x for x in bf16 if x["extra_info"]["impl"] != "compiled-nhwc"])  # 1.88x: compiled's NHWC?
    assert "bf16 **1.88×** (fast-nhwc / compiled) — not assessed (compiled-nhwc not measured)" in text
    assert "**54.3 s** — not met" in text
    for d in ("fp32", "fp16"):  # every dtype, both layouts on both sides, fast >= 1.3x: met
        bf16 += [_entry("sampling", impl, d, batch=2560, steps=10, items_per_s=ips, fixed_s=1.0)
                 for impl, ips in (("compiled", 1.0), ("compiled-nhwc", 1.0), ("fast", 1.5), ("fast-nhwc", 1.0))]
    assert "fp32 **1.50×** (fast / compiled), fp16 **1.50×** (fast / compiled), bf16 **1.60×** (fast-nhwc / " \
        "compiled-nhwc) — met" in report.render(bf16)


def test_report_table_ratios_and_projections(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmarks": _synthetic(), "datetime": "2026-11-26T00:00:00"}))
    entries, header = report.load([path])
    text = report.render(entries, header)
    assert "NVIDIA H100 80GB HBM3" in text and "800 TFLOP/s" in text and "commit abcdef123456" in text
    train = next(line for line in text.splitlines() if line.startswith("| bf16 | 256 (seed)"))
    assert "| 2.50× | 1.25× | 5.00× |" in train  # fast/eager, fast/compiled, fast/eager fp32
    # 500 epochs x 50,000 images at 5,000 images/s
    assert f"{500 * 50_000 / 5000 / 3600:.3g}" in train
    # 5,120 images = 2 chunks of 2,560; T=1000: 1 s + 2 * 1000 * 2560 / 128,000 = 41 s
    assert "| fast | bf16 | 41 | 81 | 1 |" in text
    assert "| 5.00× | 2.50× | — | 30.0% |" in text  # sampling fast/eager, fast/compiled, no diffusers
    kern = next(line for line in text.splitlines() if line.startswith("| groupnorm_gelu"))
    assert "| 3.00× | 1.50× | 2,700 | 90.0% | 30.0% |" in kern
    lines = text.splitlines()
    sweep = next(n for n, line in enumerate(lines) if line.startswith("| bf16 | 64 (seed)"))
    assert sweep < lines.index(train)  # batches in numeric order
    assert "| 9.00× | 18.00× |" in lines[sweep]  # fast/compiled, fast/eager fp32 at its own batch
    # issue 11's targets, at the headline batch: fast/compiled 1.25x, 35 % of the peak, 41 s for 5,120 images
    assert "batch 256: fast ≥ 1.5× compiled: **1.25×** — not met" in text
    assert "**35.0%** — met" in text and "**41.0 s** — not met" in text
    assert "bf16 **2.50×** — not assessed (measured in 1 of 3 dtypes)" in text
    assert "256×64×32×32 **90.0%**, 256×128×16×16 **not measured** — not assessed (a shape not measured)" \
        in text
    assert "1861 s (T=1000, fp32)" in text and "7.71 h (T=1000, fp32)" in text
    # the CUDA-graph paths: their own table (only the batch that has them) and their own target lines
    graphed = [line for line in lines if line.startswith("| bf16 |") and "| 4,000 | 8,000 | 10,000 |" in line]
    assert len(graphed) == 1
    assert "| 2.00× | 2.50× | 1.25× (fast-graphs / compiled-graphs) | 40.0% / 50.0% |" in graphed[0]
    assert "batch 256: compiled-graphs / compiled **2.00×** (CUDA graphs alone)" in text
    # below target, but our NHWC step, not measured, might reach it
    assert ("CUDA graphs on both: fast-graphs ≥ 1.5× compiled-graphs: **1.25×** — not assessed (each side's "
            "best layout; compiled-graphs-nhwc, fast-graphs-nhwc not measured)") in text
    assert "fast-graphs ≥ 25% of the bf16 matmul peak: **50.0%** — met" in text


def test_report_judges_the_graphed_kernels_in_each_side_s_best_layout(tmp_path):
    """With NHWC graphed paths measured, the target compares the fastest fast path with the fastest
    compiled one, whichever layout each ran in, and names them."""
    e = _synthetic() + [
        _entry("train_step", "compiled-graphs-nhwc", "bf16", batch=256, preset="seed", items_per_s=6000.0, mfu=0.3),
        _entry("train_step", "fast-graphs-nhwc", "bf16", batch=256, preset="seed", items_per_s=16000.0, mfu=0.8)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmarks": e}))
    text = report.render(*report.load([path]))
    row = next(line for line in text.splitlines() if "| 4,000 | 8,000 | 6,000 | 10,000 | 16,000 |" in line)
    assert "| 2.00× | 1.50× | 2.50× | 4.00× | 2.00× (fast-graphs-nhwc / compiled-graphs) |" in row
    assert ("CUDA graphs on both: fast-graphs-nhwc ≥ 1.5× compiled-graphs: **2.00×** — met "
            "(each side's best layout)") in text
    assert "fast-graphs-nhwc ≥ 25% of the bf16 matmul peak: **80.0%** — met" in text
    # only one layout of a side measured: the comparison says so, and the CUDA-graphs-alone line needs NCHW
    only = [x for x in e if x["extra_info"]["impl"] not in ("compiled-graphs", "fast-graphs")]
    path.write_text(json.dumps({"benchmarks": only}))
    text = report.render(*report.load([path]))
    assert ("fast-graphs-nhwc ≥ 1.5× compiled-graphs-nhwc: **2.67×** — not assessed (each side's best layout; "
            "compiled-graphs, fast-graphs not measured)") in text
    assert "(CUDA graphs alone)" not in text
    assert "| 2.67× (fast-graphs-nhwc / compiled-graphs-nhwc) |" in text
    # a side in one layout bounds its best: "met" needs compiled's every layout, "not met" ours
    for fast_nhwc, says in ((16000.0, "**2.00×** — not assessed"), (9000.0, "**1.25×** — not met")):
        rate = {"fast-graphs-nhwc": {"items_per_s": fast_nhwc}}
        part = [{**x, "extra_info": {**x["extra_info"], **rate.get(x["extra_info"]["impl"], {})}}
                for x in e if x["extra_info"]["impl"] != "compiled-graphs-nhwc"]
        path.write_text(json.dumps({"benchmarks": part}))
        assert f"{says} (each side's best layout; compiled-graphs-nhwc not measured)" in \
            report.render(*report.load([path]))


def test_report_tables_launch_settings_beside_the_defaults(tmp_path):
    """A path@settings result gets a row beside its own defaults and the compiled path it must beat (for
    a graphed path, the faster compiled-graphs layout); the targets still read the defaults."""
    e = _synthetic() + [
        _entry("train_step", "compiled-graphs-nhwc", "bf16", batch=256, preset="seed", items_per_s=6000.0),
        _entry("train_step", "fast-graphs@persistent=2", "bf16", batch=256, preset="seed", items_per_s=16000.0),
        _entry("sampling", "fast@tile=8192", "bf16", batch=2560, steps=10, items_per_s=192_000.0, fixed_s=1.0)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmarks": e}))
    text = report.render(*report.load([path]))
    assert ("| train_step | bf16 | 256 | `fast-graphs@persistent=2` | 16,000 images/s | 1.60× (fast-graphs) | "
            "2.00× (compiled-graphs) |") in text
    assert ("| sampling | bf16 | 2560 | `fast@tile=8192` | 192,000 image-steps/s | 1.50× (fast) | 3.75× (compiled) |"
            in text)
    assert "fast-graphs ≥ 1.5× compiled-graphs: **1.25×** — not assessed" in text  # the defaults
    assert "fast@" not in text.split("## Targets")[1] and "persistent" not in text.split("## Targets")[1]


def test_a_probed_rate_and_its_mfu_describe_the_same_work(tmp_path):
    """Sampling is timed with a probe that splits off a fixed per-call cost: its TFLOP/s and MFU are
    those of the marginal rate, like items_per_s (older files counted the fixed cost in the MFU; the
    report recomputes it), and the time target says what the arithmetic alone costs."""
    from bench import common

    # 10 image-steps in 2 s, 2 of them in 1 s: 0.125 s each, 0.75 s fixed
    case = common.Case("sampling", "fast", "bf16", fn=None, items=10, unit="image-steps", flops=10e12,
                       probe=lambda: None, probe_items=2)
    info = common.extra_info(case, 2.0, 1.0, {})
    assert info["items_per_s"] == pytest.approx(8.0) and info["fixed_s"] == pytest.approx(0.75)
    assert info["tflops"] == pytest.approx(8.0)  # 1 TFLOP an image-step at 8 a second, not 10 TFLOP / 2 s
    old = _entry("sampling", "fast", "bf16", batch=2560, steps=10, items=25600, items_per_s=100_000.0,
                 flops=25600 * 3e9, peak_bf16_tflops=1000.0, fixed_s=0.5, mfu=0.1)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmarks": [old]}))
    text = report.render(*report.load([path]))
    assert "| 30.0% |" in text  # 3 GFLOP x 100,000 a second of a 1,000 TFLOP/s peak, not the stored 10 %
    # 5,120 x 1,000 image-steps x 3 GFLOP at 1,000 TFLOP/s: 15.4 s, 51.2 % of the 30 s target
    assert "FLOPs alone take 15.4 s at the measured bf16 peak: 30 s needs 51.2% of it" in text
    assert "measured 30.0%)" in text


def test_report_reads_targets_at_the_bench_headline_sizes():
    from bench import common

    assert report.HEADLINE_BATCH == {"train_step": common.SIZES["gpu"]["train_batch"],
                                     "sampling": common.SIZES["gpu"]["sample_batch"]}
    assert common.SIZES["gpu"]["train_batch"] in common.SIZES["gpu"]["train_batches"]


def test_report_merges_jsonl_and_says_cpu(tmp_path, capsys):
    lines = [_entry("train_step", "eager", "fp32", batch=2, preset="tiny", items_per_s=10.0)]
    lines[0]["extra_info"].update(device_type="cpu", peak_bf16_tflops=None, copy_gb_per_s=None, device={"name": "x86"})
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert report.main([str(tmp_path / "a.jsonl"), "--merge", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "CPU run: no roofline is claimed" in out and "not assessed" in out
    assert len(json.loads((tmp_path / "m.json").read_text())["benchmarks"]) == 1


def test_the_cpu_dtype_and_layout_tool_measures_what_make_demo_chooses(tmp_path, capsys):
    """bench.cpu_dtypes: a training step and a sampling forward of the tiny U-Net per dtype and layout,
    the CPU's bf16 support beside them, and bench.report tables the file."""
    from bench import cpu_dtypes
    from fastddpm.config import fastest_cpu_dtype

    out = tmp_path / "cpu.json"
    assert cpu_dtypes.main(["--train-batch", "2", "--sample-batch", "3", "--calls", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [(r["dtype"], r["layout"]) for r in doc["rows"]] == [("fp32", "nchw"), ("fp32", "nhwc"), ("bf16", "nchw"),
                                                                ("bf16", "nhwc")]
    assert all(r["train_step_s"] > 0 and r["forward_s"] > 0 and r["sample_batch"] == 3 for r in doc["rows"])
    assert doc["cpu"]["fastest_cpu_dtype"] == fastest_cpu_dtype() and "python -m bench.cpu_dtypes" in doc["command"]
    capsys.readouterr()
    assert report.main([str(out)]) == 0
    text = capsys.readouterr().out
    assert "# bench.cpu_dtypes" in text and "| fp32 | nchw |" in text and "| 1.00x |" in text


@pytest.mark.parametrize("workload,impl", [("train", "fast-graphs-nhwc"), ("sample", "fast-nhwc@tile=2048")])
def test_the_profiler_names_its_own_layout_axis_for_an_nhwc_path(capsys, workload, impl):
    from bench import profile_step

    with pytest.raises(SystemExit) as exit_:
        profile_step.main(["--workload", workload, "--impls", impl])
    assert exit_.value.code == 2 and "this tool has its own layout axis" in capsys.readouterr().err

"""What ``auto`` runs on a GPU rests on a results file: every entry of fastddpm.measured is what
bench.report derives from its file, and sampling and training look their card up in it."""
import json
from pathlib import Path

import pytest
import torch

from bench import report
from fastddpm.config import COMPILE_MODES, DTYPES
from fastddpm.measured import CPU_SAMPLE_LAYOUT, FALLBACK, MEASURED, Measured, _deciding, card_slug
from fastddpm.errors import ArgumentParser
from fastddpm.sampling import add_sampler_flags, auto_engine, sampling_layout
from fastddpm import train as train_mod
from fastddpm.train import training_kernels, training_layout
from tests.test_bench import ROOT, _entry

CUDA = torch.device("cuda")


@pytest.mark.parametrize("card,index", [(card, i) for card in sorted(MEASURED) for i in range(len(MEASURED[card]))])
def test_each_entry_is_what_its_results_file_measured(card, index):
    entry = MEASURED[card][index]
    entries, _ = report.load([ROOT / entry.source])
    assert {card_slug(e["extra_info"]["device"]["name"]) for e in entries} == {card}
    got = report.auto_choices(entries)
    assert got == {k: getattr(entry, k) for k in got}
    if index:  # newest first: the files' names begin with their dates
        assert Path(entry.source).name < Path(MEASURED[card][index - 1].source).name


def test_the_fallback_card_was_measured_in_every_dtype():
    """What every other card falls back to, in its entries together."""
    for field in ("sample_engine", "train_kernels"):
        has = {d for e in MEASURED[FALLBACK] for d in (e.sample_engine if field == "sample_engine"
                                                      else e.train_kernels.get("default", {}))}
        assert has == {"fp32", "fp16", "bf16"}, field


@pytest.mark.parametrize("capability", sorted(CPU_SAMPLE_LAYOUT))
def test_each_cpu_layout_is_what_its_results_file_measured(capability):
    """Per dtype, the layout of the faster forward at the file's sampling batch (NCHW within 2 %: a tie),
    on a CPU of that capability; every dtype the file measured has its entry."""
    source, layouts = CPU_SAMPLE_LAYOUT[capability]
    doc = json.loads((ROOT / source).read_text())
    assert doc["tool"] == "bench.cpu_dtypes" and doc["cpu"]["capability"] == capability
    forward = {(r["dtype"], r["layout"]): r["forward_s"] for r in doc["rows"]}
    measured = {d: "nhwc" if forward[d, "nhwc"] < forward[d, "nchw"] / 1.02 else "nchw" for d, _ in forward}
    assert layouts == measured


def test_the_report_prints_the_entry_and_says_whether_the_code_has_it(monkeypatch):
    for entry in MEASURED[FALLBACK]:
        text = report.render(*report.load([ROOT / entry.source]), source=entry.source)
        assert "`fastddpm/measured.py` has this entry" in text
        line = next(x for x in text.splitlines() if x.startswith("Measured("))
        assert eval(line.rstrip(","), {"Measured": Measured}) == entry
    newest, *older = MEASURED[FALLBACK]  # the card's table before its newest file was pasted in
    monkeypatch.setitem(MEASURED, FALLBACK, tuple(older))
    text = report.render(*report.load([ROOT / newest.source]), source=newest.source)
    sources = ", ".join(e.source for e in older)
    assert f"has other entries for {FALLBACK}, from {sources}: put this one first" in text


def test_auto_choices_take_the_faster_path_at_the_headline_batch_only(tmp_path, monkeypatch):
    seed = dict(preset="seed")
    e = [_entry("train_step", "compiled", "bf16", batch=256, items_per_s=5000.0, **seed),
         _entry("train_step", "fast", "bf16", batch=256, items_per_s=4000.0, **seed),
         _entry("train_step", "compiled", "bf16", batch=64, items_per_s=1000.0, **seed),  # a batch sweep's point
         _entry("train_step", "fast", "bf16", batch=64, items_per_s=9000.0, **seed),
         # under CUDA graphs each side in its faster layout: Inductor's NHWC step beats our NCHW one
         _entry("train_step", "compiled-graphs", "bf16", batch=256, items_per_s=8000.0, **seed),
         _entry("train_step", "compiled-graphs-nhwc", "bf16", batch=256, items_per_s=11000.0, **seed),
         _entry("train_step", "fast-graphs", "bf16", batch=256, items_per_s=10000.0, **seed),
         # ours wins, NHWC within a tie of its NCHW: NCHW; a path measured in one layout runs in that one
         _entry("train_step", "compiled-graphs", "fp16", batch=256, items_per_s=8000.0, **seed),
         _entry("train_step", "fast-graphs", "fp16", batch=256, items_per_s=10000.0, **seed),
         _entry("train_step", "fast-graphs-nhwc", "fp16", batch=256, items_per_s=10100.0, **seed),
         _entry("train_step", "compiled-graphs", "fp32", batch=256, items_per_s=8000.0, **seed),
         _entry("train_step", "fast-graphs-nhwc", "fp32", batch=256, items_per_s=9000.0, **seed),
         _entry("train_step", "fast", "fp16", batch=256, items_per_s=10000.0, **seed),  # no compiled fp16: no entry
         _entry("sampling", "compiled", "fp32", batch=2560, items_per_s=2.0),
         _entry("sampling", "fast", "fp32", batch=2560, items_per_s=3.0),
         _entry("sampling", "compiled", "bf16", batch=2560, items_per_s=3.0),
         _entry("sampling", "fast", "bf16", batch=2560, items_per_s=2.0),
         # sampling's engines each in its faster layout too: fast in NHWC beats compiled's best (NHWC)
         _entry("sampling", "compiled", "fp16", batch=2560, items_per_s=3.0),
         _entry("sampling", "compiled-nhwc", "fp16", batch=2560, items_per_s=3.5),
         _entry("sampling", "fast", "fp16", batch=2560, items_per_s=3.2),
         _entry("sampling", "fast-nhwc", "fp16", batch=2560, items_per_s=4.0)]
    assert report.auto_choices(e) == {
        "sample_engine": {"fp32": "fast", "fp16": "fast", "bf16": "compiled"},
        "train_kernels": {"default": {"bf16": "torch"},
                          "reduce-overhead": {"fp32": "triton", "fp16": "triton", "bf16": "torch"}},
        "train_layout": {"default": {"bf16": "nchw"},
                         "reduce-overhead": {"fp32": "nhwc", "fp16": "nchw", "bf16": "nhwc"}},
        "sample_layout": {"fp32": "nchw", "fp16": "nhwc", "bf16": "nchw"}}
    # within 2 % the two tie, and a tie goes to the preferred path: fast for sampling, torch for training
    tie = [_entry("sampling", "compiled", "fp16", batch=2560, items_per_s=100.0),
           _entry("sampling", "fast", "fp16", batch=2560, items_per_s=98.5),
           _entry("train_step", "compiled", "fp16", batch=256, items_per_s=100.0, **seed),
           _entry("train_step", "fast", "fp16", batch=256, items_per_s=101.5, **seed)]
    assert report.auto_choices(tie) == {"sample_engine": {"fp16": "fast"},
                                        "train_kernels": {"default": {"fp16": "torch"}},
                                        "train_layout": {"default": {"fp16": "nchw"}},
                                        "sample_layout": {"fp16": "nchw"}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmarks": e}))
    monkeypatch.delitem(MEASURED, "h100-80gb-hbm3", raising=False)
    text = report.render(*report.load([path]))  # an H100 that fastddpm.measured does not have
    assert "has no entry for h100-80gb-hbm3: it falls back to another card's" in text
    pasted = text.split("```\n")[-2]  # the card's whole tuple: it evaluates as a dict item
    assert list(eval("{" + pasted + "}", {"Measured": Measured})) == ["h100-80gb-hbm3"]
    assert ('Measured(source="bench/results/<this file>.json", sample_engine={"fp32": "fast", '
            '"fp16": "fast", "bf16": "compiled"}, train_kernels={"default": {"bf16": "torch"}, "reduce-overhead": '
            '{"fp32": "triton", "fp16": "triton", "bf16": "torch"}}, train_layout={"default": {"bf16": "nchw"}, '
            '"reduce-overhead": {"fp32": "nhwc", "fp16": "nchw", "bf16": "nhwc"}}, sample_layout={"fp32": "nchw", '
            '"fp16": "nhwc", "bf16": "nchw"}),') in text


@pytest.fixture
def on_card(monkeypatch):
    """Pretend the CUDA device is the named card (nothing here touches a GPU)."""
    def use(name):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return use


def test_card_slug_spells_cards_as_results_files_do():
    assert card_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert card_slug("NVIDIA H200") == "h200"
    assert card_slug("NVIDIA GeForce RTX 4070") == "geforce-rtx-4070"
    from bench.quality import _card

    assert _card({"name": "NVIDIA H100 80GB HBM3"}) == "h100-80gb-hbm3" and _card({}) == "cpu"


H100 = Measured("bench/results/x.json", sample_engine={"fp32": "fast", "bf16": "compiled"},  # no fp16, as gpu.sh's
                train_kernels={"default": {"fp32": "triton", "bf16": "triton"},          # default dtypes leave it
                               "reduce-overhead": {"bf16": "torch"}},
                sample_layout={"fp32": "nhwc", "bf16": "nchw"})


def test_sampling_and_training_look_their_card_up(on_card, monkeypatch):
    monkeypatch.setitem(MEASURED, "h100-80gb-hbm3", (H100,))
    on_card("NVIDIA H100 80GB HBM3")
    assert auto_engine(CUDA, torch.float32, True) == ("fast", "measured fastest on this card (bench/results/x.json)")
    assert auto_engine(CUDA, torch.bfloat16, True)[0] == "compiled"
    engine, why = auto_engine(CUDA, torch.float32, False)
    assert engine == "compiled" and why.startswith("Triton is unavailable here") and "x.json" in why
    assert training_kernels("auto", CUDA, True, "default", "bf16", True)[0] == "triton"
    assert training_kernels("auto", CUDA, True, "reduce-overhead", "bf16", True)[0] == "torch"
    path, why = training_kernels("auto", CUDA, True, "reduce-overhead", "fp32", True)  # this mode lacks fp32
    assert path == "triton" and "in the default compile mode (reduce-overhead not measured in fp32)" in why
    path, why = training_kernels("auto", CUDA, True, "default", "bf16", False)  # no Triton here: torch
    assert path == "torch" and "Triton is unavailable here" in why
    # an explicit choice is kept; uncompiled or off CUDA, "auto" is the model's own rule
    assert training_kernels("torch", CUDA, True, "default", "bf16", True) == ("torch", "asked for")
    assert training_kernels("auto", CUDA, False, "default", "bf16", True)[0] == "auto"
    assert training_kernels("auto", torch.device("cpu"), True, "default", "bf16", True)[0] == "auto"
    assert auto_engine(torch.device("cpu"), torch.bfloat16, True)[0] == "eager"


def test_the_h100_entry_says_which_mode_it_was_measured_in(on_card):
    """The H100 was measured under reduce-overhead only: a default-mode run takes the H200's choice
    and says that the H100 lacks that mode, not that it was never measured in the dtype."""
    on_card("NVIDIA H100 80GB HBM3")
    (h100,) = MEASURED["h100-80gb-hbm3"]
    fb = _deciding(FALLBACK, lambda e: e.train_kernels.get("default", {}).get("bf16"))
    assert auto_engine(CUDA, torch.float16, True) == (h100.sample_engine["fp16"],
                                                      f"measured fastest on this card ({h100.source})")
    path, why = training_kernels("auto", CUDA, True, "reduce-overhead", "bf16", True)
    assert (path, why) == (h100.train_kernels["reduce-overhead"]["bf16"],
                           f"auto: measured fastest on this card ({h100.source})")
    path, why = training_kernels("auto", CUDA, True, "default", "bf16", True)
    assert path == fb.train_kernels["default"]["bf16"]
    assert why == f"auto: h100-80gb-hbm3 not measured in bf16 under --compile-mode default: the {FALLBACK}'s " \
        f"choice ({fb.source})"


def test_training_layout_is_the_measured_one_for_the_path_it_runs(on_card):
    """--channels-last's auto: NHWC only where this card measured the chosen path faster in it, in
    this dtype and compile mode; never another card's, another path's or another mode's layout."""
    on_card("NVIDIA H100 80GB HBM3")
    (h100,) = MEASURED["h100-80gb-hbm3"]
    mode, dtype = "reduce-overhead", "bf16"
    path = h100.train_kernels[mode][dtype]
    nhwc, why = training_layout(None, CUDA, True, mode, dtype, path)
    assert nhwc == (h100.train_layout[mode][dtype] == "nhwc") and why.startswith("auto: ") and h100.source in why
    other = {"triton": "torch", "torch": "triton"}[path]
    assert training_layout(None, CUDA, True, mode, dtype, other) == (
        False, f"auto: NCHW: no measured layout for the {other} path on h100-80gb-hbm3 in bf16 under "
               f"--compile-mode {mode}")
    assert training_layout(None, CUDA, True, "default", dtype, path)[0] is False  # not measured in this mode
    assert training_layout(None, CUDA, True, mode, "fp16", path)[0] is False  # nor in this dtype
    on_card("NVIDIA A100-SXM4-80GB")  # no entry: NCHW, not the fallback card's
    assert training_layout(None, CUDA, True, mode, dtype, path)[0] is False
    # an explicit choice is kept; uncompiled or off CUDA, auto is NCHW
    assert training_layout(True, CUDA, True, "default", dtype, "torch") == (True, "asked for")
    assert training_layout(False, CUDA, True, mode, dtype, path) == (False, "asked for")
    assert training_layout(None, CUDA, False, mode, dtype, path)[0] is False
    assert training_layout(None, torch.device("cpu"), True, mode, dtype, path)[0] is False
    parse = train_mod.build_parser().parse_args
    assert [parse(a).channels_last for a in ([], ["--channels-last"], ["--no-channels-last"])] == [None, True, False]


def test_sampling_layout_is_the_measured_one_for_the_engine_it_runs(on_card, monkeypatch):
    """sample()'s channels_last=None on CUDA: NHWC only where this card measured the engine it runs
    faster in it, in this dtype; never another card's, another engine's or another dtype's layout."""
    monkeypatch.setitem(MEASURED, "h100-80gb-hbm3", (H100,))
    on_card("NVIDIA H100 80GB HBM3")
    assert sampling_layout(None, CUDA, "fast", torch.float32) == (
        True, "auto: NHWC, the layout the fast engine was measured and chosen in (bench/results/x.json)")
    assert sampling_layout(None, CUDA, "compiled", torch.float32) == (
        False, "auto: NCHW: no measured layout for the compiled engine on h100-80gb-hbm3 in fp32")
    assert sampling_layout(None, CUDA, "compiled", torch.bfloat16)[0] is False  # measured and chosen in NCHW
    assert sampling_layout(None, CUDA, "fast", torch.float16)[0] is False  # not measured in fp16
    on_card("NVIDIA A100-SXM4-80GB")  # no entry: NCHW, not the fallback card's
    assert sampling_layout(None, CUDA, "fast", torch.float32)[0] is False
    assert sampling_layout(True, CUDA, "eager", torch.float32) == (True, "asked for")
    assert sampling_layout(False, CUDA, "fast", torch.float32) == (False, "asked for")
    assert sampling_layout(None, torch.device("cpu"), "fast", torch.float32)[0] is False
    parse = ArgumentParser()
    add_sampler_flags(parse)
    assert [parse.parse_args(a).channels_last for a in ([], ["--channels-last"], ["--no-channels-last"])] == \
        [None, True, False]


def test_what_an_entry_lacks_comes_from_the_fallback_card_and_says_so(on_card, monkeypatch):
    """A new card's entry pasted from gpu.sh's default dtypes (bf16, fp32) has no fp16: fp16 takes
    the fallback card's choice; a card with no entry takes all of them; nothing raises."""
    monkeypatch.setitem(MEASURED, "h100-80gb-hbm3", (H100,))
    fb = _deciding(FALLBACK, lambda e: e.sample_engine.get("fp16"))
    on_card("NVIDIA H100 80GB HBM3")
    assert auto_engine(CUDA, torch.float16, True) == (
        fb.sample_engine["fp16"], f"h100-80gb-hbm3 not measured in fp16: the {FALLBACK}'s choice ({fb.source})")
    path, why = training_kernels("auto", CUDA, True, "reduce-overhead", "fp16", True)
    fb = _deciding(FALLBACK, lambda e: e.train_kernels.get("default", {}).get("fp16"))
    assert path == fb.train_kernels["default"]["fp16"]
    assert f"not measured in fp16 under --compile-mode reduce-overhead: the {FALLBACK}'s choice, in the default " \
        "compile mode (reduce-overhead not measured in fp16)" in why
    on_card("NVIDIA A100-SXM4-80GB")
    engine, why = auto_engine(CUDA, torch.float16, True)
    fb = _deciding(FALLBACK, lambda e: e.sample_engine.get("fp16"))
    assert engine == fb.sample_engine["fp16"]
    assert why == f"a100-sxm4-80gb not measured: the {FALLBACK}'s choice ({fb.source})"
    for mode in COMPILE_MODES:
        for dtype in DTYPES:  # the fallback card's choice: the mode asked for in any of its entries, else default
            expected = next(e.train_kernels[m][dtype] for m in (mode, "default") for e in MEASURED[FALLBACK]
                            if dtype in e.train_kernels.get(m, {}))
            path, why = training_kernels("auto", CUDA, True, mode, dtype, True)
            assert path == expected and "a100-sxm4-80gb not measured" in why


def test_a_card_s_newest_entry_decides_and_its_earlier_ones_fill_in(on_card, monkeypatch):
    """A GPU call measures a few dtypes and modes: the card's newest entry decides what it measured,
    an earlier entry of the same card what it did not (before the fallback card), and each layout
    comes with the entry that chose its path, never from another entry."""
    newer = Measured("bench/results/new.json", sample_engine={"bf16": "fast"},
                     train_kernels={"reduce-overhead": {"bf16": "triton"}},
                     train_layout={"reduce-overhead": {"bf16": "nhwc"}}, sample_layout={"bf16": "nchw"})
    older = Measured("bench/results/old.json", sample_engine={"fp32": "compiled", "bf16": "compiled"},
                     train_kernels={"default": {"fp32": "torch", "bf16": "torch"}},
                     train_layout={"default": {"fp32": "nchw", "bf16": "nchw"}},
                     sample_layout={"fp32": "nhwc", "bf16": "nhwc"})
    monkeypatch.setitem(MEASURED, "h100-80gb-hbm3", (newer, older))
    on_card("NVIDIA H100 80GB HBM3")
    assert auto_engine(CUDA, torch.bfloat16, True) == ("fast", "measured fastest on this card (bench/results/new.json)")
    assert auto_engine(CUDA, torch.float32, True) == ("compiled", "measured fastest on this card "
                                                                  "(bench/results/old.json)")
    assert sampling_layout(None, CUDA, "compiled", torch.float32)[0] is True  # old.json chose it, in NHWC
    assert sampling_layout(None, CUDA, "fast", torch.bfloat16) == (
        False, "auto: NCHW, the layout the fast engine was measured and chosen in (bench/results/new.json)")
    # old.json's compiled engine in NHWC is not borrowed: new.json chose bf16's engine
    assert sampling_layout(None, CUDA, "compiled", torch.bfloat16)[0] is False
    assert training_kernels("auto", CUDA, True, "reduce-overhead", "bf16", True) == (
        "triton", "auto: measured fastest on this card (bench/results/new.json)")
    assert training_layout(None, CUDA, True, "reduce-overhead", "bf16", "triton")[0] is True
    path, why = training_kernels("auto", CUDA, True, "reduce-overhead", "fp32", True)  # neither has this mode
    assert path == "torch" and why == ("auto: measured fastest on this card, in the default compile mode "
                                       "(reduce-overhead not measured in fp32) (bench/results/old.json)")
    assert training_kernels("auto", CUDA, True, "default", "bf16", True)[1].endswith("(bench/results/old.json)")
    path, why = training_kernels("auto", CUDA, True, "default", "fp16", True)  # neither has fp16: the fallback
    assert f"h100-80gb-hbm3 not measured in fp16 under --compile-mode default: the {FALLBACK}'s choice" in why
    # the mode asked for in an earlier entry beats the default mode in the newest
    monkeypatch.setitem(MEASURED, "h100-80gb-hbm3", (
        Measured("bench/results/new.json", sample_engine={}, train_kernels={"default": {"fp32": "torch"}}),
        Measured("bench/results/old.json", sample_engine={}, train_kernels={"reduce-overhead": {"fp32": "triton"}},
                 train_layout={"reduce-overhead": {"fp32": "nhwc"}})))
    assert training_kernels("auto", CUDA, True, "reduce-overhead", "fp32", True) == (
        "triton", "auto: measured fastest on this card (bench/results/old.json)")
    assert training_layout(None, CUDA, True, "reduce-overhead", "fp32", "triton")[0] is True
    # a layout comes with the entry that chose: an older entry's choice of the other path and its layout
    # are not borrowed for the path the newest chose, nor for the one it did not
    monkeypatch.setitem(MEASURED, "h100-80gb-hbm3", (
        Measured("bench/results/new.json", sample_engine={}, train_kernels={"reduce-overhead": {"bf16": "triton"}},
                 train_layout={"reduce-overhead": {"bf16": "nchw"}}),
        Measured("bench/results/old.json", sample_engine={}, train_kernels={"reduce-overhead": {"bf16": "torch"}},
                 train_layout={"reduce-overhead": {"bf16": "nhwc"}})))
    assert training_layout(None, CUDA, True, "reduce-overhead", "bf16", "torch") == (
        False, "auto: NCHW: no measured layout for the torch path on h100-80gb-hbm3 in bf16 under "
               "--compile-mode reduce-overhead")
    assert training_layout(None, CUDA, True, "reduce-overhead", "bf16", "triton")[0] is False


def test_the_printed_entry_cites_the_file_to_commit(tmp_path, capsys):
    """gpu.sh merges its logs into $OUT/<date>-<card>.json, committed as bench/results/<that name>:
    the entry cites the latter; one input inside the checkout is cited relative to its root."""
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps(_entry("sampling", "fast", "bf16", batch=2560, items_per_s=2.0)) + "\n" +
                    json.dumps(_entry("sampling", "compiled", "bf16", batch=2560, items_per_s=1.0)) + "\n")
    assert report.main([str(path), "--merge", str(tmp_path / "2026-12-01-h100-80gb-hbm3.json")]) == 0
    assert 'Measured(source="bench/results/2026-12-01-h100-80gb-hbm3.json"' in capsys.readouterr().out
    newest = MEASURED[FALLBACK][0]
    assert report.main([str(ROOT / newest.source)]) == 0
    assert f'Measured(source="{newest.source}"' in capsys.readouterr().out

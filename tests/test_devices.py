"""Device profiles, the memory model (against exported programs and measured RSS), the planner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from clitools import assert_one_line_error, run

from ossedge.runtime.config import preset
from ossedge.runtime.errors import BudgetError
from ossedge.targets.devices import (
    DeviceError,
    builtin_devices,
    device_from_dict,
    get_device,
    local_device,
    measure_bandwidth,
)
from ossedge.targets.memory import HOST_BYTES, kv_cache_bytes
from ossedge.targets.executorch.memory import (executorch_activation_bytes, executorch_footprint,
                                               program_arena_bytes)
from ossedge.targets.plan import MIN_CONTEXT, choose, evaluate, plan

REQUIRED = ("iphone-15-pro", "iphone-16-pro", "iphone-17-pro", "ipad-pro-m4", "macbook-air-m-16gb",
            "mac-mini-m4-16gb", "pixel-9-pro", "galaxy-s25-ultra", "android-16gb")
BIG = preset("20b")
CONTEXT = 2048  # the context of the conftest fixture `et_artifact`


def profile(**changes) -> dict:
    d = get_device("pixel-9-pro").to_dict()
    d.update(changes)
    return d


def test_profiles_load_and_cover_the_named_devices() -> None:
    devices = builtin_devices()
    assert set(REQUIRED) <= set(devices)
    for d in devices.values():
        assert 0 < d.app_budget_gb < d.ram_gb, d.name
        assert d.budget_source and d.bandwidth_gbs > 10, d.name
        assert d.runs("executorch"), d.name
        assert (d.targets.coreml is not None) == (d.os in ("ios", "ipados", "macos")), d.name


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"colour": "blue"}, "unknown key 'colour'"),
        ({"app_budget_gb": 20}, "app_budget_gb 20 must be in (0, ram_gb]"),
        ({"bandwidth_gbs": "fast"}, "bandwidth_gbs must be a non-negative number"),
        ({"os": "symbian"}, "os 'symbian'"),
        ({"targets": {"coreml": "ios17", "executorch": True, "onnx": True}}, "targets.coreml"),
        ({"cpu": {"arch": "arm64"}}, "missing key"),
    ],
    ids=["unknown-key", "budget-over-ram", "bad-number", "bad-os", "bad-coreml", "cpu-missing"],
)
def test_malformed_profiles_name_the_key(change, needle) -> None:
    with pytest.raises(DeviceError, match=None) as e:
        device_from_dict(profile(**change))
    assert needle in str(e.value)


def test_missing_key_is_named() -> None:
    d = profile()
    del d["storage_read_gbs"]
    with pytest.raises(DeviceError, match="missing key 'storage_read_gbs'"):
        device_from_dict(d)


def test_profile_from_a_json_file_and_local(tmp_path: Path) -> None:
    f = tmp_path / "phone.json"
    f.write_text(json.dumps(profile(name="my-phone", app_budget_gb=3.5)))
    assert get_device(f).app_budget == 3_500_000_000
    here = local_device()
    assert 0 < here.app_budget_gb <= here.ram_gb and here.bandwidth_gbs > 0.5


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_bandwidth_reads_the_whole_buffer_with_any_thread_count(threads: int) -> None:
    # 3 threads split the rows unevenly; every count must give a figure a real machine could
    bw = measure_bandwidth(gb=0.05, runs=2, threads=threads)
    assert 2**30 < bw < 10_000 * 2**30


def test_unknown_device_lists_the_valid_ones() -> None:
    p = run("plan", "--device", "nokia-3310")
    assert_one_line_error(p, "unknown device 'nokia-3310'", "iphone-15-pro", "pixel-9-pro", "local")


# -- memory model --------------------------------------------------------------------------------


def test_kv_and_activation_formula_matches_the_planned_arena(et_artifact: Path) -> None:
    from ossedge.runtime.config import config_from_hf_dict

    m = json.loads((et_artifact / "manifest.json").read_text())
    cfg = config_from_hf_dict(m["config"])
    p = m["max_prefill"]
    predicted = kv_cache_bytes(cfg, CONTEXT, dtype_bytes=4) + executorch_activation_bytes(
        cfg, CONTEXT, p)
    arena = program_arena_bytes(et_artifact / "model.pte")
    assert abs(predicted / arena - 1) < 0.02, (predicted, arena)


RSS_RUN = r"""
import json, sys, torch
from ossedge.benchmarks.rss import proc_status
from ossedge.targets.executorch.runner import ExecuTorchModel
m = ExecuTorchModel(sys.argv[1])
c = m.new_cache()
m(torch.randint(0, 4000, (1, 150)), cache=c)
for _ in range(40):
    m(torch.tensor([[7]]), cache=c)
print(json.dumps(proc_status()))
"""


def test_predicted_heap_within_10_percent_and_peak_of_measured_rss(et_artifact: Path) -> None:
    from ossedge.runtime.config import config_from_hf_dict

    m = json.loads((et_artifact / "manifest.json").read_text())
    cfg = config_from_hf_dict(m["config"])
    p = subprocess.run([sys.executable, "-c", RSS_RUN, str(et_artifact)], capture_output=True,
                       text=True, check=True)
    measured = json.loads(p.stdout.strip().splitlines()[-1])
    f = executorch_footprint(cfg, m["recipe"], CONTEXT, max_prefill=m["max_prefill"],
                             host="python")
    # the heap, what counts against an app's limit, within 10%
    assert abs(f.anon / measured["RssAnon"] - 1) < 0.10, (f.anon, measured["RssAnon"])
    # the peak: the runtime libraries' file-backed pages (0.09-0.15 GB here) follow what the page
    # cache holds, a third of this tiny model's whole footprint, hence 20%
    assert abs(f.resident / measured["VmHWM"] - 1) < 0.20, (f.resident, measured["VmHWM"])
    assert f.anon - HOST_BYTES["python"][0] > 0  # the model's own parts are counted


def test_20b_footprint_parts_have_the_known_sizes() -> None:
    f = executorch_footprint(BIG, "mobile", 4096)
    assert 10.1e9 < f.part("experts") < 10.3e9  # 24 layers × 32 experts of MXFP4 (+ biases)
    assert f.part("kv_cache") == 12 * 2 * 8 * 64 * 4 * (4096 + 128)
    assert 0.55e9 < f.part("embedding") < 0.6e9  # int8 rows + scales
    assert f.mapped > 10 * f.anon / 1.5


# -- planner -------------------------------------------------------------------------------------


def test_8gb_iphone_streams_executorch_and_cannot_hold_coreml() -> None:
    options = {(o.target, o.recipe): o for o in plan(get_device("iphone-15-pro"), BIG)}
    assert options[("executorch", "mobile")].fits == "streaming"
    assert options[("coreml", "mobile")].fits == "no"
    assert options[("executorch", "native")].fits == "no"
    assert all(o.max_context_resident == 0 for o in options.values())


def test_16gb_ipad_holds_coreml_mobile_resident() -> None:
    o = plan(get_device("ipad-pro-m4"), BIG, targets=("coreml",), recipes=("mobile",))[0]
    assert o.fits == "resident" and o.max_context_resident > 4096
    assert 0 < o.decode_tok_s_ceiling < 120e9 / 1.2e9


def test_choose_picks_a_smaller_context_when_4096_does_not_fit() -> None:
    at4096 = executorch_footprint(BIG, "mobile", 4096).resident
    at1024 = executorch_footprint(BIG, "mobile", 1024).resident
    dev = device_from_dict(profile(name="tight", app_budget_gb=(at4096 + at1024) / 2 / 1e9))
    o = choose(dev, BIG, "executorch", recipe="mobile")
    assert o.fits == "resident" and MIN_CONTEXT <= o.footprint.context < 4096
    assert evaluate(dev, BIG, "executorch", "mobile", o.footprint.context + 1).fits != "resident"


def test_choose_prefers_quality_when_it_fits_and_refuses_what_cannot() -> None:
    roomy = device_from_dict(profile(name="roomy", ram_gb=64, app_budget_gb=40))
    assert choose(roomy, BIG, "executorch").recipe == "native"
    tiny = device_from_dict(profile(name="tiny", app_budget_gb=0.5))
    with pytest.raises(BudgetError, match="more than tiny's app budget of 0.5 GB"):
        choose(tiny, BIG, "executorch")
    assert choose(tiny, BIG, "executorch", force=True).fits == "no"


def test_plan_json_and_exit_4_when_nothing_fits(tmp_path: Path) -> None:
    p = run("plan", "--device", "galaxy-s25-ultra", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["device"]["name"] == "galaxy-s25-ultra" and {o["target"] for o in d["options"]} == {
        "executorch", "onnx"}  # no Core ML on Android
    f = tmp_path / "small.json"
    f.write_text(json.dumps(profile(name="small", app_budget_gb=0.2)))
    p = run("plan", "--device", str(f), "--target", "executorch")
    assert p.returncode == 4 and "nothing fits small's app budget" in p.stderr


def test_convert_for_a_device_that_cannot_hold_it_exits_4_and_writes_nothing(
    tmp_path: Path, tiny_ckpt: Path
) -> None:
    f = tmp_path / "watch.json"
    f.write_text(json.dumps(profile(name="watch", app_budget_gb=0.05)))
    out = tmp_path / "out"
    p = run("convert", str(tiny_ckpt), "-o", str(out), "--device", str(f))
    assert_one_line_error(p, "more than watch's app budget of 0.05 GB", "--force", code=4)
    assert not out.exists() and list(tmp_path.iterdir()) == [f]


def test_plan_for_an_artifact_takes_its_target_recipe_and_context(et_artifact: Path) -> None:
    p = run("plan", "--device", "pixel-9-pro", "--model", str(et_artifact), "--json")
    assert p.returncode == 0, p.stderr
    (o,) = json.loads(p.stdout)["options"]
    assert (o["target"], o["recipe"], o["context"], o["fits"]) == (
        "executorch", "mobile", CONTEXT, "resident")

"""`glsd bench` in smoke mode (--quick): every section runs, the JSON has its keys, and every
ratio is a positive finite number. Timings are never asserted (the machine is shared)."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glsd.tools.bench import SCHEMA, SECTIONS, TARGETS, allocator_info, run_bench

from helpers_tiny import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def finite_nonneg(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x >= 0


@pytest.fixture(scope="module")
def quick():
    """One smoke run of every section (one thread: steadier on a busy 2-core machine)."""
    return run_bench("cpu-default", quick=True, threads=1)


def test_top_level(quick):
    assert quick["schema"] == SCHEMA and quick["quick"] is True
    assert set(SECTIONS) <= set(quick)
    for key in ("env", "config", "targets", "section_seconds", "elapsed_s"):
        assert key in quick
    env = quick["env"]
    for key in ("torch", "device", "device_name", "torch_threads", "load_avg", "allocator"):
        assert key in env
    assert set(env["allocator"]) >= {"ld_preload", "tcmalloc_loaded", "jemalloc_loaded", "allocator"}
    names = {t["name"] for t in quick["targets"]}
    assert names == set(TARGETS)
    for t in quick["targets"]:
        assert isinstance(t["met"], bool) and math.isfinite(t["value"])
    json.dumps(quick, allow_nan=False)  # strict JSON


def test_geometry_section(quick):
    g = quick["geometry"]
    assert [c["source_hw"] for c in g["cases"]] == [[32, 32], [375, 500]]
    for case in g["cases"]:
        assert positive(case["analytic_us_per_crop"]) and positive(case["position_map_us_per_crop"])
        assert positive(case["speedup"])
        for crop in case["crops"]:
            assert finite_nonneg(crop["max_disagreement_cells"])
            assert crop["grid"][0] >= 1
    assert positive(g["min_speedup"])
    # Not a timing: the two methods compute the same centres (well under 1 % of a cell).
    assert g["max_disagreement_cells"] < 0.01


def test_step_section(quick):
    s = quick["step"]
    for name, mode in s["modes"].items():
        assert positive(mode["images_per_s"]) and positive(mode["step_ms"])
        assert positive(mode["flops_per_step"])
        assert finite_nonneg(mode["match_share"]) and mode["match_share"] < 1
    assert s["modes"]["none"]["match_share"] == 0  # no local loss, no matching on a plain step
    assert positive(s["modes"]["geometric"]["match_share"])
    assert s["modes"]["geometric"]["flops_per_step"] > s["modes"]["none"]["flops_per_step"]
    assert set(s["modes"]) == {"none", "similarity", "geometric", "soft_geometric", "hybrid"}
    for key in ("ratio_geometric_over_none", "ratio_similarity_over_none", "match_share_geometric",
                "ratio_soft_geometric_over_none", "ratio_hybrid_over_none"):
        assert positive(s[key])
    assert len(s["local_head"]) >= 2
    for row in s["local_head"]:
        assert positive(row["images_per_s"]) and positive(row["ratio_over_none"])
        assert row["local_hidden_dim"] > 0 and row["local_out_dim"] > 0


def test_data_section(quick):
    d = quick["data"]
    assert "preset" in d["sources"] and d["headline_source"] in d["sources"]
    for src in d["sources"].values():
        dev = src["device_augment"]
        assert positive(dev["loader_uint8"]["images_per_s"]) and positive(dev["augment_images_per_s"])
        assert positive(dev["serial_images_per_s"])
        assert positive(src["ratio_device_loader_over_step"])
        assert positive(src["cpu_batched"]["images_per_s"]) and positive(src["ratio_cpu_batched_over_step"])
        # The headline follows the preset's data.augment_on (cpu-default: batched in the worker).
        assert src["ratio_pipeline_over_step"] == src["ratio_cpu_batched_over_step"]
    assert d["headline_path"] == "cpu_batched"
    assert positive(d["ratio_pipeline_over_step"]) and positive(d["step_images_per_s"])
    assert d["views_per_image"] == 6


def test_utilisation_section(quick):
    u = quick["utilisation"]
    assert positive(u["flops_per_step"])
    for dtype in ("fp32", "bf16"):
        assert positive(u["matmul_peak"][dtype]["flops_per_s"])
    assert {"fp32", "bf16", "bf16_fused_adamw"} <= set(u["variants"])
    assert u["channels_last_applicable"] is True  # the conv net of cpu-default
    assert "bf16_channels_last" in u["variants"]
    for row in u["variants"].values():
        for key in ("images_per_s", "achieved_flops_per_s", "utilisation", "speedup_over_fp32"):
            assert positive(row[key]), (key, row)
    opt = u["optimizer_step"]
    assert positive(opt["foreach_ms"]) and positive(opt["fused_ms"]) and positive(opt["speedup_fused"])
    assert "tcmalloc_loaded" in u["allocator"]


def test_knn_section(quick):
    k = quick["knn"]
    assert k["dim"] == 128 and k["n_train"] > k["n_test"] > 0
    assert positive(k["test_features_per_s"]) and positive(k["similarities_per_s"])
    assert finite_nonneg(k["peak_rss_delta_mib"]) and k["peak_method"]


def test_allocator_info_reads_ld_preload(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    info = allocator_info()
    assert info["tcmalloc_loaded"] and info["allocator"] == "tcmalloc"


def test_cli_sections_and_out_file(tmp_path):
    from glsd.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--threads", "1", "--sections", "geometry,knn", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["sections"] == ["geometry", "knn"] and "step" not in data
    assert [t["name"] for t in data["targets"]] == ["geometry.min_speedup", "geometry.max_disagreement_cells"]
    assert main(["bench", "--quick", "--sections", "nope"]) == 2  # a clear config error


def test_gpu_bench_code_path_on_cpu(tmp_path):
    """benchmarks/gpu_bench.py --tiny: the GPU script's code path (device augmentation, bf16,
    none vs geometric) with a tiny model on the CPU."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--tiny", "--device", "cpu",
                           "--warmup", "1", "--steps", "1", "--out", str(out)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["schema"] == "glsd-gpu-bench/1" and data["device_name"]
    assert set(data["modes"]) == {"none", "geometric"}
    for mode in data["modes"].values():
        assert positive(mode["images_per_s"])
    assert positive(data["ratio_geometric_over_none"]) and positive(data["augment_images_per_s"])
    assert "data.augment_on=device" in data["config_overrides"]
    assert "train.precision=bf16" in data["config_overrides"]


def test_gpu_bench_script_names_the_device():
    text = (ROOT / "benchmarks" / "gpu_bench.sh").read_text()
    assert "gpu-bench-${slug}.json" in text and "get_device_name" in text and "timeout" in text


def test_image_sections_of_a_preset_without_data_need_the_data_flag(capsys):
    from glsd.cli import main
    from glsd.config import ConfigError

    with pytest.raises(ConfigError, match=r"--data PATH") as err:
        run_bench("cifar10-lowdata-cpu", quick=True, sections=["geometry", "step"])
    assert "step" in str(err.value) and "--sections geometry" in str(err.value)
    assert main(["bench", "--preset", "cifar10-lowdata-cpu", "--quick", "--sections", "data"]) == 2
    assert "--data" in capsys.readouterr().err
    # Sections that need no images still run.
    out = run_bench("cifar10-lowdata-cpu", quick=True, sections=["geometry", "knn"], threads=1)
    assert out["sections"] == ["geometry", "knn"] and positive(out["geometry"]["min_speedup"])


def test_data_section_measures_the_images_given_by_data():
    from glsd.data.sample import sample_root

    out = run_bench("cpu-default", quick=True, sections=["data"], data=str(sample_root()), threads=1)
    d = out["data"]
    assert set(d["sources"]) == {"preset", "data"} and d["headline_source"] == "data"
    assert d["sources"]["data"]["root"] == str(sample_root())
    assert positive(d["sources"]["data"]["cpu_batched"]["images_per_s"])
    assert out["data_path"] == str(sample_root())


def test_the_harness_times_the_matching_without_replacing_it():
    from glsd.config import load_config
    from glsd.tools.bench.harness import build_harness, first_batch, run_interleaved

    from helpers_tiny import tiny_overrides

    cfg = load_config(None, tiny_overrides("unused"))
    h = build_harness("geometric", cfg, torch.device("cpu"), first_batch(cfg))
    run_interleaved([h], warmup=1, reps=2)
    assert "match" not in vars(h.ctx.objective)  # the objective's own method, not a wrapper
    assert h.match_inputs is not None and len(h.match_seconds) == 2
    assert positive(h.summary()["match_ms"]) and h.summary()["match_share"] < 1


@pytest.mark.skipif(importlib.util.find_spec("lightly") is None,
                    reason="lightly is not installed (pip install 'glsd[bench]')")
def test_peer_lightly_quick(tmp_path):
    """benchmarks/peer_lightly.py --quick: every arm steps, on both presets; glsd's global-only
    arm and lightly's do the same work (equal FLOPs per step), the local loss adds some."""
    out = tmp_path / "peer.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peer_lightly.py"), "--quick",
                           "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["schema"] == "glsd-peer-lightly/1" and "peer_lightly.py --quick" in data["command"]
    assert [r["preset"] for r in data["results"]] == ["cifar10-vit-tiny", "cifar10-lowdata-cpu"]
    for r in data["results"]:
        arms = r["arms"]
        assert set(arms) == {"glsd_none", "lightly", "lightly_per_view", "glsd_geometric"}
        for arm in arms.values():
            assert positive(arm["images_per_s"]) and len(arm["step_ms_all"]) == 2
        assert arms["glsd_none"]["flops_per_step"] == arms["lightly"]["flops_per_step"]
        assert arms["lightly"]["flops_per_step"] == arms["lightly_per_view"]["flops_per_step"]
        assert arms["glsd_geometric"]["flops_per_step"] > arms["glsd_none"]["flops_per_step"]
        assert positive(r["ratios"]["glsd_none_speed_over_lightly"]["median"])
        assert all(arm["top_ops"] and arm["top_ops"][0]["self_ms"] >= 0 for arm in arms.values())


def test_photo_data_quick(tmp_path):
    """benchmarks/photo_data.py --quick: a folder of generated JPEGs of varied sizes, every CPU
    decode path (decode, and decode + views at the photo preset's crops), and the step."""
    out = tmp_path / "photo.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "photo_data.py"), "--quick",
                           "--device", "cpu", "--folder", str(tmp_path / "jpg"), "--out", str(out)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["schema"] == "glsd-photo-data/1" and "photo_data.py --quick" in data["command"]
    assert data["preset"] == "photos-vit-s16" and data["crops"]["global"] == 224 and data["crops"]["local"] == 96
    assert len(data["image_sizes_wh"]) > 1 and len(list((tmp_path / "jpg").glob("*.jpg"))) == data["num_images"]
    assert set(data["paths"]) == {"pil", "pil_draft", "tv_cpu"}  # no CUDA here
    for row in data["paths"].values():
        assert row["images"] == data["num_images"]
        for key in ("decode_images_per_s", "decode_and_views_images_per_s", "ratio_decode_over_step"):
            assert positive(row[key])
        assert row["decode_and_views_images_per_s"] < row["decode_images_per_s"]
    assert positive(data["step"]["images_per_s"])


def test_photo_data_decoders_agree(tmp_path):
    """The decode paths compared give the same square (up to resampling differences), so the
    benchmark compares like with like."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import photo_data

    (path,) = photo_data.make_images(tmp_path, 1, [(300, 400)], None)
    pil = photo_data.pil_decode(path, 64, draft=False).float()
    for other in (photo_data.pil_decode(path, 64, draft=True), photo_data.tv_decode(path, 64)):
        assert other.shape == (3, 64, 64) and other.dtype == torch.uint8
        assert (other.float() - pil).abs().mean() < 8  # of 255


def _gpu_limit(tmp_path, *extra):
    out = tmp_path / "limit.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_limit.py"), "--dry-run",
                           "--out", str(out), *extra],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_gpu_limit_dry_run(tmp_path):
    """benchmarks/gpu_limit.py --dry-run: all three parts (glsd step per matching with syncs
    and FLOPs, timm's supervised step, torch.compile in a child process) on a tiny Swin."""
    data = _gpu_limit(tmp_path)
    assert data["schema"] == "glsd-gpu-limit/1" and "--dry-run" in data["command"] and data["dry_run"]
    assert data["preset"] == "imagenet-swin-t" and "train.precision=bf16" in data["config_overrides"]
    assert data["decode_size"] == 64  # recorded: the paper preset's own is 448, the committed H200 bench's 256
    rows = data["step"]["batches"]["2"]
    assert set(rows) == {"none", "geometric", "similarity"}
    for r in rows.values():
        assert positive(r["images_per_s"]) and positive(r["achieved_flops_per_s"])
        assert r["syncs"]["host_syncs"] == 0  # no CUDA runtime on a CPU
    assert rows["geometric"]["flops_per_step"] > rows["none"]["flops_per_step"]
    timm_row = data["timm"]["batches"]["2"]
    assert positive(timm_row["images_per_s"]) and timm_row["n_params"] > 0
    assert set(timm_row["flops_ratio_glsd_over_timm"]) == set(rows)
    comp = data["compile"]["modes"]["default"]
    assert comp["backend"] == "eager" and positive(comp["speedup"]) and comp["compile_s"] is not None


def test_gpu_limit_compile_timeout_is_recorded(tmp_path):
    """A compile that does not finish in its time limit is killed and recorded, not waited for."""
    data = _gpu_limit(tmp_path, "--parts", "compile", "--compile-timeout", "0.5", "--budget-compile", "90")
    assert "did not finish within" in data["compile"]["modes"]["default"]["error"]


def test_gpu_limit_counts_only_blocking_calls():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_limit import sync_counts

    names = ["cudaStreamSynchronize", "cudaMemcpyAsync", "cudaMemcpy", "cudaLaunchKernel",
             "cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item"]
    assert sync_counts(names) == {"events": {"cudaStreamSynchronize": 2, "cudaMemcpy": 1,
                                             "cudaDeviceSynchronize": 1}, "host_syncs": 4}


def _local_loss_cost(tmp_path, *args: str, timeout: int = 300) -> dict:
    """benchmarks/local_loss_cost.py against HEAD on cpu-default, one round: its JSON."""
    out = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "local_loss_cost.py"), "--rev", "HEAD",
                           "--preset", "cpu-default", "--rounds", "1", *args, "--out", str(out)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_local_loss_cost_quick(tmp_path):
    """benchmarks/local_loss_cost.py against HEAD's own loss: both parts run, the swapped-in
    loss of the same commit gives the same value and gradient, and every arm steps."""
    data = _local_loss_cost(tmp_path, "--step-rounds", "1")
    assert "local_loss_cost.py --rev HEAD" in data["command"]
    unchanged = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src/glsd/loss/dino.py"],
                               cwd=ROOT).returncode == 0
    if unchanged:  # HEAD's loss against itself (a work tree editing the loss differs, rightly)
        assert data["loss"]["max_abs_diff"] == {"loss": 0.0, "grad": 0.0}
    assert data["loss"]["shapes"]["student"] == [[2, 64, 64, 256], [4, 64, 16, 256]]
    step = data["step"]
    assert set(step["step_ms_median"]) == {"none", "geometric", "geometric_old_loss"}
    assert all(positive(v) for v in step["images_per_s"].values())
    assert positive(step["geometric_over_none"]["median"])


@pytest.mark.slow  # three torch.compile runs: a minute of CPU
def test_local_loss_cost_compile(tmp_path):
    """The compile part: the compiled losses give the eager loss's value and gradient."""
    data = _local_loss_cost(tmp_path, "--parts", "compile", timeout=600)["compile"]
    assert set(data["ms_median"]) == {"eager", "compiled", "compiled_rev"}
    for diff in data["max_abs_diff_to_eager"].values():
        assert diff["loss"] < 1e-4 and diff["grad"] < 1e-6


def test_step_breakdown_quick(tmp_path):
    """benchmarks/step_breakdown.py: every part of both arms timed; only the geometric arm
    matches and has a local loss."""
    out = tmp_path / "parts.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_breakdown.py"),
                           "--preset", "cpu-default", "--rounds", "1", "--out", str(out)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    parts = json.loads(out.read_text())["ms_median"]
    assert {"matching", "local_loss"} <= set(parts["geometric"]) and "local_loss" not in parts["none"]
    for arm in parts.values():
        assert all(v >= 0 for v in arm.values()) and positive(arm["backward"])


def test_benchmark_shell_scripts_parse_and_the_gpu_session_refuses_an_unknown_part(tmp_path):
    for script in sorted((ROOT / "benchmarks").glob("*.sh")):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script.name
    env = {**subprocess_env(), "OUT": str(tmp_path / "out")}
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "bogus"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown part bogus: study, limit or head" in bad.stderr
    env.pop("GLSD_DATA", None)
    no_data = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "study"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert no_data.returncode != 0 and "GLSD_DATA" in no_data.stderr


def test_sweep_table_rows_bold_the_best_and_skip_missing_metrics():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sweep_table import table

    rec = {"status": "done", "fraction": 0.05, "seed": 0, "knn_floor_top1": 30.0}
    lines = table([{**rec, "matching": "none", "knn_top1": 40.0},
                   {**rec, "matching": "hybrid", "knn_top1": 45.5},
                   {**rec, "matching": "geometric", "status": "failed"}])
    assert lines[2:] == ["| 0.05 | 0 | k-NN top-1 (%) | 30.00 | 40.00 | - | - | - | **45.50** |"]


def test_the_environment_record_reads_where_os_has_no_load_average(monkeypatch):
    """Windows has no os.getloadavg: the bench must still run (an empty load record)."""
    from glsd.tools.bench.common import load_avg

    monkeypatch.delattr("os.getloadavg")
    assert load_avg() == []

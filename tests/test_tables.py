"""The analysis package against a real (sqlite) MLflow store holding runs in the sweeps' schema."""
import hashlib
import json
import time

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from analysis import paper
from analysis.make_tables import build_tables, main, make_tables
from analysis.plots import sigma_figure
from nds.config import REPO_ROOT
from nds.eval.metrics import DATA_CLASSIFIER, FID, SUBSTITUTE, anchor_name
from nds.tracking import RunKind, Tag, tag_filter

PAPERS = REPO_ROOT.parent / "shared" / "papers"

SPEC = "28x28x1, 4x4x32, 2x2x16"
GFLOPS = {1: 1.0, 2: 0.1, 3: 0.05}


def _hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def chain_params(dataset="fashion_mnist", depth=1, sigma=None, seed=0, classes=0, encoder="efficientnet_lite0",
                 spec=SPEC, steps=100, text="", cfg_scale=1.0) -> dict:
    """Flat params as nds.config.schema.flatten writes them (σ of levels below L fixed at 0.5)."""
    params = {"data.name": dataset, "hierarchy.L": str(depth), "hierarchy.spec": spec, "encoder.name": encoder,
              "model.num_classes": str(classes), "model.text_encoder": text, "seed": str(seed),
              "diffusion.cfg_scale": str(cfg_scale),
              "training.steps": str(steps)}
    params.update({f"hierarchy.shape.{i}": s.strip() for i, s in enumerate(spec.split(","), start=1)})
    params.update({f"hierarchy.sigma.{level}": str(float(sigma if level == depth else 0.5))
                   for level in range(2, depth + 1)})
    return params


def chain_metrics(depth: int, value: float, metric: str = SUBSTITUTE) -> dict:
    metrics = {SUBSTITUTE: value, "levels.trained": depth, "levels.reused": 0,
               anchor_name(SUBSTITUTE, "real"): 1.5, anchor_name(SUBSTITUTE, "noise"): 115.0}
    if metric == FID:
        metrics[FID] = value + 100
    if metric == DATA_CLASSIFIER:
        metrics[DATA_CLASSIFIER] = value / 10
    for level in range(1, depth + 1):
        metrics[f"level{level}/gflops"] = GFLOPS[level]
        metrics[f"level{level}/params"] = 2e5 / level
    metrics["total/gflops"] = sum(GFLOPS[level] for level in range(1, depth + 1))
    metrics["total/params"] = sum(2e5 / level for level in range(1, depth + 1))
    return metrics


def log_trial(client: MlflowClient, sweep: str, variant: str, params: dict, metrics: dict, *,
              status: str = "FINISHED", history: list[tuple[int, float]] = (), tags: dict | None = None,
              metric: str = SUBSTITUTE) -> str:
    """A trial run as nds.sweep.runner.run_trial logs it, under its sweep's stage run (made on first use)."""
    name = "nds-" + sweep.replace("_", "-")
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    stages = client.search_runs([experiment_id], tag_filter(Tag.KIND, RunKind.STAGE) + " and " + tag_filter(Tag.SWEEP, sweep))
    if stages:
        stage = stages[0].info.run_id
    else:
        stage_tags = {Tag.KIND: RunKind.STAGE, Tag.SWEEP: sweep, Tag.STAGE: "s"}
        stage = client.create_run(experiment_id, run_name=f"{sweep}-stage", tags=stage_tags).info.run_id
        client.set_terminated(stage)
    run_tags = {Tag.KIND: RunKind.TRIAL, Tag.SWEEP: sweep, Tag.STAGE: "s", Tag.VARIANT: variant, Tag.METRIC: metric,
                Tag.CONFIG_HASH: _hash(params), Tag.GROUP_HASH: _hash({k: v for k, v in params.items() if k != "seed"}),
                "mlflow.parentRunId": stage, **(tags or {})}
    run_id = client.create_run(experiment_id, run_name=f"{variant}-seed{params['seed']}", tags=run_tags).info.run_id
    now = int(time.time() * 1000)
    logged = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    logged += [Metric(metric, float(v), now + i, step) for i, (step, v) in enumerate(history)]
    client.log_batch(run_id, metrics=logged, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run_id, status)
    return run_id


def log_sigma_sweep(client: MlflowClient, dataset: str = "fashion_mnist", metric: str = SUBSTITUTE) -> None:
    """Table 1 and 2 runs: two seeds of L=1, a re-run config, a re-run setting, a FAILED run, gaps at L=3."""
    def log(variant, depth, sigma, seed, value, classes=0, steps=100, status="FINISHED"):
        log_trial(client, "sweep_sigma", variant, chain_params(dataset, depth, sigma, seed, classes, steps=steps),
                  chain_metrics(depth, value, metric), metric=metric, status=status)

    log("L1", 1, None, 0, 40.0)
    log("L1", 1, None, 1, 42.0)
    log("L2-sigma0", 2, 0.0, 0, 30.0)
    log("L2-sigma0.5", 2, 0.5, 0, 20.0)
    log("L2-sigma0.5", 2, 0.5, 0, 21.0)  # the same config re-run: the newest counts, once
    log("L2-sigma1", 2, 1.0, 0, 25.0)
    log("L2-sigma1", 2, 1.0, 0, 23.0, steps=200)  # the sweep re-run with other settings: the newest shows
    log("L3-sigma0.5", 3, 0.5, 0, 24.0)
    log("L3-sigma1", 3, 1.0, 0, 1.0, status="FAILED")  # ignored: L3 σ=1.0 is missing
    log("L1", 1, None, 0, 35.0, classes=10)
    log("L2-sigma0.5", 2, 0.5, 0, 18.0, classes=10)


def log_text_sweep(client: MlflowClient, dataset: str = "fashion_mnist", metric: str = SUBSTITUTE) -> None:
    """Table 3 runs: caption-conditioned L=1 (two seeds) and L=2 at two settings, the guided one with two seeds."""
    for variant, depth, sigma, seed, value, cfg in [("L1", 1, None, 0, 33.0, 1.0), ("L1", 1, None, 1, 35.0, 1.0),
                                                    ("L2-sigma0.5", 2, 0.5, 0, 29.0, 1.0),
                                                    ("L2-sigma1-g2", 2, 1.0, 0, 26.0, 2.0),
                                                    ("L2-sigma1-g2", 2, 1.0, 1, 28.0, 2.0)]:
        log_trial(client, "sweep_sigma", variant,
                  chain_params(dataset, depth, sigma, seed, text="minilm", cfg_scale=cfg),
                  chain_metrics(depth, value, metric), metric=metric)


def log_other_sweeps(client: MlflowClient) -> None:
    for depth, value in [(1, 40.0), (2, 22.0), (3, 19.0)]:
        log_trial(client, "sweep_depth", f"L{depth}", chain_params(depth=depth, sigma=0.5), chain_metrics(depth, value))
    for encoder, value in [("vae", 33.0), ("efficientnet_lite0", 19.0)]:
        log_trial(client, "sweep_encoders", f"encoder={encoder}", chain_params(depth=3, sigma=0.5, encoder=encoder),
                  chain_metrics(3, value))
    log_trial(client, "sweep_rcg", "spatial", chain_params(depth=2, sigma=0.5), chain_metrics(2, 22.0))
    log_trial(client, "sweep_rcg", "rcg", chain_params(depth=2, sigma=0.0, encoder="rcg_moco_v3", spec="28x28x1, 1x1x256"),
              chain_metrics(2, 27.0))
    for variant, baseline, phases, res, curve in [
        ("phase200-200", "nested", "[200, 200]", "[14, 28]", [60.0, 40.0, 30.0, 26.0]),
        ("phase0-400", "nested", "[0, 400]", "[14, 28]", [70.0, 50.0, 38.0, 31.0]),
        ("res7-14-28", "nested", "[200, 200]", "[7, 14, 28]", [58.0, 39.0, 29.0, 24.0]),
        ("nested", "nested", "[200, 200]", "[14, 28]", [60.0, 40.0, 30.0, 26.0]),  # = phase200-200's config
        ("cascaded", "cascaded", "[200, 200]", "[14, 28]", [80.0, 60.0, 45.0, 35.0]),
        ("plain", "plain", "[0, 400]", "[28]", [75.0, 55.0, 42.0, 33.0]),
    ]:
        params = {"data.name": "fashion_mnist", "seed": "0", "mdm.phase_steps": phases, "mdm.resolutions": res,
                  "model.num_classes": "0", "model.text_encoder": ""}
        log_trial(client, "sweep_mdm", variant, params, {"mdm/gflops": 0.3, "mdm/params": 1.5e6},
                  history=list(zip([100, 200, 300, 400], curve)), tags={Tag.MDM_BASELINE: baseline})
    for seed, shift in [(0, 0.0), (1, 2.0)]:  # Fig. 8c: a caption-conditioned NestedUNet's guidance curve
        params = {"data.name": "fashion_mnist", "seed": str(seed), "mdm.phase_steps": "[200, 200]",
                  "mdm.resolutions": "[14, 28]", "model.num_classes": "0", "model.text_encoder": "minilm"}
        curve_points = {"guidance1/fd_effnet_lite0": 30.0 + shift, "guidance1/caption_class_accuracy": 0.3,
                        "guidance3/fd_effnet_lite0": 36.0 + shift, "guidance3/caption_class_accuracy": 0.7}
        log_trial(client, "sweep_mdm", "text-nested", params, {"mdm/gflops": 0.4, **curve_points},
                  history=[(400, 29.0 + shift)], tags={Tag.MDM_BASELINE: "nested"})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Every sweep's runs in one sqlite store (nds-sweep-shapes has none: it is skipped)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(uri)
    log_sigma_sweep(client)
    log_text_sweep(client)
    log_other_sweeps(client)
    return uri


@pytest.fixture(scope="module")
def tables(store):
    built, messages = build_tables(store)
    return {t.name: t for t in built}, messages


def rows_by(part, column="L"):
    return {row[column]: row for row in part.frame.to_dict("records")}


def test_table1_dedupes_averages_seeds_bolds_best_and_says_missing(tables):
    table = tables[0]["table1_sigma"]
    ours = table.parts[0]
    assert ours.title == "fashion_mnist — unconditional — ours"
    rows = rows_by(ours)
    assert rows[1]["no σ (L=1)"] == "41.00 ± 1.41 (n=2)" and rows[1]["σ_L=0.5"] == "—"
    assert rows[2]["σ_L=0.5"] == "**21.00**"  # the re-run replaced the first run, not averaged with it
    assert rows[2]["σ_L=0.0"] == "30.00" and rows[2]["best σ_L"] == "0.5" and rows[2]["no σ (L=1)"] == "—"
    assert rows[2]["σ_L=1.0"] == "23.00" and table.notes == [
        "table1_sigma: 1 older setting(s) on the same cells not shown (the newest is)"]
    assert rows[3]["σ_L=1.0"] == "missing"  # only a FAILED run there
    assert rows[3]["σ_L=0.0"] == "missing" and rows[3]["z_L"] == "2x2x16"
    assert rows[2]["GFLOPs total"] == "1.1" and rows[2]["GFLOPs growth vs L=1"] == "+10.0%"
    assert rows[2]["params (level L)"] == "0.1M"


def test_the_sigma_plot_shows_seed_counts_error_bars_and_the_metric_range(tables):
    table = tables[0]["table1_sigma"]
    ax = sigma_figure(table).axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "L=1, no σ (n=2 seeds)" in labels  # the two seeds of L = 1
    assert any(label.startswith("L=2 (n=") for label in labels)
    assert "real images (1.5)" in labels and "uniform noise (115.0)" in labels  # the logged anchors
    bottom, top = ax.get_ylim()
    assert bottom == 0 and top > 115  # the whole range from 0 past noise, not zoomed onto the points
    assert any(len(line.get_segments()) for line in ax.collections)  # error bars drawn


def test_table2_holds_the_conditional_runs(tables):
    table = tables[0]["table2_sigma"]
    rows = rows_by(table.parts[0])
    assert table.parts[0].title == "fashion_mnist — class (10 classes) — ours"
    assert rows[1]["no σ (L=1)"] == "35.00" and rows[2]["σ_L=0.5"] == "18.00"


def test_table3_shows_each_depths_best_text_setting_beside_uvit(tables):
    table = tables[0]["table3_text"]
    ours = table.parts[0]
    assert ours.title == "fashion_mnist — text (minilm) — ours"
    rows = rows_by(ours)
    assert set(rows) == {1, 2}  # one row per depth: its best σ and guidance
    assert rows[2]["fd_effnet_lite0 ↓"] == "**27.00 ± 1.41 (n=2)**"
    assert rows[2]["σ_2..σ_L"] == "1" and rows[2]["guidance"] == "2"
    assert rows[1]["fd_effnet_lite0 ↓"] == "34.00 ± 1.41 (n=2)"
    published = table.parts[-1]
    assert published.title.startswith("published — U-ViT") and "5.95" in published.frame["FID"].tolist()
    assert "not legible" in table.caption and any("L=2" in line for line in table.summary)
    assert "text" not in "".join(p.title for p in tables[0]["table2_sigma"].parts[:1])  # class part first


def test_paper_numbers_are_shown_and_labelled_as_the_papers(tables):
    by_name = tables[0]
    part = by_name["table1_sigma"].parts[-1]
    assert part.title.startswith("paper — Nested Diffusion Models") and "Table 1(b)" in part.title
    rows = rows_by(part)
    (_, _, _, _, (single,)), *deeper = paper.TABLE1B["rows"]
    assert rows[1]["no σ (L=1)"] == f"{single:.2f}"
    for depth, _, _, _, fids in deeper:  # each depth's best σ_L in bold
        for sigma, fid in zip(paper.TABLE1B["sigmas"], fids):
            assert rows[depth][f"σ_L={sigma:.1f}"] == (f"**{fid:.2f}**" if fid == min(fids) else f"{fid:.2f}")
    assert rows_by(by_name["depth"].parts[-1])[4]["FID at best σ_L"] == f"{min(deeper[-1][-1]):.2f}"
    assert f"{paper.IMAGENET1K_CONDITIONAL['rows'][-1][1]:g}" in by_name["table2_sigma"].parts[-1].frame["FID"].tolist()
    mdm_cost = rows_by(by_name["mdm"].parts[-2], "paper's model")
    for _, name, seconds in paper.MDM_SEC_PER_ITER["rows"]:
        assert mdm_cost[name]["sec/iter"] == f"{seconds:.2f}"
    assert "not comparable" in by_name["table1_sigma"].caption


def test_the_papers_numbers_are_the_ones_in_the_papers():
    """Each number analysis.paper prints beside ours is in the paper's text (../shared/papers), in the
    row it is read from; a mistyped constant fails here, not only in a reader's eyes."""
    if not PAPERS.is_dir():
        pytest.skip(f"the papers' text is not at {PAPERS}")
    nested = " ".join((PAPERS / "000_949d78b148437a9f.txt").read_text().split())
    mdm = " ".join((PAPERS / "003_3d38e1554595799d.txt").read_text().split())
    for depth, shape, gflops, params, fids in paper.TABLE1B["rows"]:
        shape_tex = " \\times ".join(shape.split("x"))  # the extraction writes 6x6x32 as 6 \times 6 \times 32
        row = [f"{gflops:.2f}", params, *(f"{fid:.2f}" for fid in fids)]
        windows = [nested[at:at + 300] for at in range(len(nested)) if nested.startswith(shape_tex, at)]
        assert any(all(number in window for number in row) for window in windows), \
            f"Table 1(b) L={depth}: {shape} with {row} is not a row of the paper"
    (_, single), (_, nested_fid) = paper.IMAGENET1K_CONDITIONAL["rows"]
    assert f"{single:g} to {nested_fid:g}" in nested, "§4.3: the ImageNet-1k FIDs are not in the paper"
    for _, name, seconds in paper.MDM_SEC_PER_ITER["rows"]:
        assert f"{seconds:.2f}" in mdm, f"MDM wall-clock: {name} {seconds:.2f} is not in the paper"
    for label, fid in paper.MDM_FID["rows"]:
        assert f"{fid:.2f}" in mdm, f"MDM Table 1: {label} {fid:.2f} is not in the paper"


def test_substitute_metric_is_never_called_fid(tables):
    for table in tables[0].values():
        assert table.metric == SUBSTITUTE
        assert "substitute" in table.caption
        for part in table.parts:
            if not part.title.startswith(("paper", "published")):
                assert not any("FID" in str(column) for column in part.frame.columns), (table.name, part.title)
                assert "FID" not in part.title


def test_row_tables_and_skipped_sweep(tables):
    by_name, messages = tables
    assert "shapes: no finished sweep_shapes trials — skipped" in messages
    depth = rows_by(by_name["depth"].parts[0])
    assert depth[3]["fd_effnet_lite0 ↓"] == "**19.00**" and depth[2]["σ_2..σ_L"] == "0.5"
    encoders = rows_by(by_name["table4a_encoders"].parts[0], "encoder")
    assert encoders["vae"]["fd_effnet_lite0 ↓"] == "33.00" and encoders["vae"]["L"] == 3
    rcg = rows_by(by_name["table4b_rcg"].parts[0], "variant")
    assert rcg["spatial"]["fd_effnet_lite0 ↓"] == "**22.00**" and rcg["rcg"]["spec"] == "28x28x1, 1x1x256"


def test_mdm_final_values_and_curves(tables):
    mdm = tables[0]["mdm"]
    parts = {p.title: p for p in mdm.parts}
    baselines = rows_by(parts["fashion_mnist — NestedUNet vs cascaded vs plain vs latent — ours (final values)"], "variant")
    assert baselines["nested"]["fd_effnet_lite0 ↓"] == "**26.00**" and baselines["cascaded"]["iterations"] == "400"
    assert baselines["plain"]["GFLOPs"] == "0.3" and baselines["plain"]["params"] == "1.5M"
    phases = rows_by(parts["fashion_mnist — Fig. 8a: progressive-training schedules — ours (final values)"], "variant")
    assert set(phases) == {"phase200-200", "phase0-400"}
    curve = mdm.curves[mdm.curves["variant"] == "cascaded"].sort_values("step")
    assert curve["step"].tolist() == [100, 200, 300, 400] and curve["mean"].tolist() == [80.0, 60.0, 45.0, 35.0]


def test_fig8c_guidance_curve_pairs_the_metric_with_caption_agreement(tables):
    table = tables[0]["fig8c_guidance"]
    (ours,) = table.parts
    assert ours.title == "fashion_mnist — text (minilm) — ours"
    rows = rows_by(ours, "guidance")
    assert rows["1"]["fd_effnet_lite0 ↓"] == "**31.00 ± 1.41 (n=2)**" and rows["3"]["fd_effnet_lite0 ↓"] == "37.00 ± 1.41 (n=2)"
    assert rows["3"]["caption_class_accuracy ↑"] == "0.700 ± 0.000" and rows["1"]["variant"] == "text-nested"
    assert "substitute, not a CLIP score" in table.caption


def test_make_tables_writes_every_format(store, tmp_path):
    markdown = make_tables(store, None, tmp_path)
    for name in ["table1_sigma", "table2_sigma", "depth", "table4a_encoders", "table4b_rcg", "mdm"]:
        for suffix in (".md", ".tex", ".csv"):
            assert (tmp_path / f"{name}{suffix}").stat().st_size > 0, name + suffix
    assert not (tmp_path / "shapes.md").exists()
    for png in ["table1_sigma", "table2_sigma", "depth", "mdm_fig8a_phases", "mdm_fig8b_resolutions", "mdm_baselines"]:
        assert (tmp_path / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert (tmp_path / "tables.md").read_text() == markdown
    assert "| 2 | 4x4x32 |" in markdown and "**21.00**" in markdown
    latex = (tmp_path / "table1_sigma.tex").read_text()
    assert r"\textbf{21.00}" in latex and r"41.00 $\pm$ 1.41 (n=2)" in latex and "**" not in latex
    assert r"\caption{Table 1" in latex and r"fd\_effnet\_lite0" in latex and r"$\sigma_L$=0.5" in latex
    csv = (tmp_path / "table1_sigma.csv").read_text()
    assert csv.startswith("part,source,L,z_L,") and "missing" in csv and "**" not in csv and "44.40" in csv


def test_cli_formats_and_exit_codes(store, tmp_path, capsys):
    assert main(["--tracking-uri", store, "--out-dir", str(tmp_path), "--format", "csv",
                 "--experiments", "nds-sweep-rcg", f"paths.runs_dir={tmp_path}"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "table4b_rcg.csv"]  # runs_dir=tmp_path applied
    assert [p.name for p in (tmp_path / "report").iterdir()] == ["nds-sweep-rcg.html"]
    assert "table1_sigma: no finished sweep_sigma trials" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no finished trial runs in experiment"):
        main(["--tracking-uri", store, "--out-dir", str(tmp_path), "--experiments", "nds-nothing-here",
              f"paths.runs_dir={tmp_path}"])
    assert "No finished trial runs" in (tmp_path / "report" / "nds-nothing-here.html").read_text()


def test_true_fid_is_labelled_fid(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'fid.db'}")
    log_sigma_sweep(client, dataset="digits", metric=FID)
    tables, _ = build_tables(f"sqlite:///{tmp_path / 'fid.db'}")
    table1 = next(t for t in tables if t.name == "table1_sigma")
    assert table1.metric == FID and "Ours on digits: FID (clean-fid" in table1.caption
    assert rows_by(table1.parts[0])[2]["σ_L=0.5"] == "**121.00**"


def test_newest_runs_choose_the_metric_and_older_settings_give_way(tmp_path):
    """Re-running a sweep with the data classifier: the tables switch to fd_data_classifier, the re-run
    settings replace the older ones on their cells, and a cell only the older runs filled says missing."""
    uri = f"sqlite:///{tmp_path / 'mixed.db'}"
    client = MlflowClient(uri)
    log_sigma_sweep(client)  # fd_effnet_lite0 only
    for sigma, value in [(0.0, 300.0), (0.5, 100.0), (1.0, 200.0)]:
        params = {**chain_params(depth=2, sigma=sigma), "eval.data_classifier": "True"}  # another eval config
        log_trial(client, "sweep_sigma", f"L2-sigma{sigma}", params, chain_metrics(2, value, DATA_CLASSIFIER),
                  metric=DATA_CLASSIFIER)
    table1 = next(t for t in build_tables(uri)[0] if t.name == "table1_sigma")
    assert table1.metric == DATA_CLASSIFIER and "fd_data_classifier — Fréchet distance" in table1.caption
    rows = rows_by(table1.parts[0])
    assert rows[2]["σ_L=0.5"] == "**10.00**" and rows[2]["σ_L=0.0"] == "30.00"
    assert "missing" in rows[3].values()  # L = 3 ran only before, without the classifier
    forced = next(t for t in build_tables(uri, metric=SUBSTITUTE)[0] if t.name == "table1_sigma")
    assert forced.metric == SUBSTITUTE and rows_by(forced.parts[0])[2]["σ_L=0.5"] == "**100.00**"


def test_guidance_rows_diagnostic_columns_and_the_plain_sentences(tmp_path):
    """A σ sweep with a guidance ablation and the chain diagnostic: a row per (L, guidance), the diagnostic
    beside each nested setting, and sentences that call a gap a finding only beyond 3× the seed std."""
    from nds.eval.diagnostics import null_cond_name, sampled_name, true_cond_name

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def log(variant, depth, sigma, scale, values, diag=None):
        for seed, value in enumerate(values):
            params = {**chain_params(depth=depth, sigma=sigma, seed=seed), "diffusion.cfg_scale": str(scale)}
            metrics = chain_metrics(depth, value, DATA_CLASSIFIER)
            metrics[DATA_CLASSIFIER] = value
            if diag:
                true, null = diag
                metrics.update({sampled_name(DATA_CLASSIFIER): value + 1, true_cond_name(DATA_CLASSIFIER, 1): true,
                                null_cond_name(DATA_CLASSIFIER, 1): null, "level2/z_fd": 70.0,
                                "level2/z_fd_floor": 32.0, "level2/z_std": 0.95})
            log_trial(client, "sweep_sigma", variant, params, metrics, metric=DATA_CLASSIFIER)

    log("L1", 1, None, 1.0, [40.0, 41.0, 39.0])
    log("L2-sigma0.5-cfg1", 2, 0.5, 1.0, [38.0, 40.0, 39.0], diag=(37.0, 41.0))
    log("L2-sigma0.5-cfg3", 2, 0.5, 3.0, [33.0, 33.5, 32.5], diag=(31.0, 41.0))
    log("L2-sigma1-cfg3", 2, 1.0, 3.0, [34.0, 32.5, 33.5], diag=(32.0, 41.0))
    tables, _ = build_tables(client.tracking_uri)
    table = next(t for t in tables if t.name == "table1_sigma")
    ours, diagnostic = table.parts[0].frame, table.parts[1].frame
    assert list(zip(ours["L"], ours["guidance"])) == [(1, "—"), (2, "1"), (2, "3")]  # L = 1 is unconditional
    assert ours.loc[2, "σ_L=0.5"].startswith("**33.00 ± 0.50 (n=3)")
    assert "diagnostic" in table.parts[1].title and len(diagnostic) == 3
    best = diagnostic[(diagnostic["guidance"] == "3") & (diagnostic["σ_2..σ_L"] == "0.5")].iloc[0]
    assert (best["level 1 true cond."], best["level 1 null cond."]) == ("31.00", "41.00")
    assert best["condition use (null − true)"] == "+10.00" and best["prior's share (sampled − true)"] == "+3.00"
    assert best["z_2 FD (floor)"] == "70.0 (32.0)"
    summary = " ".join(table.summary)
    assert "L=2, σ = 0.5, guidance 3 (the best nested setting) beats L=1 by 7.00 ± 0.50 over 3 seed(s), better in 3 of 3 paired seeds" in summary
    assert "(more than 3× the larger seed std (1.00): a finding)" in summary
    assert "leads the next (L=2, σ = 1, guidance 3, 33.33) by 0.33 (within the seed std (0.76): not a finding)" in summary
    assert "**What the runs show:**" in make_tables(client.tracking_uri, None, tmp_path / "tables", ("md", "png"))
    assert (tmp_path / "tables" / "table1_sigma.png").is_file()

    log("L2-sigma0.5-cfg3", 2, 0.5, 3.0, [38.5, 42.0, 36.0], diag=(31.0, 41.0))  # a noisy re-run: no finding
    table = next(t for t in build_tables(client.tracking_uri)[0] if t.name == "table1_sigma")
    assert "not a finding" in " ".join(table.summary)


def test_each_experiment_gets_a_report_with_its_tables_and_every_run_id(store, tmp_path):
    from analysis.runs import load_trials

    make_tables(store, None, tmp_path / "tables", ("md",), report_dir=tmp_path / "report")
    page = (tmp_path / "report" / "nds-sweep-sigma.html").read_text()
    for table in build_tables(store, ["nds-sweep-sigma"])[0]:
        assert f"id='{table.name}'" in page and table.parts[0].title in page
    assert "What the runs show" in page or "chain diagnostic" not in page
    assert "<img" in page  # the σ plot, inlined
    for run_id in load_trials(store, ["nds-sweep-sigma"])["run_id"]:
        assert run_id in page
    other = load_trials(store, ["nds-sweep-encoders"])["run_id"]
    assert len(other) and not any(run_id in page for run_id in other)  # one experiment per page
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {"nds-sweep-sigma.html", "nds-sweep-encoders.html"}


def test_a_report_over_an_experiment_without_finished_runs_says_so(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    log_trial(client, "sweep_sigma", "L1", chain_params(), chain_metrics(1, 40.0), status="FAILED")
    from analysis.make_tables import write_reports

    [path] = write_reports(client.tracking_uri, None, tmp_path / "report")
    assert path.name == "nds-sweep-sigma.html" and "No finished trial runs" in path.read_text()
    with pytest.raises(SystemExit, match="no finished trial runs"):  # the tables have nothing to show either
        main(["--tracking-uri", client.tracking_uri, "--out-dir", str(tmp_path / "t"), "--report-dir",
              str(tmp_path / "r"), f"paths.runs_dir={tmp_path}"])
    assert "No finished trial runs" in (tmp_path / "r" / "nds-sweep-sigma.html").read_text()

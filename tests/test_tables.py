import pandas as pd

from analysis.tables import sigma_table, to_markdown, to_wide


def run(depth, sigma, seed, value, shape="4x4x32"):
    row = {"params.hierarchy.L": str(depth), "params.seed": str(seed), f"metrics.fd": value,
           "params.hierarchy.shape.1": "28x28x1", f"params.hierarchy.shape.{depth}": shape if depth > 1 else "28x28x1",
           f"metrics.level{depth}/gflops": 0.5 / depth, f"metrics.level{depth}/params": 1e6}
    if depth > 1:
        row[f"params.hierarchy.sigma.{depth}"] = str(sigma)
    return row


def test_seeds_average_best_is_bold_and_gaps_are_missing():
    trials = pd.DataFrame([run(1, None, 0, 40.0), run(1, None, 1, 42.0),
                           run(2, 0.0, 0, 30.0), run(2, 0.0, 1, 32.0), run(2, 1.0, 0, 20.0),
                           run(3, 1.0, 0, 25.0, shape="2x2x16")])
    wide = to_wide(sigma_table(trials, "fd"))
    rows = {r["L"]: r for r in wide.to_dict("records")}
    assert rows[1]["σ_L=—"] == "41.00 ± 1.41"
    assert rows[1]["σ_L=0.0"] == ""  # not applicable at L = 1
    assert rows[2]["σ_L=0.0"] == "31.00 ± 1.41" and rows[2]["σ_L=1.0"] == "**20.00**"
    assert rows[3]["σ_L=0.0"] == "missing" and rows[3]["z_L"] == "2x2x16"
    markdown = to_markdown(wide, "t")
    assert markdown.count("\n| ") == 4  # header + three rows

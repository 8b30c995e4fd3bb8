"""A few-step run of the text demo: data, local models, both methods on two seeds, evaluations at every
checkpoint, drafting, the statistics and the report; then a rerun that reuses the trained runs."""

from demo import run_demo_text


def test_demo_text_smoke(tmp_path):
    report = run_demo_text.main(["--smoke", "--out", str(tmp_path)])
    for key, _, _ in run_demo_text.METRICS:
        entry = report["summary"][key]
        for method in ("ntp", "mutor"):
            values = entry[method]["values"]
            assert len(values) == 2 and all(v == v for v in values), (key, method)  # two seeds, no NaN
        assert 0.0 <= entry["p_value"] <= 1.0 and "spread" in entry["verdict"]
    steps = [row["step"] for row in report["evaluations"]["mutor"][0]]
    assert len(steps) == 2 and steps[-1] == report["compute"]["mutor"]["steps"]  # every checkpoint evaluated
    for k, rows in report["drafting"].items():
        assert k in (2, 3, 4) and all(r["equal_to_plain"] and r["tokens_per_forward"] >= 1.0 for r in rows)
    text = (tmp_path / "report.md").read_text()
    assert "| Next-token | MuToR-1D |" in text and "seed-to-seed spread" in text and "It is not GSM8K" in text
    assert (tmp_path / "convergence.png").stat().st_size > 0
    # A rerun reuses the trained runs: no new checkpoint, the same evaluations.
    before = sorted(p.name for p in (tmp_path / "mutor-seed1" / "checkpoints").iterdir())
    again = run_demo_text.main(["--smoke", "--out", str(tmp_path)])
    assert sorted(p.name for p in (tmp_path / "mutor-seed1" / "checkpoints").iterdir()) == before
    assert again["evaluations"] == report["evaluations"]


def test_the_problems_are_distinct_and_held_out_ones_unseen():
    train = run_demo_text.reasoning_records(500, seed=0)
    test = run_demo_text.reasoning_records(100, seed=1, exclude={r["question"] for r in train})
    questions = [r["question"] for r in train + test]
    assert len(set(questions)) == 600
    for record in train + test:
        steps, result = record["answer"].split(" #### ")
        assert int(result) >= 0 and steps.count("=") == 2  # two worked steps, then GSM8K's final answer

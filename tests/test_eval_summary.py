"""summary.json numbers from hand-made evaluation records, and metrics truncation on resume."""

import json
import math

import pytest

from cpt.eval.summary import stability_gap, stage_summary
from cpt.train.metrics import MetricsLog, read_metrics


def _eval(step, code, prose, **extra):
    return {"kind": "eval", "step": step, "tokens": step * 100, "eval/code/loss": code, "eval/prose/loss": prose,
            "eval/seconds": 2.0, "eval/heldout_seconds": 1.0, "eval/tokens": 500, **extra}


RECORDS = [
    _eval(0, 6.0, 3.0, **{"harness/nl_code/acc": 0.25}),
    {"step": 0, "tokens": 100, "loss": 5.9, "lr": 1e-3},  # training records are ignored
    _eval(10, 6.3, 3.4),   # code rises above its base: the stability gap opens
    _eval(20, 6.5, 3.6),   # peak of the gap
    _eval(30, 5.8, 3.5),   # recovered below base at step 30
    _eval(40, 5.0, 3.2, **{"harness/nl_code/acc": 0.4}),
]


def test_summary_from_hand_made_records():
    s = stage_summary(RECORDS, stage="cpt", steps=40, tokens=4000, targeted=["code"], train_seconds=8.0)
    assert s["targeted"] == ["code"] and s["other"] == ["prose"]
    code, prose = s["domains"]["code"], s["domains"]["prose"]
    assert code == {"base_loss": 6.0, "final_loss": 5.0, "final_delta": -1.0, "max_delta": pytest.approx(0.5),
                    "max_delta_step": 20, "targeted": True}
    assert prose["final_delta"] == pytest.approx(0.2) and prose["max_delta"] == pytest.approx(0.6)
    assert prose["max_delta_step"] == 20 and prose["targeted"] is False
    assert s["forgetting"] == pytest.approx(0.2)
    assert s["adaptation"] == pytest.approx(1.0)
    assert s["stability_gap"] == {"code": {"gap": pytest.approx(0.5), "peak_step": 20, "recovered_step": 30}}
    assert s["harness"] == {"nl_code": {"acc": {"base": 0.25, "final": 0.4, "change": pytest.approx(0.15)}}}
    assert s["eval_seconds"] == 10.0 and s["eval_tokens_per_s"] == 500.0 and s["train_tokens_per_s"] == 500.0
    assert "ema" not in s


def test_summary_of_ema_weights_is_separate():
    records = [
        {**r, **{f"ema/{k}": v - 0.1 * r["step"] / 10 for k, v in r.items() if k.startswith("eval/") and k.endswith("loss")}}
        for r in RECORDS if r.get("kind") == "eval"
    ]
    s = stage_summary(records, stage="cpt", steps=40, tokens=4000, targeted=["code"])
    assert s["ema"]["domains"]["code"]["final_delta"] == pytest.approx(-1.4)
    assert s["domains"]["code"]["final_delta"] == pytest.approx(-1.0)
    assert s["train_tokens_per_s"] is None


@pytest.mark.parametrize(
    "series, expected",
    [
        ([(10, -0.1), (20, -0.3)], {"gap": 0.0, "peak_step": None, "recovered_step": 10}),  # no gap
        ([(10, 0.2), (20, 0.1)], {"gap": 0.2, "peak_step": 10, "recovered_step": None}),  # never recovers
        ([(10, 0.0), (20, 0.3), (30, -0.01), (40, 0.5)], {"gap": 0.3, "peak_step": 20, "recovered_step": 30}),
        ([], {"gap": 0.0, "peak_step": None, "recovered_step": None}),
    ],
)
def test_stability_gap(series, expected):
    assert stability_gap(series) == expected


def test_non_finite_losses_make_means_nan_not_errors():
    records = [_eval(0, 6.0, 3.0), _eval(10, 6.0, math.nan)]
    s = stage_summary(records, stage="x", steps=10, tokens=1000, targeted=["code"])
    assert math.isnan(s["forgetting"]) and s["adaptation"] == 0.0


def test_summary_needs_evaluations():
    with pytest.raises(ValueError, match="no evaluation records"):
        stage_summary([{"step": 0, "loss": 1.0}], stage="x", steps=1, tokens=1, targeted=[])


def test_truncate_keeps_the_evaluation_of_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"kind": "eval", "step": 0}, {"step": 0}, {"step": 1}, {"kind": "eval", "step": 2}, {"step": 2},
        {"kind": "eval", "step": 3},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "lo')  # torn last line
    log = MetricsLog(path)
    log.truncate_to(2)  # the checkpoint after 2 updates: training steps 0-1 and evaluations up to 2 stay
    assert read_metrics(path) == lines[:4]

"""The workloads' final report fits Kubernetes' termination-message limit and stays valid JSON."""

from __future__ import annotations

import json

from ragtune_workloads.reporting import termination_text


def test_a_long_skipped_list_is_shortened_not_cut():
    result = {"chunks": 5, "skipped": [{"path": f"docs/{i:04d}-" + "x" * 80 + ".pdf", "reason": "binary"}
                                       for i in range(300)]}
    text = termination_text(result)
    parsed = json.loads(text)
    assert len(text) <= 4000
    assert parsed["skippedTotal"] == 300 and 0 < len(parsed["skipped"]) < 300
    assert parsed["chunks"] == 5


def test_a_small_result_is_unchanged():
    result = {"digest": "sha256:" + "a" * 64, "metrics": {"rougeL": 0.4}}
    assert json.loads(termination_text(result)) == result

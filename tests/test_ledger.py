"""Unit tests of the capacity ledger: price update, bounds, workload-aware weights."""

import pytest

from server.checkpoints import truncate_history
from server.ledger import CapacityLedger, LedgerConfig, next_price, workload_weight


def test_price_rises_with_overload():
    # 0.1 + 0.5 * (0.30 - 0.05) = 0.225
    assert next_price(0.1, demand=0.30, capacity=0.05, step=0.5) == pytest.approx(0.225)


def test_price_falls_but_never_below_zero():
    # 0.1 + 0.5 * (0.01 - 0.05) = 0.08
    assert next_price(0.1, demand=0.01, capacity=0.05, step=0.5) == pytest.approx(0.08)
    # 0.01 + 0.5 * (0.0 - 0.05) < 0, projected to 0
    assert next_price(0.01, demand=0.0, capacity=0.05, step=0.5) == 0.0


def test_workload_weight_formula():
    assert workload_weight(20, max_pressure=3.0, beta=0.5) == pytest.approx(20 * (1 + 0.5 * 2.0))
    assert workload_weight(20, max_pressure=0.4, beta=0.5) == pytest.approx(20.0)


def test_bounds_are_zero_to_capacity():
    ledger = CapacityLedger()
    ledger.register("a", {"expert-1": 0.05, "expert-2": 0.1})
    assert ledger.bounds_for("a") == {"expert-1": [0.0, 0.05], "expert-2": [0.0, 0.1]}


def test_record_reports_price_in_effect_and_updates():
    ledger = CapacityLedger(LedgerConfig(price_step=0.2))
    ledger.register("a", {"expert-1": 0.05})
    entries = ledger.record(1, "a", {"expert-1": {"capacity": 0.05, "demand": 0.25, "load": 0.05}})
    assert entries["expert-1"] == pytest.approx(
        {"capacity": 0.05, "demand": 0.25, "load": 0.05, "utilization": 1.0, "pressure": 5.0, "price": 0.0}
    )
    assert ledger.prices_for("a") == {"expert-1": pytest.approx(0.04)}  # 0.2 * (0.25 - 0.05)
    assert ledger.max_pressure(1, "a") == pytest.approx(5.0)

    entries = ledger.record(2, "a", {"expert-1": {"capacity": 0.05, "demand": 0.05, "load": 0.05}})
    assert entries["expert-1"]["price"] == pytest.approx(0.04)
    assert ledger.prices_for("a") == {"expert-1": pytest.approx(0.04)}


def test_capacity_change_updates_bounds():
    ledger = CapacityLedger()
    ledger.register("a", {"expert-1": 0.05})
    ledger.record(1, "a", {"expert-1": {"capacity": 0.02, "demand": 0.0, "load": 0.0}})
    assert ledger.bounds_for("a") == {"expert-1": [0.0, 0.02]}


def test_ledger_json_round_trip():
    ledger = CapacityLedger(LedgerConfig(price_step=0.3, workload_beta=2.0))
    ledger.record(1, "a", {"expert-1": {"capacity": 0.05, "demand": 0.15, "load": 0.05}})
    restored = CapacityLedger.from_json(ledger.to_json())
    assert restored.prices == ledger.prices
    assert restored.rounds == ledger.rounds
    assert restored.config.price_step == 0.3


def test_negative_step_rejected():
    with pytest.raises(ValueError, match="price-step"):
        LedgerConfig(price_step=-1.0)


def test_truncate_history_drops_later_rounds(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text('{"round": 1}\n{"round": 2}\n{"round": 3}\n')
    truncate_history(path, 2)
    assert path.read_text() == '{"round": 1}\n{"round": 2}\n'

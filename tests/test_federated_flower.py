"""The flower engine gives what the local engine gives (Flower's simulation runtime on Ray; skipped
when flwr is not installed: pip install 'energyprof[federated]')."""

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

from cwmp.apps.federated.data import load_dataset  # noqa: E402
from cwmp.apps.federated.engine_local import run_local  # noqa: E402
from cwmp.apps.federated.experiment import FLConfig  # noqa: E402

# Both engines run the same functions in the same order with torch on one thread, so the numbers
# agree to float rounding; the stated tolerance leaves room for a different BLAS path in Ray's
# worker processes: accuracy within 2 test images of 360, energy within 1e-9 relative.
ACCURACY_TOLERANCE = 2 / 360


@pytest.mark.slow
def test_flower_engine_matches_the_local_engine():
    from cwmp.apps.federated.flower_app import run_flower

    config = FLConfig(model="mlp", clients=2, rounds=2, seeds=(0,), ratios=(0.05,), powers=(1.0,), lr=0.1, sweep=(0.3,))
    local = run_local(config, load_dataset("digits"))
    flower = run_flower(config, num_cpus=2)
    key = lambda r: (r.method, r.p, r.fixed, r.seed, r.round)  # noqa: E731
    assert sorted(map(key, local)) == sorted(map(key, flower))
    by_key = {key(r): r for r in local}
    for r in flower:
        ref = by_key[key(r)]
        assert r.accuracy == pytest.approx(ref.accuracy, abs=ACCURACY_TOLERANCE), key(r)
        assert r.cumulative_energy_j == pytest.approx(ref.cumulative_energy_j, rel=1e-9), key(r)
        assert r.bytes_sent == ref.bytes_sent
        assert r.floor_energy_j == pytest.approx(ref.floor_energy_j, rel=1e-9)
        assert r.opened_by_layer == ref.opened_by_layer
        assert r.simulated is True

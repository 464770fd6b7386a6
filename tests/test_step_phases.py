"""benchmarks.step_phases: the phase split of a training step (tooling for the speed work)."""

from __future__ import annotations

from benchmarks import step_phases


def test_phases_cover_the_step_and_the_draw_lands_in_its_own_phase():
    out = step_phases.measure("mlp", batch=8, rounds=2, block=3, warmup=2)
    assert set(out["plain_us"]) == set(out["noisy_us"]) == set(step_phases.PHASES)
    assert all(v > 0 for v in list(out["plain_us"].values()) + list(out["noisy_us"].values()))
    # the noise bank draws in the model's pre-hook, before the phase mark: the noisy draw phase holds it
    assert out["noisy_us"]["draw"] > out["plain_us"]["draw"]
    assert out["draw_alone_us"] is None or out["draw_alone_us"] > 0
    text = step_phases.table(out)
    assert text.count("\n") == len(step_phases.PHASES) + 2 + (out["draw_alone_us"] is not None)

"""`fastopt bench`'s bookkeeping, without compiling anything: what the compile bench counts as its floor."""
from pathlib import Path
import pytest
import fastopt.bench as fbench

def test_compile_floor_is_the_median_of_its_runs_and_the_first_compile_is_not_counted(monkeypatch):
    "The one-op graph is timed before each set and after the last; the first compile of the run (its files still on disk) is not counted"
    seconds = {'unused': [99.], 'floor-0': [10., 3.], 'floor-1': [14., 5.], 'floor-2': [12., 4.]}   # cold, then warm, per cache
    calls = []
    def fake(name, set_name, cache_dir, threads=None):
        cache = Path(cache_dir).name
        calls.append((name, cache))
        return seconds.setdefault(cache, [13., 6.]).pop(0)   # each optimizer: 13 s cold, 6 s warm
    monkeypatch.setattr(fbench, 'compile_seconds', fake)
    df = fbench.compile_bench(['Adam', 'Lamb'], ['resnet18', 'many'])
    assert [c for _,c in calls] == ['unused', 'floor-0', 'floor-0', 'resnet18-Adam', 'resnet18-Adam', 'resnet18-Lamb', 'resnet18-Lamb',
                                     'floor-1', 'floor-1', 'many-Adam', 'many-Adam', 'many-Lamb', 'many-Lamb', 'floor-2', 'floor-2']
    assert df.floor_cold_s.tolist() == [12.] * 4 and df.floor_warm_s.tolist() == [4.] * 4   # medians: 99 s is in neither
    assert (df.floor_cold_min_s == 10.).all() and (df.floor_cold_max_s == 14.).all()
    assert df.cold_vs_floor.tolist() == pytest.approx([13 / 12] * 4) and df.warm_vs_floor.tolist() == pytest.approx([6 / 4] * 4)
    assert df.tensors.tolist() == [62, 62, 1000, 1000]

"The low-precision benchmarks of fastopt.bench: state bytes, peak memory, step bytes, and quality runs in bfloat16 weights and 8-bit state"
import math
import pytest, torch
import fastopt
from fastopt.bench import (check_modes, mode_params, state_bytes_table, peak_memory_table, step_bytes, precision_bench,
                           precision_workload, precision_quality, precision_summary, plot_precision_quality)
from fastopt.precision import is_quantized
from fastopt.workloads import text_workload

def test_check_modes_names_the_bad_mode():
    with pytest.raises(ValueError, match="'bf8'"): check_modes(['fp32', 'bf8'])
    with pytest.raises(ValueError, match='No precision mode'): check_modes([])
    assert check_modes(None, ['fp32']) == ['fp32']

def test_mode_params_dtype():
    ps = mode_params([(3, 4)], 'bf16 + SR')
    assert ps[0].dtype == ps[0].grad.dtype == torch.bfloat16

def test_state_bytes_refuses_unknown_optimizer():
    with pytest.raises(ValueError, match="'Adamm'"): state_bytes_table(['Adamm'], ['fp32'], shapes=[(4,)])

def test_step_bytes_torch_adamw():
    ps = mode_params([(16, 8)], 'bf16 + Kahan')
    opt = torch.optim.AdamW(ps, lr=1e-3)
    opt.step()
    # p read and written, g read, exp_avg and exp_avg_sq read and written (bf16), the float32 step count read and written
    assert step_bytes(opt) == 128 * 2 * 3 + 2 * 2 * 128 * 2 + 2 * 4

def test_precision_bench_refuses_unknown_optimizer():
    with pytest.raises(ValueError, match="'Lionn'"): precision_bench(['Lionn'], sets=[], shapes=dict(s=[(4,)]), fused=False)

def test_peak_memory_table():
    t = peak_memory_table(['fp32'], d_model=32, n_layers=1, bs=2, context=8, vocab=20)
    assert list(t.gradient_release) == [False, True]
    assert (t.peak_MB >= t.weights_MB + t.state_MB).all()   # the weights and Adam's state are alive throughout
    assert (t.state_MB > 1.9 * t.weights_MB).all()

@pytest.fixture(scope='module')
def tiny_text(): return text_workload(train_chars=3000, valid_chars=1000, context=16, d_model=64, n_layers=1, bs=16, epochs=1)

def test_precision_workload_trains_bf16_with_8bit_state(tiny_text):
    learn = precision_workload(tiny_text, 'bf16 + Kahan + 8-bit').learner(lambda ps, **kw: fastopt.Adam(ps, fused=False, **kw))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    ps = list(learn.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in ps)
    big = [p for p in ps if p.numel() >= 4096]
    assert big and all(is_quantized(learn.opt.state[p]['grad_avg']) and 'weight_comp' in learn.opt.state[p] for p in big)
    assert math.isfinite(learn.recorder.values[-1][-1])

def test_precision_quality_summary_plot(tiny_text):
    runs = precision_quality([tiny_text], ['Adam'], ['fp32', 'bf16 plain'], seeds=2)
    assert len(runs) == 4 and (runs.status == 'ok').all()
    s = precision_summary(runs)
    assert list(s['mode']) == ['fp32', 'bf16 plain'] and (s.n == 2).all()
    assert s.in_fp32_ci.iloc[0]   # fp32's mean lies inside its own interval
    assert (s.ci95 > 0).all()
    assert s['diff'].iloc[0] == 0 and s['diff'].iloc[1] == pytest.approx(s['mean'].iloc[1] - s['mean'].iloc[0])   # paired by seed
    fig = plot_precision_quality(s)
    assert len(fig.axes) == 1

def test_cli_bench_memory_writes_both_tables(tmp_path, monkeypatch):
    import pandas as pd
    import fastopt.bench
    from fastopt.cli import main
    tables = {'state-bytes': pd.DataFrame(dict(optimizer=['Adam'], fp32=[8.])), 'peak-memory': pd.DataFrame(dict(mode=['fp32'], peak_MB=[1.]))}
    monkeypatch.setattr(fastopt.bench, 'memory_bench', lambda names=None, log=False: tables)   # the real one takes minutes
    main(['bench', '--what', 'memory', '--out', str(tmp_path)])
    assert pd.read_csv(tmp_path/'state-bytes.csv').fp32[0] == 8.
    assert pd.read_csv(tmp_path/'peak-memory.csv').peak_MB[0] == 1.

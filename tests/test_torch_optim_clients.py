"""fastopt.optim in the trainers it is for: Lightning's `Trainer.fit`, Hugging Face's `Trainer` and accelerate's `prepare`,
each with a torch scheduler, each checkpoint saved and resumed: the resumed run ends bit-identical to the uninterrupted one.
The clients are test-only extras (the dev extra installs them; they import only without torchvision, which `./dev setup`
removes); tiny models built here, nothing downloaded."""
import copy, os
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import lr_scheduler as S
from torch.utils.data import DataLoader, Dataset, TensorDataset
import fastopt.optim as fo

def data(n=64):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 4, generator=g)
    return X, X @ torch.randn(4, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

def weights(model): return [p.detach().clone() for p in model.parameters()]

def assert_equal(a, b):
    assert len(a) == len(b)
    for x,y in zip(a, b): assert torch.equal(x, y), (x - y).abs().max()

# ---------------------------------------------------------------- Lightning

def test_lightning_fit_and_resume(tmp_path):
    "Lightning's Trainer.fit with a fastopt AdamW and OneCycleLR stepped per batch (cycling β1); fit 1 epoch, save, resume to 2 == fit 2"
    L = pytest.importorskip('lightning')
    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()
        def training_step(self, batch, i):
            x, y = batch
            return F.mse_loss(self.net(x), y)
        def configure_optimizers(self):
            opt = fo.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
            return {'optimizer': opt, 'lr_scheduler': {'scheduler': S.OneCycleLR(opt, max_lr=1e-2, total_steps=8), 'interval': 'step'}}
    dl = lambda: DataLoader(TensorDataset(*data()), batch_size=16, shuffle=False)
    def trainer(epochs): return L.Trainer(max_epochs=epochs, accelerator='cpu', devices=1, logger=False, enable_checkpointing=False,
                                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    straight = Module(); t = trainer(2); t.fit(straight, dl())
    assert isinstance(t.optimizers[0], fo.AdamW) and t.global_step == 8
    first = Module(); t1 = trainer(1); t1.fit(first, dl())
    t1.save_checkpoint(tmp_path / 'half.ckpt')
    resumed = Module(); t2 = trainer(2); t2.fit(resumed, dl(), ckpt_path=tmp_path / 'half.ckpt')
    assert_equal(weights(resumed), weights(straight))
    assert t2.optimizers[0].param_groups[0]['betas'] == t.optimizers[0].param_groups[0]['betas'] != (0.9, 0.999)   # cycled
    assert not torch.equal(weights(straight)[0], weights(net())[0])

# ---------------------------------------------------------------- Hugging Face

class Rows(Dataset):
    def __init__(self): self.X, self.y = data()
    def __len__(self): return len(self.X)
    def __getitem__(self, i): return {'x': self.X[i], 'labels': self.y[i]}

class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = net()
    def forward(self, x, labels=None):
        out = self.net(x)
        return {'loss': F.mse_loss(out, labels), 'logits': out}

def test_hugging_face_trainer_and_resume(tmp_path):
    "Hugging Face's Trainer(optimizers=(fastopt Lamb, LambdaLR)) for 8 steps with a checkpoint at 4; resuming from it ends where the uninterrupted run does"
    transformers = pytest.importorskip('transformers')
    def train(out, resume=None):
        model = Regressor()
        opt = fo.Lamb(model.parameters(), lr=1e-2, weight_decay=0.1)
        sched = S.LambdaLR(opt, lambda t: 1 / (1 + t))
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=8, per_device_train_batch_size=16, save_strategy='steps',
                                              save_steps=4, logging_strategy='no', report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), optimizers=(opt, sched))
        trainer.train(resume_from_checkpoint=resume)
        assert trainer.optimizer.optimizer is opt or trainer.optimizer is opt   # accelerate may wrap it
        return model, opt
    straight, opt = train(tmp_path / 'a')
    assert os.path.isdir(tmp_path / 'a' / 'checkpoint-4') and opt.param_groups[0]['lr'] == pytest.approx(1e-2 / 9)
    resumed, _ = train(tmp_path / 'b', resume=str(tmp_path / 'a' / 'checkpoint-4'))
    assert_equal(weights(resumed), weights(straight))

def test_hugging_face_switches_schedule_free_modes(tmp_path):
    "The Trainer calls train() before training steps on optimizers that have it; the Schedule-Free class's parameters hold y while training"
    transformers = pytest.importorskip('transformers')
    model = Regressor()
    opt = fo.ScheduleFreeAdamW(model.parameters(), lr=1e-2)
    opt.eval()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=16, save_strategy='no',
                                          logging_strategy='no', report_to=[], use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Rows(), optimizers=(opt, S.LambdaLR(opt, lambda t: 1.))).train()
    assert opt.train_mode and int(opt.state[next(model.parameters())]['step']) == 3

# ---------------------------------------------------------------- accelerate

def test_accelerate_prepare_save_and_load_state(tmp_path):
    "accelerate's prepare (model, fastopt RAdam, data loader, StepLR), 4 steps, save_state; a fresh prepare + load_state continues as the original"
    accelerate = pytest.importorskip('accelerate')
    X, y = data()
    def make():
        acc = accelerate.Accelerator(cpu=True)
        model = net()
        opt = fo.RAdam(model.parameters(), lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)
        model, opt, dl, sched = acc.prepare(model, opt, DataLoader(TensorDataset(X, y), batch_size=16), S.StepLR(opt, step_size=2, gamma=0.5))
        return acc, model, opt, dl, sched
    def steps(acc, model, opt, sched, batches):
        for xb, yb in batches:
            acc.backward(F.mse_loss(model(xb), yb))
            opt.step(); sched.step(); opt.zero_grad()
    acc, model, opt, dl, sched = make()
    assert isinstance(opt.optimizer, fo.RAdam)
    steps(acc, model, opt, sched, list(dl))
    acc.save_state(str(tmp_path / 'state'))
    later = [(X[i:i + 16] * 0.5, y[i:i + 16]) for i in range(0, 64, 16)]
    steps(acc, model, opt, sched, later)
    acc2, model2, opt2, _, sched2 = make()
    acc2.load_state(str(tmp_path / 'state'))
    steps(acc2, model2, opt2, sched2, later)
    assert_equal(weights(model2), weights(model))
    assert opt2.param_groups[0]['lr'] == opt.param_groups[0]['lr'] == 1e-2 / 16

"""LightningModule: normalise -> tokenize -> (window) -> augment -> autoencode, SANE loss, and the
decoded network's function (optional): the reconstructed weights, run by the population engine on a fixed
batch of probe images, should give the original member's outputs."""
from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer

from zoo import BatchedNet, Layout, ModelSpec
from zoo.engine import runs

from .augment import add_noise, erase_tokens
from .config import FitConfig
from .model import AEShape, HyperAE, layer_weights, masked_mse, sane_loss
from .tokens import Tokenizer


def one_cycle(step: float, total: int, warmup: float = 0.3, div: float = 25.0, final_div: float = 1e4) -> float:
    """The learning-rate factor at `step` (fractional) of `total` steps: torch's OneCycleLR with its defaults,
    cosine from 1 / div up to 1 over the first `warmup` of the steps, then cosine down to 1 / (div * final_div)."""
    start, end = 1.0 / div, 1.0 / (div * final_div)
    peak = warmup * total - 1
    if step <= peak:
        lo, hi, pct = start, 1.0, step / peak
    else:
        lo, hi, pct = 1.0, end, (step - peak) / max(total - 1 - peak, 1e-9)
    pct = min(max(pct, 0.0), 1.0)
    return hi + (lo - hi) / 2 * (math.cos(math.pi * pct) + 1)


class HyperRepModule(L.LightningModule):
    def __init__(self, cfg: FitConfig, layout: Layout, mean: torch.Tensor, std: torch.Tensor,
                 spec: ModelSpec | None = None):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        self.tokenizer = Tokenizer.from_layout(layout, cfg.token_size)
        pos = self.tokenizer.positions
        sizes = tuple(int(pos[:, i].max()) + 1 for i in range(3))
        self.model = HyperAE(AEShape(cfg.token_size, sizes, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_latent,
                                     cfg.d_proj, cfg.dropout))
        # stored with the model: per-layer standardisation from the training split, undone on decode
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("index", self.tokenizer.index)
        self.register_buffer("positions", pos)
        self.activations: list[str] = []  # activation names of the codes the data module passes (functional loss)
        self.net: BatchedNet | None = None

    def set_probe(self, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, activations: list[str]) -> None:
        """Turn on the functional loss: `images` (n, C, H, W) uint8 probe inputs, `mean`, `std` (C,) the zoo's
        input normalisation, `activations` the names behind the activation codes of the batches."""
        self.register_buffer("probe", images, persistent=False)
        self.register_buffer("probe_mean", mean.view(-1, 1, 1).float(), persistent=False)
        self.register_buffer("probe_std", std.view(-1, 1, 1).float(), persistent=False)
        self.activations = list(activations)

    # ---- flat weights <-> normalised tokens ----
    def to_tokens(self, flat: torch.Tensor) -> torch.Tensor:
        """(B, P) raw weights -> (B, T, S) normalised tokens."""
        return self.tokenizer.tokenize((flat - self.mean) / self.std)

    def to_weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, S) normalised tokens -> (B, P) raw weights."""
        return self.tokenizer.detokenize(tokens.float()) * self.std + self.mean

    def _window(self, n_tokens: int, train: bool) -> slice:
        w = self.cfg.window
        if not w or w >= n_tokens:
            return slice(0, n_tokens)
        start = int(torch.randint(0, n_tokens - w + 1, ())) if train else 0
        return slice(start, start + w)

    def _losses(self, batch, train: bool):
        a, b = batch[0], batch[1]  # (B, P) two views
        tokens = self.to_tokens(torch.cat([a, b]))  # (2B, T, S)
        sl = self._window(tokens.shape[1], train)
        target, mask = tokens[:, sl], self.tokenizer.mask[sl].to(tokens.device).expand(len(tokens), -1, -1)
        pos = self.positions[sl].expand(len(tokens), -1, -1)
        inp = target
        if train:
            inp = erase_tokens(add_noise(target, mask, self.cfg.noise_mult, self.cfg.noise_add), self.cfg.erase)
        recon, _, proj = self.model(inp, pos)
        weights = layer_weights(mask, pos[0, :, 1]) if self.cfg.loss_norm == "layer" else mask
        loss, mse, con = sane_loss(recon.float(), target, weights, proj[:len(a)].float(), proj[len(a):].float(),
                                   self.cfg.gamma, self.cfg.tau)
        if self.cfg.loss_norm == "layer":  # the logged MSE stays the plain one, comparable across runs
            mse = masked_mse(recon.float(), target, mask).detach()
        fun = torch.zeros((), device=loss.device)
        if self.cfg.beta > 0 and hasattr(self, "probe"):
            full = tokens.clone()
            full[:, sl] = recon.float()  # the window reconstructed, the rest of the member as it is
            codes = torch.cat([batch[2], batch[2]])
            fun = self.functional_loss(self.to_weights(full), self.to_weights(tokens), codes)
            loss = loss + self.cfg.beta * fun
        return loss, mse, con, fun

    def functional_loss(self, w_hat: torch.Tensor, w: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """KL(original || reconstructed) of the members' class distributions on the probe images, averaged
        over members and images. w_hat, w (B, P); codes (B,) activation codes."""
        order = torch.argsort(codes, stable=True)
        names = [self.activations[int(c)] for c in codes[order]]
        if self.net is None or self.net.device != w.device:  # fused kernels on CUDA, grouped conv on CPU
            self.net = BatchedNet(self.spec, names, w.device)
        self.net.act_runs = runs(names)
        x = ((self.probe.float() / 255.0 - self.probe_mean) / self.probe_std)[:, None]  # (n, 1, C, H, W): shared
        with torch.autocast(w.device.type, enabled=False):
            with torch.no_grad():
                target = F.log_softmax(self.net.forward(x, w[order]), -1)  # (n, B, K)
            pred = F.log_softmax(self.net.forward(x, w_hat[order].float()), -1)
        return F.kl_div(pred, target, log_target=True, reduction="none").sum(-1).mean()

    def training_step(self, batch, _):
        loss, mse, con, fun = self._losses(batch, True)
        self.log_dict({"train_loss": loss, "train_mse": mse, "train_ntxent": con, "train_kl": fun}, prog_bar=True,
                      on_epoch=True, on_step=False, batch_size=len(batch[0]), sync_dist=True)
        self.log_dict({"lr": self.trainer.optimizers[0].param_groups[0]["lr"], "train_loss_step": loss},
                      on_step=True, on_epoch=False, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch, _):
        loss, mse, con, fun = self._losses(batch, False)
        self.log_dict({"val_loss": loss, "val_mse": mse, "val_ntxent": con, "val_kl": fun}, prog_bar=True,
                      batch_size=len(batch[0]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def on_train_start(self):
        self.total_steps = int(self.trainer.estimated_stepping_batches)  # the step budget, epochs or max_steps
        self.timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)  # set by max_time

    def on_train_batch_start(self, batch, _):
        """One-cycle learning rate over the fit's budget: its steps, or its time limit (`max_minutes`) where that
        ends the fit first, so a time-bounded fit anneals too instead of stopping near its peak lr."""
        step, total = float(self.trainer.global_step), self.total_steps
        if self.timer is not None:
            elapsed = self.timer.time_elapsed()  # seconds, resumed fits' earlier ones included
            used = elapsed / max(elapsed + self.timer.time_remaining(), 1e-9)  # a float: no device sync a step
            if self.trainer.world_size > 1:  # every rank must use the same lr: the slowest clock's
                used = float(self.trainer.strategy.reduce(torch.tensor(used, device=self.device), reduce_op="max"))
            step = max(step, used * (total - 1))
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = self.cfg.lr * one_cycle(step, total)

    # ---- inference: whole models, covered by windows ----
    def windows(self, n_tokens: int) -> list[slice]:
        """Windows covering n_tokens: the whole model, or windows of `window` tokens at half-window strides
        (the last one ending at the end), so every token but the ends sits inside some window's middle."""
        w = self.cfg.window
        if not w or w >= n_tokens:
            return [slice(0, n_tokens)]
        starts = sorted(set(range(0, n_tokens - w + 1, max(1, w // 2))) | {n_tokens - w})
        return [slice(s, s + w) for s in starts]

    @torch.no_grad()
    def encode_latents(self, flat: torch.Tensor) -> torch.Tensor:
        """(B, P) raw weights -> per-token latents (B, T, d_latent); overlapping windows averaged."""
        tokens = self.to_tokens(flat)
        B, T = tokens.shape[:2]
        out = torch.zeros(B, T, self.cfg.d_latent, device=tokens.device)
        count = torch.zeros(T, 1, device=tokens.device)
        for sl in self.windows(T):
            out[:, sl] += self.model.encode(tokens[:, sl], self.positions[sl].expand(B, -1, -1)).float()
            count[sl] += 1
        return out / count

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Per-token latents (B, T, d_latent) -> raw weights (B, P); overlapping windows averaged."""
        B, T = z.shape[:2]
        tokens = torch.zeros(B, T, self.cfg.token_size, device=z.device)
        count = torch.zeros(T, 1, device=z.device)
        for sl in self.windows(T):
            tokens[:, sl] += self.model.decode(z[:, sl], self.positions[sl].expand(B, -1, -1)).float()
            count[sl] += 1
        return self.to_weights(tokens / count)

    @torch.no_grad()
    def reconstruct(self, flat: torch.Tensor) -> torch.Tensor:
        """(B, P) raw weights -> decoded (B, P): each window encoded and decoded as in training (the decoder
        sees the latents of its own window), overlapping windows averaged."""
        tokens = self.to_tokens(flat)
        B, T = tokens.shape[:2]
        out = torch.zeros_like(tokens)
        count = torch.zeros(T, 1, device=tokens.device)
        for sl in self.windows(T):
            pos = self.positions[sl].expand(B, -1, -1)
            out[:, sl] += self.model.decode(self.model.encode(tokens[:, sl], pos), pos).float()
            count[sl] += 1
        return self.to_weights(out / count)

    @torch.no_grad()
    def embed(self, flat: torch.Tensor) -> torch.Tensor:
        """(B, P) raw weights -> (B, d_latent): the mean token latent over the whole model."""
        return self.encode_latents(flat).mean(1)

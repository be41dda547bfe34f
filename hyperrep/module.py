"""LightningModule: normalise -> tokenize -> (window) -> augment -> autoencode, SANE loss."""
from __future__ import annotations

import lightning as L
import torch

from zoo import Layout

from .augment import add_noise, erase_tokens
from .config import FitConfig
from .model import AEShape, HyperAE, sane_loss
from .tokens import Tokenizer


class HyperRepModule(L.LightningModule):
    def __init__(self, cfg: FitConfig, layout: Layout, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.cfg = cfg
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
        a, b = batch  # (B, P) two views
        tokens = self.to_tokens(torch.cat([a, b]))  # (2B, T, S)
        sl = self._window(tokens.shape[1], train)
        tokens, mask = tokens[:, sl], self.tokenizer.mask[sl].to(tokens.device).expand(len(tokens), -1, -1)
        pos = self.positions[sl].expand(len(tokens), -1, -1)
        inp = tokens
        if train:
            inp = erase_tokens(add_noise(tokens, mask, self.cfg.noise_mult, self.cfg.noise_add), self.cfg.erase)
        recon, _, proj = self.model(inp, pos)
        return sane_loss(recon.float(), tokens, mask, proj[:len(a)].float(), proj[len(a):].float(), self.cfg.gamma,
                         self.cfg.tau)

    def training_step(self, batch, _):
        loss, mse, con = self._losses(batch, True)
        self.log_dict({"train_loss": loss, "train_mse": mse, "train_ntxent": con}, prog_bar=True, on_epoch=True,
                      on_step=False, batch_size=len(batch[0]), sync_dist=True)
        return loss

    def validation_step(self, batch, _):
        loss, mse, con = self._losses(batch, False)
        self.log_dict({"val_loss": loss, "val_mse": mse, "val_ntxent": con}, prog_bar=True, batch_size=len(batch[0]),
                      sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.cfg.lr,
                                                    total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def embed(self, flat: torch.Tensor) -> torch.Tensor:
        """(B, P) raw weights -> (B, d_latent): mean token latent, windows covering the whole model."""
        tokens = self.to_tokens(flat)
        T, w = tokens.shape[1], self.cfg.window
        if not w or w >= T:
            return self.model.embed_model(tokens, self.positions.expand(len(tokens), -1, -1))
        latent_sum = torch.zeros(len(tokens), T, self.cfg.d_latent, device=tokens.device)
        count = torch.zeros(T, 1, device=tokens.device)
        for start in sorted(set(range(0, T - w + 1, w)) | {T - w}):
            sl = slice(start, start + w)
            latent_sum[:, sl] += self.model.encode(tokens[:, sl], self.positions[sl].expand(len(tokens), -1, -1)).float()
            count[sl] += 1
        return (latent_sum / count).mean(1)

"""The training loop: the chosen loss over in-batch image-caption pairs, then eval and shard export.

Each epoch visits every training image once, with `captions_per_image` of its captions drawn at
random; the plan of an epoch (image order and caption choice) is a pure function of (seed, epoch),
so a run interrupted mid-epoch resumes from `last.pt` by skipping the batches it already did.
Which in-batch pairs count as positives is `positives` (see `batch_positives`).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from core.atomic import sha256_file, write_json
from core.errors import PcmeError

from encoders.model.checkpoint import read_checkpoint, resolve_device, save_checkpoint
from encoders.model.class_words import class_name_words, imagenet_class_words
from encoders.model.config import model_config_from_dict
from encoders.training.config import TrainConfig
from encoders.training.data import load_split
from encoders.training.data.base import Split
from encoders.model.encode import image_to_tensor, image_to_uint8, pad_tokens
from encoders.training.evaluate import DEFAULT_SCORES, encode_split, evaluate_split
from encoders.training.export import export_shards
from encoders.training.pipeline import producer_of
from encoders.training.losses_baselines import LOSSES, PROBABILISTIC, pair_mask
from encoders.training.precision import autocast, autocast_dtype
from encoders.model.networks import PCME
from core.progress import track
from encoders.training.schedule import backbone_frozen, make_optimizer
from encoders.model.text import Vocab, build_vocab, glove_matrix, glove_vectors

logger = logging.getLogger(__name__)


def epoch_plan(split: Split, seed: int, epoch: int, caps_of: list[np.ndarray], per_image: int):
    """(image order, caption indices [n_images, per_image]) for one epoch, deterministic in
    (seed, epoch). Each image gets `per_image` of its captions, drawn without replacement while
    it has enough (with replacement otherwise)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(split.n_images)
    picks = np.array([rng.choice(caps_of[i], per_image, replace=len(caps_of[i]) < per_image)
                      for i in order])
    return order, picks


PRELOAD_BYTES = 2 * 2**30  # splits smaller than this are decoded once and kept as uint8


class ImageSource:
    """Training images as float [B, 3, S, S] batches: decoded once into memory when the split is
    small (the scenes: 10k x 12 KB), else decoded from disk for every batch."""

    def __init__(self, split: Split, size: int):
        self.split, self.size, self.cache = split, size, None
        if split.n_images * 3 * size * size <= PRELOAD_BYTES:
            self.cache = torch.empty(split.n_images, 3, size, size, dtype=torch.uint8)
            with track(f"decode {split.name} images", split.n_images) as bar:
                for i in range(split.n_images):
                    self.cache[i] = image_to_uint8(split.load_image(i), size)
                    bar.advance(1)

    def batch(self, indices) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[torch.as_tensor(indices, dtype=torch.long)].float().div_(255.0)
        return torch.stack([image_to_tensor(self.split.load_image(int(i)), self.size) for i in indices])


def batch_positives(split: Split, images, captions, positives: str = "pairs") -> torch.Tensor:
    """bool [B_img, B_txt]: which in-batch pairs are positives. `captions` is [B_img, per_image]
    (row i written for image i), flattened in row order as the text batch. "pairs": each image
    matches the captions written for it; "plausible": also every other caption in the batch that
    is true of it (a station caption and all station images), as the dataset knows them."""
    captions = np.asarray(captions)
    per = captions.shape[1]
    matched = pair_mask(len(images), per).numpy()
    if positives == "plausible":
        block = split.match_block(captions.ravel(), np.asarray(images))
        if block is None:
            raise PcmeError(f"positives 'plausible': the {split.dataset} dataset does not know "
                            f"which captions are true of which images; use 'pairs'")
        matched |= block.T
    return torch.from_numpy(matched)


def resolve_positives(positives: str, split: Split, caps_of) -> str:
    """"auto": plausible where the dataset knows which captions are true of which images (the
    scenes, CUB's classes), else pairs (COCO, Flickr30k, a folder). "plausible" on a dataset
    that does not know fails now, not after every image is decoded."""
    knows = split.match_block(caps_of[0][:1], np.arange(1)) is not None
    if positives == "auto":
        return "plausible" if knows else "pairs"
    if positives == "plausible" and not knows:
        raise PcmeError(f"positives 'plausible': the {split.dataset} dataset does not know "
                        f"which captions are true of which images; use 'pairs'")
    return positives


def make_batch(split: Split, caption_ids: list[list[int]], source: ImageSource, images, captions,
               flip_rng, positives: str = "pairs", word_dropout: float = 0.0):
    """(images [B, 3, S, S], tokens, lengths, positives [B_img, B_txt]) for one micro-batch.
    `caption_ids`: token ids of every caption of the split (`encode_captions`, once per run).
    `flip_rng` (seeded per micro-batch: resumable) draws the flips, then the word dropout."""
    x = source.batch(images)
    flip = torch.from_numpy(flip_rng.random(len(images)) < 0.5)  # no left/right words in captions
    x[flip] = x[flip].flip(-1)
    tokens, lengths = pad_tokens([drop_words(caption_ids[int(c)], word_dropout, flip_rng)
                                  for c in captions.ravel()])
    return x, tokens, lengths, batch_positives(split, images, captions, positives)


def encode_captions(split: Split, vocab: Vocab) -> list[list[int]]:
    """Token ids of every caption of the split, tokenised once per run rather than every step."""
    return [vocab.encode(c)[0] for c in split.captions]


def drop_words(ids: list[int], p: float, rng) -> list[int]:
    """Each word left out with probability p, at least one kept; p = 0 draws nothing (so runs
    without word dropout are the same as before it existed)."""
    if p <= 0.0 or len(ids) < 2:
        return ids
    keep = rng.random(len(ids)) >= p
    if not keep.any():
        keep[rng.integers(len(ids))] = True
    return [i for i, k in zip(ids, keep) if k]


def compute_loss(cfg: TrainConfig, i_mu, i_lv, t_mu, t_lv, matched, a, b) -> dict:
    """The training objective chosen by cfg.loss, on one batch (all share one harness)."""
    if cfg.loss not in LOSSES:
        raise PcmeError(f"loss {cfg.loss!r}: unknown; choose one of {', '.join(LOSSES)}")
    return LOSSES[cfg.loss](i_mu, i_lv, t_mu, t_lv, matched, a, b, cfg)


def build_model(cfg: TrainConfig, train_split: Split) -> PCME:
    """A fresh model for `cfg` (the caller's config is left as it is: the vocabulary and the
    word-vector width go into a copy of cfg.model)."""
    vocab = build_vocab(train_split.captions, cfg.min_word_count)
    # one pass over the GloVe source for the vocabulary and, with class words, the class names
    wanted = set(vocab) | (class_name_words(cfg.model.class_word_source)
                           if cfg.model.class_words else set())
    found = glove_vectors(wanted, cfg.glove)
    vectors, _ = glove_matrix(vocab, cfg.glove, seed=cfg.seed, found=found)
    mcfg = replace(cfg.model, vocab=vocab, word_dim=vectors.shape[1])
    torch.manual_seed(cfg.seed)
    model = PCME(mcfg)
    model.set_word_vectors(torch.from_numpy(vectors))
    if mcfg.class_words:
        table = imagenet_class_words(mcfg.class_word_source, dim=mcfg.word_dim, vectors=found)
        model.set_class_words(torch.from_numpy(table))
    return model


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.train_split = load_split(cfg.data, Path(cfg.root), "train", n_images=cfg.train_images)
        self.caps_of = [np.flatnonzero(self.train_split.caption_image == i)
                        for i in range(self.train_split.n_images)]
        if any(len(c) == 0 for c in self.caps_of):
            raise PcmeError(f"{cfg.data} train split: some images have no caption")
        self.positives = resolve_positives(cfg.positives, self.train_split, self.caps_of)
        if cfg.accum_steps < 1:
            raise PcmeError(f"accum_steps {cfg.accum_steps}: must be at least 1")
        # an epoch is a whole number of optimiser steps of accum_steps micro-batches each
        self.steps_per_epoch = self.train_split.n_images // (cfg.batch_size * cfg.accum_steps)
        if self.steps_per_epoch == 0:
            raise PcmeError(f"batch_size x accum_steps {cfg.batch_size * cfg.accum_steps} is larger "
                            f"than the training split ({self.train_split.n_images} images)")
        self.epoch = self.step_in_epoch = self.step = 0
        if resume and (self.out / "last.pt").is_file():
            self._resume(self.out / "last.pt")
        else:
            self.model = build_model(cfg, self.train_split).to(self.device)
            self._make_optimizer()
        # NHWC convolutions: ~15% faster image steps on a CPU (oneDNN), the usual choice for AMP
        self.model.image.to(memory_format=torch.channels_last)
        self.vocab = Vocab(self.model.cfg.vocab)
        self.caption_ids = encode_captions(self.train_split, self.vocab)
        self.images = ImageSource(self.train_split, self.model.cfg.image_size)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self._fp16())

    def _fp16(self) -> bool:
        return autocast_dtype(self.device, self.cfg.amp) == torch.float16

    def _make_optimizer(self):
        self.opt, self.sched = make_optimizer(self.model, self.cfg, self.steps_per_epoch)

    def _resume(self, path: Path):
        ckpt = read_checkpoint(path)
        self.model = PCME(model_config_from_dict(ckpt["model_config"]))
        self.model.load_state_dict(ckpt["model"])
        self.model.to(self.device)
        self._make_optimizer()
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.epoch, self.step_in_epoch, self.step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]
        torch.set_rng_state(ckpt["rng"])  # the loss's sampling noise continues where it stopped
        logger.info("resumed %s at epoch %d, batch %d", path, self.epoch, self.step_in_epoch)

    def save(self, name: str):
        save_checkpoint(self.out / name, self.model, train_config=asdict(self.cfg),
                        optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                        epoch=self.epoch, step_in_epoch=self.step_in_epoch, step=self.step,
                        rng=torch.get_rng_state())

    def forward_loss(self, x, tokens, lengths, matched) -> dict:
        cfg, model = self.cfg, self.model
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, cfg.amp):
            i_mu, i_lv = model.image(x)
        with autocast(self.device, cfg.amp, "text"):
            t_mu, t_lv = model.text(tokens.to(self.device), lengths)
        return compute_loss(cfg, i_mu.float(), i_lv.float(), t_mu.float(), t_lv.float(),
                            matched.to(self.device), model.a, model.b)

    def train_step(self, micro_batches) -> dict:
        """One optimiser step over `accum_steps` micro-batches (gradients summed, loss averaged)."""
        cfg, model = self.cfg, self.model
        model.train()
        if backbone_frozen(cfg, self.epoch):
            model.image.backbone.eval()  # frozen stage: BatchNorm statistics stay as loaded
        self.opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for batch in micro_batches:
            out = self.forward_loss(*batch)
            self.scaler.scale(out["loss"] / len(micro_batches)).backward()
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / len(micro_batches)
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return totals

    def run_epoch(self, log):
        cfg, split = self.cfg, self.train_split
        order, picks = epoch_plan(split, cfg.seed, self.epoch, self.caps_of, cfg.captions_per_image)
        bs, acc = cfg.batch_size, cfg.accum_steps
        with track(f"epoch {self.epoch + 1}/{cfg.epochs}", self.steps_per_epoch) as bar:
            bar.advance(self.step_in_epoch)
            for k in range(self.step_in_epoch, self.steps_per_epoch):
                micro = []
                for m in range(k * acc, (k + 1) * acc):
                    sl = slice(m * bs, (m + 1) * bs)
                    flip_rng = np.random.default_rng([cfg.seed, self.epoch, m])  # resumable
                    micro.append(make_batch(split, self.caption_ids, self.images, order[sl],
                                            picks[sl], flip_rng, self.positives, cfg.word_dropout))
                stats = self.train_step(micro)
                self.step += 1
                self.step_in_epoch = k + 1
                bar.advance(1, status=f"loss {stats['loss']:.3f}")
                if self.step % 10 == 0:
                    log({"epoch": self.epoch, "step": self.step, "lr": self.sched.get_last_lr()[-1],
                         "a": self.model.a.item(), "b": self.model.b.item(), **stats})
                if self.step % cfg.ckpt_every == 0:
                    self.save("last.pt")
        self.epoch += 1
        self.step_in_epoch = 0

    def fit(self, log=lambda row: None) -> None:
        """Run the remaining epochs; last.pt after each one (and every ckpt_every steps)."""
        self.out.mkdir(parents=True, exist_ok=True)
        while self.epoch < self.cfg.epochs:
            self.run_epoch(log)
            self.save("last.pt")


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train, save runs/.../checkpoint.pt, evaluate on cfg.eval_split, export its shards."""
    t0 = time.perf_counter()
    trainer = Trainer(cfg, resume)
    out = trainer.out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.jsonl", "a", encoding="utf-8") as logf:
        def log(row):
            logf.write(json.dumps(row) + "\n")
            logf.flush()
        trainer.fit(log)
        train_s = time.perf_counter() - t0
        trainer.save("checkpoint.pt")
        ckpt_path = out / "checkpoint.pt"
        result = {"train_s": round(train_s, 1), "checkpoint": str(ckpt_path)}
        split = load_split(cfg.data, Path(cfg.root), cfg.eval_split)
        emb = encode_split(trainer.model, trainer.vocab, split, trainer.device)
        # μ-only baselines leave log_var untrained: only the μ score means anything for them
        scores = tuple(cfg.eval_scores) or (DEFAULT_SCORES if cfg.loss in PROBABILISTIC else ("mu",))
        report = evaluate_split(trainer.model, trainer.vocab, split, trainer.device, scores,
                                embeddings=emb)
        report["checkpoint_sha256"] = sha256_file(ckpt_path)  # what an index build matches
        report["train_s"] = result["train_s"]
        write_json(out / "eval.json", report)
        log({"eval": report})
        result["eval"] = report
        if cfg.export:
            export_shards(cfg.shards, split, emb, producer_of(ckpt_path, trainer.model))
            result["shards"] = cfg.shards
    result["total_s"] = round(time.perf_counter() - t0, 1)
    return result

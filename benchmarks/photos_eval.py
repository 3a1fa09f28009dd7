"""Held-out retrieval on the real-photo dev set (benchmarks/tuxpaint_photos.py), per checkpoint:
R@1/5/10 both ways with the closed vocabulary (what `train`'s eval reports: unseen words are
<unk>) and with the open one (unseen words through GloVe, what `query` serves), and the
held-out-word test: each word that appears in test captions but never in training captions
(and that GloVe knows; all such words, and only the captions' subjects) is queried alone through
the real engine on the test split's index; a hit is a top-5 photo whose caption contains the word.
The same words are also queried in the captions' form, "a <word>" ("a gnu" for "A sitting gnu."):
every training caption starts with an article, and a lone word is a sequence the bi-GRU never saw.

    python benchmarks/photos_eval.py --root data/tuxpaint RUN_DIR[:INDEX_DIR] ... [--json]
    python benchmarks/photos_eval.py --root data/tuxpaint --zero-shot [--image-size 128]
        [--class-word-source wordnet|names] [--class-channel-space classes|words]

RUN_DIR holds checkpoint.pt; INDEX_DIR (optional) an index of that run's test-split shards
(`train` exports them, `cli.py index` builds it); without it the held-out-word test is skipped.
`--zero-shot` runs the same held-out-word test with no training at all: test photos ranked by
the untrained class channel between the word's GloVe vector and the photo's ImageNet classifier
output (EfficientNet-Lite0; encoders/model/class_terms.py: ClassChannel): in class space the
Bhattacharyya coefficient of their two class distributions, in word space the cosine with the
photo's class-word mixture (encoders/model/class_words.py); the floor class words start from.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.process import configure_process
from engine.search import SearchEngine
from encoders.model.checkpoint import load_model
from encoders.model.class_words import SOURCES
from encoders.model.config import ModelConfig
from encoders.model.class_terms import CHANNEL_SPACES
from encoders.model.open_vocab import GloveTable, OpenVocab
from encoders.model.query import QueryEncoder
from encoders.model.text import tokenize
from encoders.training.data import load_split
from encoders.model.encode import encode_images, encode_texts
from encoders.training.evaluate import ground_truth, query_captions, score_matrix
from encoders.training.metrics import recall_at_k

STOPWORDS = {"a", "an", "the", "it", "its", "in", "on", "of", "and", "or", "to", "with", "is",
             "are", "for", "at", "by", "from", "this", "that", "as", "be", "has", "have", "can"}
KS = (1, 5, 10)


def recalls(model, vocab, split, device, images=None, score: str = "elk") -> dict:
    """R@K both ways: text→image with the captions as queries, image→text as items (they differ
    with an open vocabulary: ClassChannel's open-word uncertainty acts on queries only).
    images: the split's (μ, log σ²) when already encoded."""
    img = images if images is not None else encode_images(model, split.load_image,
                                                          split.n_images, device)
    items = encode_texts(model, vocab, split.captions, device)
    queries = query_captions(model, vocab, split, device) or items
    a, b = model.a.item(), model.b.item()
    t2i, i2t = (score_matrix(score, t, img, a, b) for t in (queries, items))
    gt = ground_truth(split)
    return {"t2i": recall_at_k(t2i, gt, KS), "i2t": recall_at_k(i2t.T, gt.T, KS)}


def subject(caption: str) -> str:
    """The stamp's subject: the last word of its first sentence ("A sitting gnu." -> gnu)."""
    words = tokenize(caption.split(".")[0])
    return words[-1] if words else ""


def held_out_words(train, test, subjects_only: bool) -> list[str]:
    """Words of test captions (or only their subjects) never seen in training captions."""
    seen = {w for c in train.captions for w in tokenize(c)}
    pool = {subject(c) for c in test.captions} if subjects_only else \
        {w for c in test.captions for w in tokenize(c)}
    new = sorted(pool - seen - STOPWORDS - {""})
    return [w for w in new if len(w) > 2 and not w.isdigit() and w in GloveTable().vectors(new)]


QUERY_FORMS = {"": "{}", "_with_article": "a {}"}  # report key suffix -> query text


def word_queries(index: Path, test, words: list[str], device, k: int = 5,
                 form: str = "{}") -> dict:
    """{word: True when a top-k photo's caption contains it} through SearchEngine.query_text
    of form.format(word)."""
    caps_of: dict[str, set[str]] = {}
    for c, i in zip(test.captions, test.caption_image):
        caps_of.setdefault(str((test.root / test.image_paths[i]).resolve()), set()).update(tokenize(c))
    out = {}
    with SearchEngine(index, make_encoder=lambda m, d: QueryEncoder.for_index(m, d, device)) as eng:
        for w in words:
            hits = eng.query_text(form.format(w), k=k).results
            out[w] = any(w in caps_of.get(h.item, ()) for h in hits)
    return out


def classifier_logits(enc, split, size: int) -> torch.Tensor:
    """EfficientNet-Lite0's ImageNet logits [photos, 1000] for every photo of `split`."""
    from encoders.model.encode import image_to_tensor

    with torch.inference_mode():
        return torch.cat([enc.backbone._fc(enc.features(image_to_tensor(split.load_image(i),
                                                                        size)[None])
                                           .mean(dim=(2, 3))).float()
                          for i in range(split.n_images)])


def zero_shot_scores(cfg: ModelConfig, logits: torch.Tensor, words: dict[str, np.ndarray],
                     table: np.ndarray) -> np.ndarray:
    """[words, photos]: the untrained class channel's inner product (ClassChannel, in
    cfg.class_channel_space) of each word's GloVe vector with each photo's classifier output."""
    from encoders.model.class_terms import ClassChannel

    channel = ClassChannel(cfg, "text")
    g = torch.from_numpy(table)
    if channel.space == "classes":
        channel.class_words.copy_(g)
    with torch.no_grad():
        mix = torch.softmax(logits, dim=-1) @ g
        c_img = F.normalize(channel.image_vector(logits, mix), dim=-1)
        c_txt = F.normalize(channel.text_vector(torch.from_numpy(np.stack(list(words.values())))),
                            dim=-1)
    return (c_txt @ c_img.T).numpy()


def top5_word_hits(scores: np.ndarray, words: list[str], split) -> list[str]:
    """The words (rows of scores [words, photos]) with a photo among their 5 best whose caption
    contains the word."""
    caps: dict[int, set[str]] = {}
    for c, i in zip(split.captions, split.caption_image):
        caps.setdefault(i, set()).update(tokenize(c))
    return [w for w, row in zip(words, scores) if any(w in caps[i] for i in np.argsort(-row)[:5])]


def zero_shot(root: Path, cfg: ModelConfig) -> dict:
    """The held-out-word test without training: see the module doc."""
    from encoders.model.class_words import imagenet_class_words
    from encoders.model.networks import ImageEncoder

    test, train = load_split("folder", root, "test"), load_split("folder", root, "train")
    enc = ImageEncoder(replace(cfg, class_channel=0), class_map=torch.nn.Identity()).eval()
    logits = classifier_logits(enc, test, cfg.image_size)
    table = imagenet_class_words(cfg.class_word_source)
    report = {"zero_shot": True, "image_size": cfg.image_size,
              "class_word_source": cfg.class_word_source,
              "class_channel_space": cfg.class_channel_space}
    for name, only in (("held_out_words", False), ("held_out_subjects", True)):
        vectors = GloveTable().vectors(held_out_words(train, test, only))
        hit = top5_word_hits(zero_shot_scores(cfg, logits, vectors, table), list(vectors), test)
        report[name] = {"n": len(vectors), "top5_hit": len(hit), "hit": sorted(hit)}
    return report


def evaluate_run(root: Path, run: str, device: str) -> dict:
    run_dir, _, index = run.partition(":")
    dev = torch.device(device)
    model, vocab, _ = load_model(Path(run_dir) / "checkpoint.pt", dev)
    test, train = load_split("folder", root, "test"), load_split("folder", root, "train")
    report = {"run": run_dir, "backbone": model.cfg.backbone, "image_size": model.cfg.image_size,
              "closed": recalls(model, vocab, test, dev),
              "open": recalls(model, OpenVocab.for_model(model, vocab), test, dev)}
    for name, only in (("held_out_words", False), ("held_out_subjects", True)) if index else ():
        words = held_out_words(train, test, only)
        for suffix, form in QUERY_FORMS.items():
            hits = word_queries(Path(index), test, words, device, form=form)
            report[name + suffix] = {"n": len(hits), "top5_hit": sum(hits.values()),
                                     "hit": sorted(w for w, ok in hits.items() if ok),
                                     "miss": sorted(w for w, ok in hits.items() if not ok)}
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="RUN_DIR[:INDEX_DIR]")
    ap.add_argument("--zero-shot", action="store_true", help="the class-word floor, no training")
    ap.add_argument("--image-size", type=int, default=128, help="with --zero-shot")
    ap.add_argument("--class-word-source", choices=SOURCES, default=ModelConfig().class_word_source,
                    help="with --zero-shot: the class-word table (encoders/model/class_words.py)")
    ap.add_argument("--class-channel-space", choices=CHANNEL_SPACES,
                    default=ModelConfig().class_channel_space,
                    help="with --zero-shot: score as the class channel does in this space")
    ap.add_argument("--root", type=Path, required=True, help="dataset folder (tuxpaint_photos.py)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    configure_process()
    if args.zero_shot:
        report = zero_shot(args.root, ModelConfig(
            backbone="efficientnet-lite0", image_size=args.image_size, class_words=True,
            class_word_source=args.class_word_source, class_channel=0.5,
            class_channel_space=args.class_channel_space))
        print(json.dumps(report, indent=2) if args.json else
              "\n".join(f"{k.replace('_', ' ')} with a correct top-5 photo, no training: "
                        f"{report[k]['top5_hit']}/{report[k]['n']}"
                        for k in ("held_out_words", "held_out_subjects")))
        return 0
    if not args.runs:
        ap.error("give RUN_DIR[:INDEX_DIR] ... or --zero-shot")
    reports = [evaluate_run(args.root, r, args.device) for r in args.runs]
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    print(f"{'run':<34} {'vocab':<7} " + " ".join(f"t2i R@{k:<3}" for k in KS) + " "
          + " ".join(f"i2t R@{k:<3}" for k in KS))
    for r in reports:
        for kind in ("closed", "open"):
            row = r[kind]
            print(f"{r['run'][-34:]:<34} {kind:<7} " + " ".join(f"{row['t2i'][k]:9.3f}" for k in KS)
                  + " " + " ".join(f"{row['i2t'][k]:9.3f}" for k in KS))
        for name in (n + s for n in ("held_out_words", "held_out_subjects") for s in QUERY_FORMS):
            if name in r:
                h = r[name]
                print(f"  {name.replace('_', ' ')} with a correct top-5 photo: "
                      f"{h['top5_hit']}/{h['n']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The open-word uncertainty Λ (ModelConfig.open_word_log_var) swept on trained runs, without
retraining: training never has an open-vocabulary word, so Λ only acts when a text is encoded.
Per Λ, on the split given as "test" of --root (for a choice: the validation photos written by
`tuxpaint_photos.py --validation`, never the test photos): the held-out-word test of
photos_eval.py (subjects and all words unseen in that root's training captions, queried alone
and as "a <word>"; a hit is a top-5 photo whose caption has the word) and the open-vocabulary
R@1/5/10 both ways (photos_eval.recalls: Λ acts on text→image only, captions as queries), all
by exact ELK over the split's photos (what the engine's guaranteed ELK search returns).

    python benchmarks/open_word_sweep.py --root data/tuxpaint_val RUN_DIR ... [--lambdas 0,2,4,8]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.photos_eval import QUERY_FORMS, held_out_words, recalls, top5_word_hits
from core.process import configure_process
from encoders.model.checkpoint import load_model
from encoders.model.encode import encode_images, encode_texts
from encoders.model.open_vocab import OpenVocab
from encoders.training.data import load_split
from encoders.training.evaluate import score_matrix

LAMBDAS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)


def sweep_run(run: Path, root: Path, lambdas, device) -> list[dict]:
    model, vocab, _ = load_model(run / "checkpoint.pt", device)
    channel = model.text.channel
    if channel is None:
        raise SystemExit(f"{run}: no class channel, Λ does nothing")
    test, train = load_split("folder", root, "test"), load_split("folder", root, "train")
    open_vocab = OpenVocab.for_model(model, vocab)
    img = encode_images(model, test.load_image, test.n_images, device)
    words = {only: held_out_words(train, test, only) for only in (False, True)}
    rows = []
    for lam in lambdas:
        channel.open_word_log_var = lam
        row = {"run": str(run), "open_word_log_var": lam}
        row |= recalls(model, open_vocab, test, device, images=img)
        for only, name in ((False, "held_out_words"), (True, "held_out_subjects")):
            for suffix, form in QUERY_FORMS.items():
                texts = [form.format(w) for w in words[only]]
                s = score_matrix("elk", encode_texts(model, open_vocab, texts, device, query=True),
                                 img, model.a.item(), model.b.item())
                row[name + suffix] = len(top5_word_hits(s, words[only], test))
        row["n_words"], row["n_subjects"] = len(words[False]), len(words[True])
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="RUN_DIR holding checkpoint.pt")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--lambdas", default=",".join(str(x) for x in LAMBDAS))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    configure_process()
    lambdas = [float(x) for x in args.lambdas.split(",")]
    for run in args.runs:
        for row in sweep_run(run, args.root, lambdas, torch.device(args.device)):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

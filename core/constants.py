"""Numbers the torch-free layers share with the score kernels, defined once here so that
reading them imports no torch: the indexer (and so an index build, or the driver of a Ray
build) never loads it, which keeps ~260 MB of anonymous memory out of those processes.
core/montecarlo.py and core/scores.py use (and re-export) them.
"""
import math

MC_SAMPLES = 16        # J used by eval and serving (recorded in the index manifest)
MC_SEED = 0            # seed of the fixed noise table
NOISE_ROWS = 4096      # items share a noise row when their ids agree modulo this
LOG_2PI = math.log(2.0 * math.pi)

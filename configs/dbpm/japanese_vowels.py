"""UCR/UEA JapaneseVowels (9 speakers, 12 LPC cepstrum channels, 7-29 steps padded to 29),
read offline from the copy shipped with `aeon`; train and test pooled (640 series) and split
again 70 / 30 per class, so pre-training sees 448 series.

Not a data set of the paper: the offline set of the bad-pair benchmark (benchmarks/bad_pairs.py),
large enough for a few hundred pairs yet seconds per epoch on a CPU. Padding after a series'
end is 0 after standardisation.
"""

from configs.dbpm import common


def get_config(arg=None):
    c = common.base(arg)
    c.data.update(source="bundled", dataset="JapaneseVowels", resplit=0.3)
    c.train.batch_size = 256
    return common.finish(c, cpu_batch=64)

"""UEA BasicMotions (4 activities, 6 channels of a smart watch, 100 steps; 40 train / 40 test
series), read offline from the copy shipped with the `aeon` package.

Not a data set of the paper: the offline demo of the method. The paper's batch of 512 exceeds the
40 training series, so a batch is the whole training set (one step per epoch; `cpu` and
`paper` differ only in the encoder and the number of epochs).
"""

from configs.dbpm import common


def get_config(arg=None):
    c = common.base(arg)
    c.data.update(source="bundled", dataset="BasicMotions")
    c.train.batch_size = 40
    return common.finish(c, cpu_batch=40, smoke_batch=20)

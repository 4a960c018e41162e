"""UEA Epilepsy (4 activities of epileptic and healthy participants, 3 accelerometer channels,
206 steps; 137 train / 138 test series) from its `.ts` files in
$JAXSAFE_DATA/Epilepsy (Epilepsy_TRAIN.ts, Epilepsy_TEST.ts).

The paper's "Epilepsy" is the single-channel EEG seizure set of TS-TCC (Andrzejak et al. 2001,
178 steps, 2 classes, 11,500 segments), which has no `.ts` release; this config is the UEA set
of the same name. Its 137 training series are fewer than the paper's batch of 512, so a batch
is the whole training set.
"""

import os

from configs.dbpm import common


def get_config(arg=None):
    c = common.base(arg)
    c.data.update(
        source="ucr_uea", dataset="Epilepsy", path=os.path.join(common.data_root(), "Epilepsy")
    )
    c.train.batch_size = 137
    return common.finish(c, cpu_batch=64)

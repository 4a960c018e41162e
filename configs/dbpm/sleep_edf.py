"""Sleep-EDF (single-channel Fpz-Cz EEG, 30-s epochs at 100 Hz, 5 stages), one of the paper's
data sets, from recordings prepared as .npz files (DeepSleepNet / TS-TCC preparation: `x`
(N, 3000), `y`) in $JAXSAFE_DATA/sleep-edf; 20 % of the recordings form the test split.
Paper: batch 512, 80 epochs, warm-up 50; linear-probe accuracy."""

import os

from configs.dbpm import common


def get_config(arg=None):
    c = common.base(arg)
    c.data.update(
        source="sleep_edf", dataset="Sleep-EDF", path=os.path.join(common.data_root(), "sleep-edf")
    )
    return common.finish(c, cpu_batch=128)

"""PTB-XL (12-lead 10-s ECGs at 100 Hz, 44 multi-label diagnostic statements), the paper's main
data set and the reference code's only one, from the PhysioNet release under
$JAXSAFE_DATA/ptb-xl (needs the optional `wfdb` package). Train: strat_fold 1-9, test: fold 10
(the reference splits at random instead). Paper: batch 512, 80 epochs, warm-up 50,
beta_np = 2, beta_fp = 3 (run.sh); linear-probe macro AUROC."""

import os

from configs.dbpm import common


def get_config(arg=None):
    c = common.base(arg)
    c.data.update(
        source="ptbxl",
        dataset="PTB-XL",
        sampling_rate=100,
        task="diagnostic",
        path=os.path.join(common.data_root(), "ptb-xl"),
    )
    return common.finish(c, cpu_batch=128)
